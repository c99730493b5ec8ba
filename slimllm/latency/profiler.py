"""Latency of a pruned model against its dense original, side by side, on every backend a target profile names.

    >>> result = run_profile(dense, pruned, load_profile("cpu-x86"), Path("out/latency"))
    >>> result.summary["llama.cpp (cpu) Q8_0"]["decode"]["speedup"]

For each backend the dense and the pruned model are loaded in two worker processes (so that their peak memory is
measured apart) and measured alternately inside every repeat, which cancels slow drift of the machine. Measured
per model: time to first token, prefill tokens/s at each prompt length (llama-bench's ppN) and decode tokens/s of
N tokens generated one at a time from an empty cache (llama-bench's tgN); medians with min and max over repeats.
The measured speedup is shown next to the ideal one from FLOPs (`slimllm.models.flops`).

Artifacts (ONNX exports, GGUF files) the profile needs and that are not given are exported first, with the usual
parity checks, into `<out>/artifacts/`.
"""

from __future__ import annotations

import logging
import multiprocessing
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimllm.core.artifacts import (
    OUTPUT_MARKER,
    check_output_directory,
    library_versions,
    machine_info,
    mark_output,
    sha256_tree,
)
from slimllm.core.errors import SlimllmError, UserInputError
from slimllm.core.progress import Progress, announcer
from slimllm.latency.profiles import BackendKind, BackendSpec, TargetProfile
from slimllm.models.flops import ModelShape, ideal_speedup

PROMPT_SEED = 1234
log = logging.getLogger(__name__)


@dataclass
class ModelArtifacts:
    """One model in every form a profile may measure."""

    checkpoint: Path
    onnx: dict[str, Path] = field(default_factory=dict)
    """Export variant (`optimum-fp32`, `genai-int4`, ...) -> export directory."""
    gguf: dict[str, Path] = field(default_factory=dict)
    """GGUF type label (`Q8_0`, `F16`, ...) -> file."""
    sha256: str | None = None
    """Content hash of the checkpoint where the caller knows it; computed once when an export needs checking."""

    def checkpoint_sha256(self) -> str:
        if self.sha256 is None:
            self.sha256 = sha256_tree(self.checkpoint)
        return self.sha256

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.checkpoint),
            "onnx": {k: str(v) for k, v in self.onnx.items()},
            "gguf": {k: str(v) for k, v in self.gguf.items()},
        }


@dataclass(frozen=True)
class Measurement:
    """One backend row: a backend spec and, for llama.cpp, the GGUF type."""

    spec: BackendSpec
    gguf_type: str | None = None

    @property
    def label(self) -> str:
        return f"{self.spec.label} {self.gguf_type}" if self.gguf_type else self.spec.label

    def artifact(self, artifacts: ModelArtifacts) -> Path:
        kind = self.spec.kind
        if kind is BackendKind.TORCH:
            return artifacts.checkpoint
        if kind is BackendKind.LLAMA_CPP:
            assert self.gguf_type is not None
            return artifacts.gguf[self.gguf_type]
        return artifacts.onnx[onnx_variant(self.spec)]


def onnx_variant(spec: BackendSpec) -> str:
    engine = "genai" if spec.kind is BackendKind.GENAI else "optimum"
    return f"{engine}-{spec.dtype}"


def measurements(profile: TargetProfile) -> list[Measurement]:
    rows: list[Measurement] = []
    for spec in profile.backends:
        if spec.kind is BackendKind.LLAMA_CPP:
            rows.extend(Measurement(spec, t.upper()) for t in spec.gguf_types)
        else:
            rows.append(Measurement(spec))
    return rows


