"""`slimllm compile`: prune -> heal -> export -> parity -> evaluate -> profile -> report, reproducible and resumable.

    >>> import slimllm
    >>> result = slimllm.compile("smollm2-135m", out="runs/smollm2", target="all", remove=8)
    >>> result.report_path
    PosixPath('runs/smollm2/report.md')

Each stage reads the artifacts of the stages before it and writes its own under the output directory:

    pruned/        the pruned checkpoint (slimllm_pruning.json inside)       stage `prune`
    healed/        the healed checkpoint (slimllm_healing.json inside)       stage `heal` (when healing)
    onnx/          ONNX export + validation.json                             stage `export_onnx`
    gguf/          GGUF files + validation.json                              stage `export_gguf`
    evaluation.json  perplexity of dense, pruned and every artifact           stage `evaluate`
    latency/       latency.json/.md/.png                                      stage `profile`
    report.md, report.html, gates.png, latency.png                            stage `report`

The stages are registered in `slimllm.pipeline.stages` (one module each); this module chains the enabled ones.

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
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from slimllm.core.artifacts import (
    OUTPUT_MARKER,
    atomic_write_json,
    check_output_directory,
    digest,
    library_versions,
    local_inputs,
    machine_info,
    mark_output,
    plain,
    refuse_unsafe_replacement,
    sha256_tree,
)
from slimllm.core.errors import SlimllmError, UserInputError, ValidationError
from slimllm.core.memory import PeakMemory
from slimllm.core.placement import Placement
from slimllm.pipeline.settings import NO_PRUNING, CompileSettings, Target, resolve_settings
from slimllm.pipeline.stages import CompileContext, Progress, StageSpec, compile_stages, stage_inputs

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 2

__all__ = ["MANIFEST_FILE", "NO_PRUNING", "CompileResult", "CompileSettings", "Manifest", "Target", "compile"]


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


class Manifest:
    """`manifest.json`: one entry per stage, rewritten atomically on every change."""

    def __init__(self, out_dir: Path, header: dict[str, Any]) -> None:
        self.path = out_dir / MANIFEST_FILE
        existing = _read_manifest(out_dir) or {}
        self.data = {**header, "stages": existing.get("stages", {})}

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def update(self, name: str, **entry: Any) -> None:
        self.data["stages"][name] = {**self.data["stages"].get(name, {}), **entry}
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "stages" in data else None


def _compile_outputs() -> set[str]:
    """Everything a compile run writes into its directory; `--force` removes these and nothing else."""
    return {name for spec in compile_stages() for name in spec.writes} | {MANIFEST_FILE, OUTPUT_MARKER}


def _prepare_output(out_dir: Path, model_spec: str, force: bool, protected: list[Path]) -> None:
    """Check `out_dir` before any work. An earlier run of the same model is continued; another model's run, or a
    slimllm output of another kind, is replaced only with --force; anything slimllm did not write is never touched."""
    previous = _read_manifest(out_dir)
    if previous is not None and not force:
        if previous.get("model") == model_spec:
            return
        raise UserInputError(
            f"--out {out_dir} holds a compile run of another model ({previous.get('model')}); pass --force to "
            "replace it or choose another --out"
        )
    check_output_directory(out_dir, force=force, protected=protected)


def _drop_stale_stages(out_dir: Path, manifest: Manifest, stages: list[StageSpec]) -> None:
    """An earlier run's outputs of a stage this run does not run (another --target, no profile, no healing) are
    removed with their manifest entries: nothing left in the directory can be mistaken for this run's."""
    running = {spec.name for spec in stages}
    for spec in compile_stages():
        if spec.name in running:
            continue
        if manifest.data["stages"].pop(spec.name, None) is not None:
            log.info("stage %s does not run this time; removing its earlier outputs", spec.name)
        for name in spec.writes:
            _remove_output(out_dir / name)


