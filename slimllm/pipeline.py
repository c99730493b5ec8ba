"""`slimllm compile`: prune -> export -> parity -> evaluate -> profile -> report, reproducible and resumable.

    >>> import slimllm
    >>> result = slimllm.compile("smollm2-135m", out="runs/smollm2", target="all", remove=8)
    >>> result.report_path
    PosixPath('runs/smollm2/report.md')

Each stage reads the artifacts of the stages before it and writes its own under the output directory:

    pruned/        the pruned checkpoint (slimllm_pruning.json inside)       stage `prune`
    onnx/          ONNX export + validation.json                             stage `export_onnx`
    gguf/          GGUF files + validation.json                              stage `export_gguf`
    evaluation.json  perplexity of dense, pruned and every artifact           stage `evaluate`
    latency/       latency.json/.md/.png                                      stage `profile`
    report.md, report.html, gates.png                                         stage `report`

`manifest.json` records, for every stage, its inputs (with content hashes), settings, library versions, device,
timings and outcome. A stage whose inputs and settings are unchanged and whose outputs are still there is reused;
changing a setting reruns that stage and every stage after it (their inputs include its output hash). A killed run
leaves the manifest saying which stages finished; `resume=True` also continues TRSP from its round checkpoints.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from slimllm.artifacts import (
    OUTPUT_MARKER,
    atomic_write_json,
    check_output_directory,
    library_versions,
    machine_info,
    mark_output,
    plain,
    refuse_unsafe_replacement,
    sha256_text,
    sha256_tree,
)
from slimllm.errors import SlimllmError, UserInputError, ValidationError, parse_choice

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
Progress = Callable[..., None]


class Target(str, Enum):
    ONNX = "onnx"
    GGUF = "gguf"
    ALL = "all"


class Stage(str, Enum):
    PRUNE = "prune"
    EXPORT_ONNX = "export_onnx"
    EXPORT_GGUF = "export_gguf"
    EVALUATE = "evaluate"
    PROFILE = "profile"
    REPORT = "report"


NO_PRUNING = "none"


@dataclass
class CompileSettings:
    """Settings of `slimllm compile` itself; each stage's own settings live in its settings class."""

    target: Target = Target.ALL
    """onnx, gguf or all."""
    eval_data: str | None = None
    """Evaluation text for perplexities and the exporters' checks; None uses a built-in paragraph."""
    eval_seq_len: int = 512
    """Tokens per evaluation window."""
    eval_windows: int = 8
    """Evaluation windows (the same windows for PyTorch, ONNX and every GGUF type)."""
    profile: str | None = "cpu-x86"
    """Target profile for the latency stage (a built-in name or a path); None skips profiling."""

    def __post_init__(self) -> None:
        self.target = parse_choice(Target, self.target, "--target")
        if self.eval_seq_len < 16 or self.eval_windows < 1:
            raise UserInputError("--eval-seq-len must be >= 16 and --eval-windows >= 1")
        if self.profile in ("", "none"):
            self.profile = None


@dataclass
class CompileResult:
    out_dir: Path
    report_path: Path
    manifest: dict[str, Any]
    reused_stages: list[str]
    ran_stages: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "report": str(self.report_path),
            "reused_stages": self.reused_stages,
            "ran_stages": self.ran_stages,
            "seconds": self.seconds,
            "manifest": self.manifest,
        }


def _digest(payload: Any) -> str:
    return sha256_text(json.dumps(plain(payload), sort_keys=True))


def _source_hash(source: str) -> str:
    """Content hash of a local calibration or evaluation file; the name itself for hub sources and `self`."""
    path = Path(str(source)).expanduser()
    return sha256_tree(path) if path.is_file() else str(source)


class Manifest:
    """`manifest.json`: one entry per stage, rewritten atomically on every change."""

    def __init__(self, out_dir: Path, header: dict[str, Any]) -> None:
        self.path = out_dir / MANIFEST_FILE
        existing = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data = {**header, "stages": existing.get("stages", {})}

    def stage(self, name: Stage) -> dict[str, Any] | None:
        return self.data["stages"].get(name.value)

    def update(self, name: Stage, **entry: Any) -> None:
        self.data["stages"][name.value] = {**self.data["stages"].get(name.value, {}), **entry}
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