def check_backends_available(profile: TargetProfile) -> None:
    """Fail before any work when a backend of the profile cannot run here; the error names what to install."""
    import importlib.util

    from slimllm.core.errors import MissingDependencyError

    for spec in profile.backends:
        if spec.kind is BackendKind.LLAMA_CPP and importlib.util.find_spec("llama_cpp") is None:
            raise MissingDependencyError(
                f"profile {profile.name!r} measures llama.cpp, which is not installed; install the `llama` extra "
                "(`pip install 'slimllm[llama]'`)"
            )
        if spec.kind is BackendKind.GENAI and importlib.util.find_spec("onnxruntime_genai") is None:
            raise MissingDependencyError(
                f"profile {profile.name!r} measures onnxruntime-genai, which is not installed; install the `genai` "
                "extra (`pip install 'slimllm[genai]'`)"
            )
        if spec.kind in (BackendKind.ONNXRUNTIME, BackendKind.GENAI) and spec.device == "cuda":
            from slimllm.exporters.ort_session import resolve_provider

            resolve_provider("cuda")
        if spec.kind is BackendKind.TORCH:
            from slimllm.core.device import resolve_device

            resolve_device(spec.device)


def prepare_artifacts(
    profile: TargetProfile,
    models: dict[str, ModelArtifacts],
    work_dir: Path,
    eval_data: str | None = None,
    progress: Progress | None = None,
    rebuild: bool = False,
) -> list[str]:
    """Export (and validate) the ONNX and GGUF artifacts the profile needs and `models` lacks. Returns notes.

    An export left in `work_dir` by an earlier profile is reused only if it was made from the same checkpoint
    (content hash) with the same settings, and never with `rebuild`.
    """
    from slimllm.exporters.gguf import GgufExportSettings, export_gguf
    from slimllm.exporters.onnx import OnnxExportSettings, export_onnx
    from slimllm.exporters.records import export_or_reuse, read_export_record

    notes: list[str] = []
    for name, model in models.items():
        for spec in profile.backends:
            if spec.kind in (BackendKind.ONNXRUNTIME, BackendKind.GENAI):
                variant = onnx_variant(spec)
                if variant in model.onnx:
                    continue
                quant = spec.dtype if spec.dtype in ("int8", "int8-dynamic", "int4") else "none"
                dtype = spec.dtype if spec.dtype in ("fp32", "fp16") else "fp32"
                target = work_dir / name / f"onnx-{variant}"
                settings = OnnxExportSettings(
                    engine="genai" if spec.kind is BackendKind.GENAI else "optimum",
                    dtype=dtype,
                    quant=quant,
                    provider=spec.device,
                    eval_data=eval_data,
                    eval_windows=2,
                )
                stage = f"export {name} {variant}"
                if export_or_reuse(export_onnx, model.checkpoint, target, model.checkpoint_sha256(), settings, rebuild,
                                   announcer(progress, stage)):
                    notes.append(f"exported {name} to ONNX ({variant}) for profiling")
                model.onnx[variant] = target
            elif spec.kind is BackendKind.LLAMA_CPP:
                missing = [t for t in spec.gguf_types if t.upper() not in model.gguf]
                if not missing:
                    continue
                target = work_dir / name / f"gguf-{'-'.join(t.lower() for t in missing)}"
                settings = GgufExportSettings(outtypes=missing, eval_data=eval_data, eval_windows=2, tokenizer_lines=50)
                stage = f"export {name} GGUF {','.join(missing)}"
                if export_or_reuse(export_gguf, model.checkpoint, target, model.checkpoint_sha256(), settings, rebuild,
                                   announcer(progress, stage)):
                    notes.append(f"exported {name} to GGUF ({', '.join(m.upper() for m in missing)}) for profiling")
                for file_name, info in read_export_record(target)["files"].items():
                    model.gguf[info["type"]] = target / file_name
    return notes