def _remove_output(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _clear_compile_outputs(out_dir: Path) -> None:
    """Remove what an earlier compile wrote into `out_dir` (and its leftovers), keeping anything else."""
    if not out_dir.is_dir():
        return
    names = _compile_outputs()
    for entry in out_dir.iterdir():
        leftover = any(entry.name.startswith((f".{name}.tmp-", f".{name}.old-")) for name in names)
        if entry.name in names or leftover:
            _remove_output(entry)


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
    dtype: str = "auto",
    progress: Progress | None = None,
    command: str | None = None,
    placement: Placement | None = None,
) -> CompileResult:
    """Run the whole pipeline into `out`. Settings: class defaults < `recipe` < `overrides` < explicit arguments.

    `target` is onnx, gguf or all (None: the recipe's, else all); `method` is a pruning method or `none` (export
    the dense model); `profile` is a profile name or path, None to skip the latency stage, or "default" (the
    recipe's, else cpu-x86); `overrides` maps a recipe section (`compile`, `prune`, `trsp`, `onnx`, `gguf`) to
    setting values given as flags (None means "not given"). A spreading `placement` (`--device-map auto`) places
    the PyTorch models of the prune, heal, evaluate and accuracy stages with accelerate.
    """
    started = time.perf_counter()
    out_dir = Path(out)
    settings = resolve_compile_settings(recipe, overrides, target, eval_data, profile, method, remove, ratio, calib)
    protected = local_inputs(model)
    _prepare_output(out_dir, model, force, protected)
    context = _context(model, out_dir, settings, resume, device, progress)
    context.dtype = dtype
    context.placement = placement
    protected.append(context.dense_dir)
    _validate_before_work(context.dense_dir, settings, device, placement)
    if force:
        refuse_unsafe_replacement(out_dir, protected)
        _clear_compile_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mark_output(out_dir)
    stages = [spec for spec in compile_stages() if spec.enabled(context)]
    context.manifest = Manifest(out_dir, _header(model, context, stages, command, recipe))
    _drop_stale_stages(out_dir, context.manifest, stages)
    context.manifest.save()
    reused: list[str] = []
    ran: list[str] = []
    for spec in stages:
        (ran if _run_stage(spec, context) else reused).append(spec.name)
    context.manifest.data["finished"] = True
    context.manifest.save()
    return CompileResult(
        out_dir, out_dir / "report.md", context.manifest.data, reused, ran, time.perf_counter() - started
    )


def resolve_compile_settings(
    recipe, overrides, target, eval_data, profile, method, remove, ratio, calib
) -> dict[str, Any]:
    """Every stage's settings for a compile: class defaults < recipe < `overrides` < explicit arguments."""
    from slimllm.pipeline.recipes import load_recipe

    recipe_sections = load_recipe(Path(recipe)) if recipe is not None else {}
    flag_sections = {
        section: {k: v for k, v in values.items() if v is not None} for section, values in (overrides or {}).items()
    }
    compile_flags = {**flag_sections.get("compile", {}), "target": target, "eval_data": eval_data}
    if profile != "default":  # "default": the recipe's profile, else cpu-x86; None or "none": no latency stage
        compile_flags["profile"] = profile if profile is not None else "none"
    return resolve_settings(recipe_sections, flag_sections, compile_flags, method, remove, ratio, calib)


def _context(model: str, out_dir: Path, settings, resume: bool, device: str, progress) -> CompileContext:
    from slimllm.models.loading import checkpoint_directory

    dense_dir = checkpoint_directory(model)
    return CompileContext(
        out_dir=out_dir,
        model_spec=model,
        dense_dir=dense_dir,
        dense_sha=sha256_tree(dense_dir),
        settings=settings,
        resume=resume,
        device=device,
        progress=progress,
    )


def _header(model: str, ctx: CompileContext, stages: list[StageSpec], command, recipe) -> dict[str, Any]:
    settings = ctx.settings
    recorded = {"compile": settings["compile"], "prune": settings["prune"]}
    if settings["method_section"]:
        recorded[settings["method_section"]] = settings["method_settings"]
    if settings["heal"] is not None:
        recorded["heal"] = settings["heal"]
    recorded |= {"onnx": settings["onnx"], "gguf": settings["gguf"]}
    return {
        "format_version": MANIFEST_FORMAT,
        "model": model,
        "dense_checkpoint": str(ctx.dense_dir),
        "command": command or _python_call(model, ctx.out_dir, settings["compile"], settings["method"].value, recipe),
        "settings": plain(recorded),
        "run_stages": [spec.name for spec in stages],
        "placement": ctx.placement.describe() if ctx.placement is not None else "one device",
        "finished": False,
        "machine": machine_info(),
    }


def _validate_before_work(
    dense_dir: Path, settings: dict[str, Any], device: str = "auto", placement: Placement | None = None
) -> None:
    """Errors that would otherwise surface minutes into the run: k and protection, every backend a stage needs,
    a stage that cannot fit in memory."""
    from slimllm.models.architectures import architecture_for
    from slimllm.models.attention_free import read_config
    from slimllm.pruning.candidates import candidate_layers, check_removable, layers_to_remove

    config = read_config(str(dense_dir))
    architecture_for(config)
    prune_settings, compile_settings = settings["prune"], settings["compile"]
    if prune_settings is not None and prune_settings.method.spec.removes_layers:
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
        from slimllm.latency.profiler import check_backends_available
        from slimllm.latency.profiles import load_profile

        check_backends_available(load_profile(compile_settings.profile))
    if placement is not None and placement.spread:
        _refuse_training_when_spread(config, settings)
    if compile_settings.memory_check:
        from slimllm.core.device import resolve_device
        from slimllm.pipeline.plan import plan_compile

        plan_compile(config, settings, str(resolve_device(device)), placement=placement).check()


