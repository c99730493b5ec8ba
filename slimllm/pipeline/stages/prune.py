"""Stage `prune`: select and remove layers with the chosen method (or pass the dense model through)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimllm.core.artifacts import plain
from slimllm.pipeline.stages import CompileContext, StageSpec, register_stage, source_hash

NO_PRUNING = "none"
"""`--method none`: compile the dense model as it is."""

REPORTED_DETAILS = ("gate_trajectory", "selection_order", "delta_before_stage2", "delta_after_stage2")
"""Method details the compile report shows (TRSP's gates and transfer); kept in the stage's result record."""


def _keyed_by(ctx: CompileContext) -> dict[str, Any]:
    prune = ctx.settings["prune"]
    return {
        "model": ctx.model_spec,
        "dense_sha256": ctx.dense_sha,
        "prune": plain(prune),
        "method_settings": plain(ctx.settings.get("method_settings")),
        "calibration_source": source_hash(prune.calib) if prune is not None else None,
        "dtype": ctx.dtype,
    }


def _run(ctx: CompileContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from slimllm.pruning.stage import run_prune, work_directory

    prune = ctx.settings["prune"]
    if prune is None:
        return {"path": str(ctx.dense_dir), "external": True, "sha256": ctx.dense_sha}, {"method": NO_PRUNING}
    target = ctx.out_dir / "pruned"
    resume = ctx.resume and work_directory(target).is_dir()
    result = run_prune(
        ctx.model_spec,
        prune,
        target,
        force=True,
        device=ctx.device,
        dtype=ctx.dtype,
        progress=ctx.progress,
        method_settings=ctx.settings.get("method_settings"),
        resume=resume,
        placement=ctx.placement,
    )
    summary = {
        "method": result.method,
        "removed_layers": result.removed_layers,
        "removed_kinds": {str(i): kind for i, kind in result.removed_kinds.items()},
        "compute_removed": result.compute_removed,
        "original_num_layers": result.original_num_layers,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "seconds": result.seconds,
        "resumed": resume,
        "summary": result.summary,
        "details": {key: result.details[key] for key in REPORTED_DETAILS if key in result.details},
    }
    return {"path": str(target)}, summary


def pruned_checkpoint(ctx: CompileContext) -> Path:
    """The prune stage's checkpoint: the pruned one, or the dense one with `--method none`."""
    return Path(ctx.outputs["prune"]["path"])


def final_stage(ctx: CompileContext) -> str:
    """The stage whose checkpoint is the final model: `heal` when it ran, else `prune`."""
    return "heal" if "heal" in ctx.outputs else "prune"


def checkpoint_of(ctx: CompileContext) -> Path:
    """The checkpoint the later stages work on: the healed one when healing ran, else the prune stage's."""
    return Path(ctx.outputs[final_stage(ctx)]["path"])


def checkpoint_sha(ctx: CompileContext) -> str:
    return ctx.outputs[final_stage(ctx)]["sha256"]


PRUNE = register_stage(
    StageSpec(name="prune", run=_run, keyed_by=_keyed_by, writes=("pruned", "pruned.partial"))
)