def _worker(connection, spec_values: dict, artifact: str, threads: int, max_context: int) -> None:
    """Child process: load one model, then answer measurement requests until told to stop."""
    try:
        from slimllm.latency.backends import describe_runner, make_runner, peak_rss_bytes

        spec = BackendSpec(**spec_values)
        runner = make_runner(spec, Path(artifact), threads, max_context)
        connection.send(("ready", describe_runner(runner)))
        while True:
            request = connection.recv()
            if request[0] == "stop":
                memory = {"peak_rss_bytes": peak_rss_bytes(), "gpu_bytes": runner.gpu_memory_bytes()}
                connection.send(("memory", memory))
                return
            _, prompts, generate_tokens = request
            result = {"prefill_s": {str(len(p)): runner.prefill(p) for p in prompts}}
            result["generate_s"] = runner.generate(generate_tokens)
            connection.send(("result", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        try:
            connection.send(("error", f"{type(exc).__name__}: {exc}"))
        except (BrokenPipeError, OSError):
            pass


class _Worker:
    def __init__(self, context, spec: BackendSpec, artifact: Path, threads: int, max_context: int) -> None:
        self.connection, child = context.Pipe()
        values = {k: getattr(spec, k) for k in ("kind", "device", "dtype", "gguf_types", "gpu_layers", "compile")}
        values["kind"] = spec.kind.value
        self.process = context.Process(
            target=_worker, args=(child, values, str(artifact), threads, max_context), daemon=True
        )
        self.process.start()
        self.info: dict | None = None

    def wait_ready(self) -> None:
        """Wait until the worker has loaded its model (workers started together load theirs at the same time)."""
        self.info = self._receive("ready")

    def _receive(self, expected: str) -> Any:
        if not self.connection.poll(3600):
            raise SlimllmError("a profiling worker did not answer within an hour")
        try:
            kind, payload = self.connection.recv()
        except EOFError as exc:
            raise SlimllmError(f"a profiling worker died (exit code {self.process.exitcode})") from exc
        if kind == "error":
            if "MissingDependencyError" in payload or "UserInputError" in payload:
                raise UserInputError(payload.split(": ", 1)[-1])
            raise SlimllmError(f"profiling worker failed: {payload}")
        assert kind == expected, (kind, expected)
        return payload

    def measure(self, prompts: list[list[int]], generate_tokens: int) -> dict:
        self.connection.send(("measure", prompts, generate_tokens))
        return self._receive("result")

    def stop(self) -> dict:
        try:
            self.connection.send(("stop",))
            return self._receive("memory")
        finally:
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()


def _prompts(lengths: list[int], vocab: int) -> list[list[int]]:
    import random

    generator = random.Random(PROMPT_SEED)
    return [[generator.randrange(100, min(vocab, 32000)) for _ in range(length)] for length in lengths]


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


@dataclass
class ProfileResult:
    out_dir: Path
    summary: dict[str, Any]
    """Backend row label -> per-model statistics, speedups and ideal speedups."""
    samples: dict[str, Any]
    partial: bool
    notes: list[str]
    payload: dict[str, Any]


def run_profile(
    dense: ModelArtifacts,
    pruned: ModelArtifacts,
    profile: TargetProfile,
    out_dir: Path,
    eval_data: str | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> ProfileResult:
    """Measure, write latency.json / latency.md / latency.png into `out_dir`, and return the result.

    On Ctrl-C the report is still written, marked `partial`, and KeyboardInterrupt is raised again.
    """

    out_dir = Path(out_dir)
    if not _only_artifacts(out_dir):  # an earlier profile's directory is ours to update; anything else needs --force
        check_output_directory(out_dir, force, protected=[dense.checkpoint, pruned.checkpoint])
    check_backends_available(profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    mark_output(out_dir)
    started = time.perf_counter()
    models = {"dense": dense, "pruned": pruned}
    notes = prepare_artifacts(profile, models, out_dir / "artifacts", eval_data, progress, rebuild=force)
    from slimllm.models.attention_free import read_config

    shapes = {name: ModelShape.from_config(read_config(str(m.checkpoint))) for name, m in models.items()}
    if shapes["dense"].vocab != shapes["pruned"].vocab or shapes["dense"].hidden != shapes["pruned"].hidden:
        raise UserInputError("--dense and --pruned are not the same model family (hidden size or vocabulary differ)")
    run = _Measuring(profile, models, _prompts(profile.prompt_lengths, shapes["dense"].vocab), progress)
    samples: dict[str, Any] = {}
    runtime: dict[str, Any] = {}
    partial = False
    failed: dict[str, str] = {}
    try:
        for row in measurements(profile):
            try:
                samples[row.label], runtime[row.label] = run.measure(row)
            except SlimllmError as exc:  # one backend failing must not hide the others; the report names it
                failed[row.label] = str(exc)
                partial = True
                log.warning("backend %s failed: %s", row.label, exc)
    except KeyboardInterrupt:
        partial = True
        notes.append("interrupted: only the backends that finished are reported")
        raise
    finally:
        from slimllm.latency.report import write_latency_report

        payload = _payload(profile, models, shapes, samples, runtime, notes, partial, time.perf_counter() - started)
        payload["failed_backends"] = failed
        write_latency_report(out_dir, payload)
    if failed:
        raise ProfileIncompleteError(
            f"profile {profile.name!r} is incomplete: "
            + "; ".join(f"backend {label} failed ({reason})" for label, reason in failed.items())
            + f"; {out_dir}/latency.md is marked partial and reports the backends that ran"
        )
    return ProfileResult(out_dir, payload["summary"], samples, partial, notes, payload)


class _Measuring:
    """Measures one backend row at a time: dense and pruned in two workers, alternating inside every repeat."""

    def __init__(self, profile: TargetProfile, models: dict[str, ModelArtifacts], prompts, progress) -> None:
        self.profile, self.models, self.prompts, self.progress = profile, models, prompts, progress
        self.context = multiprocessing.get_context("spawn")
        self.total = len(measurements(profile)) * (profile.warmup + profile.repeats) * 2
        self.done = 0

    def measure(self, row: Measurement) -> tuple[dict[str, Any], dict[str, Any]]:
        """(samples, runtime record) of one row; the workers are always stopped."""
        artifacts = {name: row.artifact(self.models[name]) for name in ("dense", "pruned")}

        def step() -> None:
            self.done += 1
            if self.progress:
                self.progress(self.done, self.total, stage=row.label)

        row_samples, memory, info = measure_rotating(row.spec, artifacts, self.profile, self.prompts, self.context,
                                                     step)
        return row_samples, {
            "backend": row.spec.kind.value,
            "spec": {k: v for k, v in row.spec.__dict__.items() if k != "kind"},
            "gguf_type": row.gguf_type,
            "artifacts": {name: str(path) for name, path in artifacts.items()},
            "runtime": info,
            "memory": memory,
        }


def measure_rotating(spec: BackendSpec, artifacts: dict[str, Path], profile: TargetProfile, prompts: list[list[int]],
                     context, step: Callable[[], None]) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict]:
    """Every artifact in its own worker process, each measured once per repeat, the order rotating from repeat to
    repeat so that drift spreads over all of them (with two artifacts: alternating). `step` is called after each
    measurement; the workers are always stopped.

    Returns per name the seconds of the repeats after the warm-up (`prefill_s` per prompt length, `generate_s`), per
    name the worker's peak memory, and the first worker's runtime information."""
    max_context = max(max(profile.prompt_lengths), profile.generate_tokens) + 16
    names = list(artifacts)
    samples: dict[str, dict[str, Any]] = {name: {"prefill_s": {}, "generate_s": []} for name in names}
    workers: dict[str, _Worker] = {}
    try:
        for name in names:
            workers[name] = _Worker(context, spec, artifacts[name], profile.resolved_threads, max_context)
        for worker in workers.values():
            worker.wait_ready()
        for repeat in range(profile.warmup + profile.repeats):
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                result = workers[name].measure(prompts, profile.generate_tokens)
                step()
                if repeat >= profile.warmup:
                    for length, seconds in result["prefill_s"].items():
                        samples[name]["prefill_s"].setdefault(length, []).append(seconds)
                    samples[name]["generate_s"].append(result["generate_s"])
        info = workers[names[0]].info
        memory = {name: worker.stop() for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.kill()
    return samples, memory, info


def measure_in_turn(
    spec: BackendSpec, artifacts: dict[str, Path], profile: TargetProfile, vocab: int, progress: Progress | None = None
) -> dict[str, dict[str, Any]]:
    """Latency of several artifacts on one backend, each in its own worker process, measured in turn inside every
    repeat (see `measure_rotating`).

    Returns, per name, `ppN`/`tgN` tokens/s (median, min, max over the repeats) and the worker's peak memory.
    """
    total, done = len(artifacts) * (profile.warmup + profile.repeats), 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, stage="latency")

    samples, memory, _ = measure_rotating(spec, artifacts, profile, _prompts(profile.prompt_lengths, vocab),
                                          multiprocessing.get_context("spawn"), step)
    rates = {name: {f"pp{length}": [int(length) / s for s in seconds]
                    for length, seconds in samples[name]["prefill_s"].items()}
             | {f"tg{profile.generate_tokens}": [profile.generate_tokens / s for s in samples[name]["generate_s"]]}
             for name in artifacts}
    return {name: {key: _stats(values) for key, values in rates[name].items()} | memory[name] for name in artifacts}


class ProfileIncompleteError(SlimllmError):
    """At least one backend of the profile failed; the report was written, marked partial."""


def _only_artifacts(out_dir: Path) -> bool:
    """An output directory that holds only an earlier profile of ours may be reused (its exports are kept)."""
    if not out_dir.is_dir():
        return True
    names = {p.name for p in out_dir.iterdir()}
    return names <= {"artifacts", "latency.json", "latency.md", "latency.png", OUTPUT_MARKER}


def _payload(profile, models, shapes, samples, runtime, notes, partial, seconds) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for label, per_model in samples.items():
        positions = runtime[label]["runtime"].get("lm_head_positions", "last")
        entry: dict[str, Any] = {"backend": runtime[label]["backend"], "lm_head_positions": positions, "models": {}}
        for name, values in per_model.items():
            prefill = {
                length: _stats([int(length) / s for s in seconds]) for length, seconds in values["prefill_s"].items()
            }
            first = str(profile.prompt_lengths[0])
            entry["models"][name] = {
                "ttft_ms": _stats([1000 * s for s in values["prefill_s"][first]]),
                "prefill_tokens_per_s": prefill,
                "decode_tokens_per_s": _stats([profile.generate_tokens / s for s in values["generate_s"]]),
                "peak_rss_mib": runtime[label]["memory"][name]["peak_rss_bytes"] / 2**20,
                "gpu_mib": (
                    runtime[label]["memory"][name]["gpu_bytes"] / 2**20
                    if runtime[label]["memory"][name]["gpu_bytes"]
                    else None
                ),
            }
        dense_stats, pruned_stats = entry["models"]["dense"], entry["models"]["pruned"]
        speedups: dict[str, Any] = {}
        for length in dense_stats["prefill_tokens_per_s"]:
            pruned_tps = pruned_stats["prefill_tokens_per_s"][length]["median"]
            measured = pruned_tps / dense_stats["prefill_tokens_per_s"][length]["median"]
            ideal = ideal_speedup(shapes["dense"], shapes["pruned"], "prefill", int(length), positions == "all")
            speedups[f"pp{length}"] = {"measured": measured, "ideal": ideal, "efficiency": measured / ideal}
        measured = pruned_stats["decode_tokens_per_s"]["median"] / dense_stats["decode_tokens_per_s"]["median"]
        ideal = ideal_speedup(shapes["dense"], shapes["pruned"], "decode", profile.generate_tokens)
        efficiency = measured / ideal
        speedups[f"tg{profile.generate_tokens}"] = {"measured": measured, "ideal": ideal, "efficiency": efficiency}
        ttft = dense_stats["ttft_ms"]["median"] / pruned_stats["ttft_ms"]["median"]
        speedups["ttft"] = {"measured": ttft}
        entry["speedups"] = speedups
        summary[label] = entry
    return {
        "benchmark": "latency",
        "partial": partial,
        "profile": profile.to_dict(),
        "threads": profile.resolved_threads,
        "models": {
            name: {**model.to_dict(), "shape": shapes[name].to_dict()} for name, model in models.items()
        },
        "ideal_flops_note": (
            "FLOPs(dense) / FLOPs(pruned), counting the projections, attention over the context and the LM head "
            "(for every prompt position on backends that compute all prompt logits, for the last one elsewhere)"
        ),
        "summary": summary,
        "samples": samples,
        "runtime": runtime,
        "machine": machine_info(),
        "versions": library_versions(),
        "notes": notes,
        "wall_seconds": seconds,
    }