@dataclass
class _Context:
    out_dir: Path
    model_spec: str
    dense_dir: Path
    dense_sha: str
    compile: CompileSettings
    prune: Any
    trsp: Any
    onnx: Any
    gguf: Any
    resume: bool
    device: str
    progress: Progress | None
    outputs: dict[str, Any] = field(default_factory=dict)
    """Paths and hashes of finished stages' outputs, by stage name."""


_COMPILE_OUTPUTS = (
    "pruned",
    "pruned.partial",
    "onnx",
    "onnx.failed",
    "gguf",
    "gguf.failed",
    "evaluation.json",
    "latency",
    "report.md",
    "report.html",
    "gates.png",
    MANIFEST_FILE,
    OUTPUT_MARKER,
)
"""Everything a compile run writes into its directory; `--force` removes these and nothing else."""


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "stages" in data else None


def _prepare_output(out_dir: Path, model_spec: str, force: bool, protected: list[Path]) -> None:
    """Check `out_dir` before any work. An earlier run of the same model is continued; another model's run, or a
    slimllm output of another kind, is replaced only with --force; anything slimllm did not write is never touched."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"--out {out_dir} exists and is not a directory; choose another --out")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    previous = _read_manifest(out_dir)
    if previous is not None and previous.get("model") == model_spec and not force:
        return
    if previous is not None and not force:
        raise UserInputError(
            f"--out {out_dir} holds a compile run of another model ({previous.get('model')}); pass --force to "
            "replace it or choose another --out"
        )
    check_output_directory(out_dir, force=force, protected=protected)  # not ours, or no --force: one clear line
    refuse_unsafe_replacement(out_dir, protected)


def _clear_compile_outputs(out_dir: Path) -> None:
    """Remove what an earlier compile wrote into `out_dir` (and its leftovers), keeping anything else."""
    if not out_dir.is_dir():
        return
    for entry in out_dir.iterdir():
        ours = entry.name in _COMPILE_OUTPUTS or any(
            entry.name.startswith(f".{name}.tmp-") or entry.name.startswith(f".{name}.old-")
            for name in _COMPILE_OUTPUTS
        )
        if not ours:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _local_paths(*specs: str | Path | None) -> list[Path]:
    """The given model specs that name local files or directories (inputs that --force must never replace)."""
    paths = []
    for spec in specs:
        if spec is not None and Path(str(spec)).expanduser().exists():
            paths.append(Path(str(spec)).expanduser())
    return paths


def compile(  # noqa: A001 - the product's verb; `slimllm.compile(...)` mirrors `slimllm compile`
    model: str = "smollm2-135m",
    out: Path | str = "runs/compile",
    target: Target | str | None = None,
    method: str | None = None,
    remove: int | None = None,
    ratio: float | None = None,
    calib: str | None = None,
    eval_data: str | None = None,
    profile: str | None = "default",
    recipe: Path | str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    progress: Progress | None = None,
    command: str | None = None,
) -> CompileResult:
    """Run the whole pipeline into `out`. Settings: class defaults < `recipe` < `overrides` < explicit arguments.

    `target` is onnx, gguf or all (None: the recipe's, else all); `method` is a pruning method or `none` (export
    the dense model); `profile` is a profile name or path, None to skip the latency stage, or "default" (the
    recipe's, else cpu-x86); `overrides` maps a recipe section (`compile`, `prune`, `trsp`, `onnx`, `gguf`) to
    setting values given as flags (None means "not given").
    """
    from slimllm.models import checkpoint_directory
    from slimllm.recipes import load_recipe

    started = time.perf_counter()
    out_dir = Path(out)
    recipe_sections = load_recipe(Path(recipe)) if recipe is not None else {}
    flag_sections = {
        section: {k: v for k, v in values.items() if v is not None} for section, values in (overrides or {}).items()
    }
    compile_flags = {**flag_sections.get("compile", {}), "target": target, "eval_data": eval_data}
    if profile != "default":  # "default": the recipe's profile, else cpu-x86; None or "none": no latency stage
        compile_flags["profile"] = profile if profile is not None else "none"
    settings = _resolve_settings(recipe_sections, flag_sections, compile_flags, method, remove, ratio, calib)
    compile_settings, method_value = settings["compile"], settings["method"]
    protected = _local_paths(model)
    _prepare_output(out_dir, model, force, protected)
    dense_dir = checkpoint_directory(model)
    protected.append(dense_dir)
    _validate_before_work(dense_dir, settings)
    if force:
        refuse_unsafe_replacement(out_dir, protected)
        _clear_compile_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mark_output(out_dir)
    context = _Context(
        out_dir=out_dir,
        model_spec=model,
        dense_dir=dense_dir,
        dense_sha=sha256_tree(dense_dir),
        compile=compile_settings,
        prune=settings["prune"],
        trsp=settings["trsp"],
        onnx=settings["onnx"],
        gguf=settings["gguf"],
        resume=resume,
        device=device,
        progress=progress,
    )
    stages = _stages_for(compile_settings)
    header = {
        "format_version": MANIFEST_FORMAT,
        "model": model,
        "dense_checkpoint": str(dense_dir),
        "command": command or _python_call(model, out_dir, compile_settings, method_value.value, recipe),
        "settings": plain({name: settings[name] for name in ("compile", "prune", "trsp", "onnx", "gguf")}),
        "run_stages": [stage.value for stage in stages],
        "finished": False,
        "machine": machine_info(),
    }
    manifest = Manifest(out_dir, header)
    manifest.save()
    reused: list[str] = []
    ran: list[str] = []
    for stage in stages:
        if _run_stage(stage, context, manifest):
            ran.append(stage.value)
        else:
            reused.append(stage.value)
    manifest.data["finished"] = True
    manifest.save()
    return CompileResult(out_dir, out_dir / "report.md", manifest.data, reused, ran, time.perf_counter() - started)


def _resolve_settings(recipe_sections, flag_sections, compile_flags, method, remove, ratio, calib) -> dict[str, Any]:
    """Every stage's settings: class defaults < recipe < flags actually given (None is "not given")."""
    from slimllm.recipes import build_settings

    compile_settings = build_settings(CompileSettings, recipe_sections.get("compile"), compile_flags)
    merged = {
        section: {**recipe_sections.get(section, {}), **flag_sections.get(section, {})}
        for section in set(recipe_sections) | set(flag_sections)
    }
    chosen_method = method or merged.get("prune", {}).get("method") or "trsp"  # argument > recipe > TRSP
    method_value = parse_choice(_MethodChoice, str(chosen_method), "--method")
    prune_settings, trsp_settings = _prune_settings(merged, method_value, remove, ratio, calib)
    # The exports' own evaluation settings: compile's (from its recipe section or flags) unless the [onnx]/[gguf]
    # section sets them; a compile flag that was actually given wins over both.
    given = {key: compile_flags.get(key) for key in ("eval_data", "eval_seq_len", "eval_windows")}
    onnx_settings, gguf_settings = _export_settings(recipe_sections, flag_sections, compile_settings, given)
    return {
        "compile": compile_settings,
        "method": method_value,
        "prune": prune_settings,
        "trsp": trsp_settings,
        "onnx": onnx_settings,
        "gguf": gguf_settings,
    }


def _validate_before_work(dense_dir: Path, settings: dict[str, Any]) -> None:
    """Errors that would otherwise surface minutes into the run: k and protection, every backend a stage needs."""
    from transformers import AutoConfig

    from slimllm.architectures import architecture_for
    from slimllm.pruning.candidates import candidate_layers, check_removable, layers_to_remove

    config = AutoConfig.from_pretrained(str(dense_dir))
    architecture_for(config)
    prune_settings, compile_settings = settings["prune"], settings["compile"]
    if prune_settings is not None:
        layers = int(config.num_hidden_layers)
        k = layers_to_remove(layers, prune_settings.remove, prune_settings.ratio)
        check_removable(layers, k, candidate_layers(layers, prune_settings.protect_first, prune_settings.protect_last))
    if compile_settings.target in (Target.ONNX, Target.ALL):
        from slimllm.exporters.onnx import check_onnx_dependencies

        check_onnx_dependencies(settings["onnx"])
    if compile_settings.target in (Target.GGUF, Target.ALL):
        from slimllm.exporters.gguf import check_gguf_dependencies, check_gguf_supports

        check_gguf_dependencies(settings["gguf"])
        check_gguf_supports(config, settings["gguf"])
    if compile_settings.profile is not None:
        from slimllm.profiler import check_backends_available
        from slimllm.profiles import load_profile

        check_backends_available(load_profile(compile_settings.profile))


def _method_choices() -> type[Enum]:
    """The pruning methods plus `none` (compile the dense model), as one closed set for `--method`."""
    from slimllm.pruning.methods import PruneMethod

    return Enum("MethodChoice", {m.name: m.value for m in PruneMethod} | {"NONE": NO_PRUNING}, type=str)


_MethodChoice = _method_choices()


def _prune_settings(sections, method: _MethodChoice, remove, ratio, calib):
    from slimllm.pruning.stage import PruneSettings
    from slimllm.pruning.trsp import TrspSettings
    from slimllm.recipes import build_settings

    if method is _MethodChoice.NONE:
        if remove is not None or ratio is not None:
            raise UserInputError("--method none compiles the dense model; drop --remove/--ratio")
        return None, None
    flags = {"method": method.value, "remove": remove, "ratio": ratio, "calib": calib}
    prune = dict(sections.get("prune", {}))
    if remove is not None or ratio is not None:  # an explicit k replaces the recipe's, whichever form it took
        prune.pop("remove", None)
        prune.pop("ratio", None)
    if prune.get("remove") is None and prune.get("ratio") is None and remove is None and ratio is None:
        raise UserInputError("pass --remove K or --ratio R (how many layers to remove), or --method none")
    prune_settings = build_settings(PruneSettings, prune, flags)
    trsp_settings = build_settings(TrspSettings, sections.get("trsp"), {}) if method is _MethodChoice.TRSP else None
    return prune_settings, trsp_settings


def _export_settings(recipe_sections, flag_sections, compile_settings: CompileSettings, given: dict[str, Any]):
    from slimllm.exporters.gguf import GgufExportSettings
    from slimllm.exporters.onnx import OnnxExportSettings
    from slimllm.recipes import build_settings

    evaluation = {
        "eval_data": compile_settings.eval_data,
        "eval_seq_len": compile_settings.eval_seq_len,
        "eval_windows": compile_settings.eval_windows,
    }

    def build(cls, section: str, defaults: dict[str, Any]):
        values = {**defaults, **evaluation, **recipe_sections.get(section, {})}
        return build_settings(cls, values, {**given, **flag_sections.get(section, {})})

    onnx = build(OnnxExportSettings, "onnx", {})
    gguf = build(GgufExportSettings, "gguf", {"outtypes": list(COMPILE_GGUF_TYPES)})
    return onnx, gguf


COMPILE_GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
"""The GGUF types `compile` writes unless told otherwise (`export --target gguf` writes F16 alone)."""


def _stages_for(settings: CompileSettings) -> list[Stage]:
    stages = [Stage.PRUNE]
    if settings.target in (Target.ONNX, Target.ALL):
        stages.append(Stage.EXPORT_ONNX)
    if settings.target in (Target.GGUF, Target.ALL):
        stages.append(Stage.EXPORT_GGUF)
    stages.append(Stage.EVALUATE)
    if settings.profile is not None:
        stages.append(Stage.PROFILE)
    stages.append(Stage.REPORT)
    return stages


def _python_call(model, out_dir, settings: CompileSettings, method: str, recipe) -> str:
    return " ".join(
        shlex.quote(part)
        for part in [
            "slimllm",
            "compile",
            model,
            "--target",
            settings.target.value,
            "--method",
            method,
            *(["--recipe", str(recipe)] if recipe else []),
            "--out",
            str(out_dir),
        ]
    )


# --- stage bodies ---------------------------------------------------------------------------------------------


def _stage_inputs(stage: Stage, ctx: _Context) -> dict[str, Any]:
    """What a stage depends on: settings and the content hashes of the artifacts it reads."""
    pruned = ctx.outputs.get(Stage.PRUNE.value, {})
    if stage is Stage.PRUNE:
        calib = ctx.prune.calib if ctx.prune is not None else None
        return {
            "model": ctx.model_spec,
            "dense_sha256": ctx.dense_sha,
            "prune": ctx.prune,
            "trsp": ctx.trsp,
            "calibration_source": _source_hash(calib) if calib else None,
        }
    if stage is Stage.EXPORT_ONNX:
        return {"checkpoint_sha256": pruned.get("sha256"), "onnx": ctx.onnx}
    if stage is Stage.EXPORT_GGUF:
        return {"checkpoint_sha256": pruned.get("sha256"), "gguf": ctx.gguf}
    exported = {
        name: ctx.outputs.get(name, {}).get("sha256") for name in (Stage.EXPORT_ONNX.value, Stage.EXPORT_GGUF.value)
    }
    if stage is Stage.EVALUATE:
        return {
            "dense_sha256": ctx.dense_sha,
            "checkpoint_sha256": pruned.get("sha256"),
            "exports": exported,
            "eval": {
                "data": _source_hash(ctx.compile.eval_data) if ctx.compile.eval_data else None,
                "seq_len": ctx.compile.eval_seq_len,
                "windows": ctx.compile.eval_windows,
            },
        }
    if stage is Stage.PROFILE:
        from slimllm.profiles import load_profile

        return {
            "dense_sha256": ctx.dense_sha,
            "checkpoint_sha256": pruned.get("sha256"),
            "exports": exported,
            "profile": load_profile(ctx.compile.profile).to_dict(),
        }
    return {name: output.get("sha256") for name, output in ctx.outputs.items()}


def _run_stage(stage: Stage, ctx: _Context, manifest: Manifest) -> bool:
    """Run one stage unless its inputs are unchanged and its outputs intact. Returns True if it ran."""
    inputs = _stage_inputs(stage, ctx)
    key = _digest(inputs)
    previous = manifest.stage(stage)
    if previous and previous.get("status") == "done" and previous.get("key") == key:
        outputs = previous.get("outputs", {})
        if _outputs_intact(outputs):
            ctx.outputs[stage.value] = outputs
            manifest.update(stage, reused_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            log.info("stage %s: inputs unchanged, reusing %s", stage.value, outputs.get("path"))
            return False
    if ctx.progress:
        ctx.progress(0, 1, stage=stage.value)
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
    manifest.update(
        stage,
        status="running",
        key=key,
        inputs=plain(inputs),
        started=started_at,
        finished=None,
        versions=library_versions(),
        error=None,
    )
    started = time.perf_counter()
    try:
        outputs, result = _STAGE_BODIES[stage](ctx)
    except KeyboardInterrupt:
        manifest.update(stage, status="interrupted", seconds=round(time.perf_counter() - started, 3))
        raise
    except SlimllmError as exc:
        manifest.update(stage, status="failed", error=str(exc), seconds=round(time.perf_counter() - started, 3))
        if isinstance(exc, ValidationError):
            raise ValidationError(f"stage {stage.value} failed: {exc}") from exc
        raise
    except BaseException as exc:
        manifest.update(stage, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if "path" in outputs and "sha256" not in outputs:
        outputs["sha256"] = sha256_tree(Path(outputs["path"]))
    ctx.outputs[stage.value] = outputs
    manifest.update(
        stage,
        status="done",
        outputs=outputs,
        result=plain(result),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        seconds=round(time.perf_counter() - started, 3),
        device=ctx.device,
    )
    return True


def _outputs_intact(outputs: dict[str, Any]) -> bool:
    path = outputs.get("path")
    if path is None:
        return True
    path = Path(path)
    if not path.exists():
        return False
    expected = outputs.get("sha256")
    return expected is None or outputs.get("external") or sha256_tree(path) == expected


def _prune(ctx: _Context) -> tuple[dict, dict]:
    from slimllm.pruning.stage import run_prune, work_directory

    if ctx.prune is None:
        return {"path": str(ctx.dense_dir), "external": True, "sha256": ctx.dense_sha}, {"method": NO_PRUNING}
    target = ctx.out_dir / "pruned"
    resume = ctx.resume and work_directory(target).is_dir()
    result = run_prune(
        ctx.model_spec,
        ctx.prune,
        target,
        force=True,
        device=ctx.device,
        progress=ctx.progress,
        trsp=ctx.trsp,
        resume=resume,
    )
    summary = {
        "method": result.method,
        "removed_layers": result.removed_layers,
        "original_num_layers": result.original_num_layers,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "seconds": result.seconds,
        "resumed": resume,
    }
    return {"path": str(target)}, summary


def _export_onnx(ctx: _Context) -> tuple[dict, dict]:
    from slimllm.exporters.onnx import export_onnx

    target = ctx.out_dir / "onnx"
    result = export_onnx(Path(ctx.outputs[Stage.PRUNE.value]["path"]), target, ctx.onnx, force=True)
    return {"path": str(target), "variant": result.variant}, {
        "variant": result.variant,
        "provider": result.provider,
        "files": result.files,
        "checks": _check_summaries(result.validation["checks"]),
        "notes": result.notes,
    }


def _export_gguf(ctx: _Context) -> tuple[dict, dict]:
    from slimllm.exporters.gguf import export_gguf

    target = ctx.out_dir / "gguf"
    result = export_gguf(Path(ctx.outputs[Stage.PRUNE.value]["path"]), target, ctx.gguf, force=True)
    files = {info["type"]: str(target / name) for name, info in result.files.items()}
    return {"path": str(target), "files": files}, {
        "files": result.files,
        "greedy": result.greedy_samples,
        "checks": {
            name: _check_summaries(report["checks"]) for name, report in result.validation["files"].items()
        },
    }


def _check_summaries(checks: list[dict]) -> list[dict]:
    return [
        {k: check.get(k) for k in ("name", "passed", "metric", "value", "bound")} | {
            "argmax_agreement": check.get("details", {}).get("argmax_agreement")
        }
        for check in checks
    ]


def _evaluate(ctx: _Context) -> tuple[dict, dict]:
    """Perplexity of dense and pruned in PyTorch, of the ONNX export in onnxruntime; GGUF figures from its checks."""
    from slimllm.exporters.parity import TorchReference, eval_windows, perplexity
    from slimllm.exporters.records import read_export_record

    pruned_dir = Path(ctx.outputs[Stage.PRUNE.value]["path"])
    pruned = TorchReference.load(pruned_dir)
    windows, source = eval_windows(
        pruned.tokenizer, ctx.compile.eval_data, ctx.compile.eval_seq_len, ctx.compile.eval_windows
    )
    rows: dict[str, Any] = {}
    dense = TorchReference.load(ctx.dense_dir)
    rows["dense (PyTorch)"] = perplexity(dense.logits_fn(), windows)
    del dense
    rows["pruned (PyTorch)"] = perplexity(pruned.logits_fn(), windows)
    onnx_output = ctx.outputs.get(Stage.EXPORT_ONNX.value)
    if onnx_output:
        from slimllm.exporters.ort_session import OrtCausalLM

        runner = OrtCausalLM(Path(onnx_output["path"]) / "model.onnx", ctx.onnx.provider)
        rows[f"pruned (ONNX {onnx_output['variant']}, {runner.provider_used})"] = perplexity(
            runner.logits_fn(), windows
        )
    gguf_output = ctx.outputs.get(Stage.EXPORT_GGUF.value)
    if gguf_output:
        for info in read_export_record(Path(gguf_output["path"]))["files"].values():
            rows[f"pruned (GGUF {info['type']}, llama.cpp)"] = info["ppl"]
    result = {
        "data": source,
        "seq_len": int(windows.shape[1]),
        "windows": int(windows.shape[0]),
        "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
        "perplexity": rows,
    }
    path = ctx.out_dir / "evaluation.json"
    atomic_write_json(path, result)
    return {"path": str(path)}, result


def _profile(ctx: _Context) -> tuple[dict, dict]:
    from slimllm.profiler import ModelArtifacts, run_profile
    from slimllm.profiles import load_profile

    profile = load_profile(ctx.compile.profile)
    pruned = ModelArtifacts(Path(ctx.outputs[Stage.PRUNE.value]["path"]))
    onnx_output = ctx.outputs.get(Stage.EXPORT_ONNX.value)
    if onnx_output:
        pruned.onnx[onnx_output["variant"]] = Path(onnx_output["path"])
    gguf_output = ctx.outputs.get(Stage.EXPORT_GGUF.value)
    if gguf_output:
        pruned.gguf.update({label: Path(path) for label, path in gguf_output["files"].items()})
    dense = ModelArtifacts(ctx.dense_dir)
    if ctx.prune is None:  # compiling the dense model: the same artifacts on both sides
        dense = pruned
    target = ctx.out_dir / "latency"
    # Exports the profiler made in an earlier run are reused only where their source and settings still match.
    result = run_profile(dense, pruned, profile, target, ctx.compile.eval_data, ctx.progress)
    summary = {
        label: {"speedups": entry["speedups"], "backend": entry["backend"]} for label, entry in result.summary.items()
    }
    return {"path": str(target)}, {"profile": profile.name, "summary": summary, "partial": result.partial}


def _report(ctx: _Context) -> tuple[dict, dict]:
    from slimllm.report import write_compile_report

    paths = write_compile_report(ctx.out_dir)
    return {"path": str(ctx.out_dir / "report.md"), "external": True}, {"files": [str(p) for p in paths]}


_STAGE_BODIES: dict[Stage, Callable[[_Context], tuple[dict, dict]]] = {
    Stage.PRUNE: _prune,
    Stage.EXPORT_ONNX: _export_onnx,
    Stage.EXPORT_GGUF: _export_gguf,
    Stage.EVALUATE: _evaluate,
    Stage.PROFILE: _profile,
    Stage.REPORT: _report,
}