def _refuse_training_when_spread(config, settings: dict[str, Any]) -> None:
    """A run with `--device-map` whose prune or heal stage trains weights fails before any work, not after the
    stages before it."""
    from slimllm.core.placement import refuse_weight_training
    from slimllm.models.architectures import architecture_for
    from slimllm.pruning.stage import prune_placement_needs
    from slimllm.recovery.healing import heal_placement_needs

    if settings["prune"] is not None:
        refuse_weight_training(
            prune_placement_needs(settings["prune"], settings["method_settings"], architecture_for(config))
        )
    if settings["heal"] is not None:
        needs = heal_placement_needs(settings["heal"])
        refuse_weight_training(replace(needs, alternatives=[*needs.alternatives, "--no-heal"]))


def _python_call(model, out_dir, settings: CompileSettings, method: str, recipe) -> str:
    recipe_args = ["--recipe", str(recipe)] if recipe else []
    parts = ["slimllm", "compile", model, "--target", settings.target.value, "--method", method, *recipe_args]
    return shlex.join([*parts, "--out", str(out_dir)])


def _run_stage(spec: StageSpec, ctx: CompileContext) -> bool:
    """Run one stage unless its inputs are unchanged and its outputs intact. Returns True if it ran."""
    manifest = ctx.manifest
    inputs = stage_inputs(spec, ctx)
    key = digest(inputs)
    previous = manifest.stage(spec.name)
    if previous and previous.get("status") == "done" and previous.get("key") == key:
        outputs = previous.get("outputs", {})
        if _outputs_intact(outputs):
            ctx.outputs[spec.name], ctx.results[spec.name] = outputs, previous.get("result") or {}
            manifest.update(spec.name, reused_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            log.info("stage %s: inputs unchanged, reusing %s", spec.name, outputs.get("path"))
            return False
    manifest.update(
        spec.name,
        status="running",
        key=key,
        inputs=plain(inputs),
        started=time.strftime("%Y-%m-%dT%H:%M:%S"),
        finished=None,
        versions=library_versions(),
        error=None,
    )
    started = time.perf_counter()
    sink = ctx.progress
    if sink is not None:  # one bar per stage: every callback of the stage's work is labelled with the stage
        ctx.progress = partial(_stage_progress, sink, spec.name)
        ctx.progress(0, 1)
    try:
        with PeakMemory() as peak:
            outputs, result = _run_body(spec, ctx, started)
    finally:
        ctx.progress = sink
    if "path" in outputs and "sha256" not in outputs:
        outputs["sha256"] = sha256_tree(Path(outputs["path"]))
    ctx.outputs[spec.name], ctx.results[spec.name] = outputs, plain(result)
    manifest.update(
        spec.name,
        status="done",
        outputs=outputs,
        result=plain(result),
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        seconds=round(time.perf_counter() - started, 3),
        device=ctx.device,
        **peak.to_dict(),
    )
    return True


def _stage_progress(sink: Progress, stage_name: str, done: int, total: int, /, **postfix: Any) -> None:
    sink(done, total, bar=stage_name, **postfix)


def _run_body(spec: StageSpec, ctx: CompileContext, started: float) -> tuple[dict, dict]:
    """The stage's body; the manifest records an interruption or a failure before it propagates."""
    try:
        return spec.run(ctx)
    except KeyboardInterrupt:
        ctx.manifest.update(spec.name, status="interrupted", seconds=round(time.perf_counter() - started, 3))
        raise
    except SlimllmError as exc:
        seconds = round(time.perf_counter() - started, 3)
        ctx.manifest.update(spec.name, status="failed", error=str(exc), seconds=seconds)
        if isinstance(exc, ValidationError):
            raise ValidationError(f"stage {spec.name} failed: {exc}") from exc
        raise
    except BaseException as exc:
        ctx.manifest.update(spec.name, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _outputs_intact(outputs: dict[str, Any]) -> bool:
    path = outputs.get("path")
    if path is None:
        return True
    path = Path(path)
    if not path.exists():
        return False
    expected = outputs.get("sha256")
    return expected is None or outputs.get("external") or sha256_tree(path) == expected
