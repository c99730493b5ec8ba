"""Stage `prune`: select and remove layers with the chosen method (or pass the dense model through)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimllm.core.artifacts import plain
from slimllm.core.report import Block, heading, paragraph, table
from slimllm.pipeline.stages import CompileContext, StageSpec, register_stage, source_hash
from slimllm.pruning.settings import PruneSettings
from slimllm.pruning.surgery import describe_removal

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


def _report(prune: dict[str, Any], images: dict[str, bytes]) -> list[Block]:
    blocks: list[dict[str, Any]] = [heading("Pruning")]
    if prune.get("method") in (None, "none"):
        return blocks + [paragraph("No layers removed (`--method none`): the dense model was exported.")]
    removed = prune.get("removed_layers", [])
    before, after = prune.get("params_before", 0), prune.get("params_after", 0)
    what = prune.get("summary") or (
        f"removed {len(removed)} of {prune.get('original_num_layers')} layers (original indices "
        f"{describe_removal(removed, prune.get('removed_kinds') or {}, prune.get('compute_removed') or {})})"
    )
    blocks.append({"kind": "p", "text": (
        f"Method `{prune['method']}`: {what}; parameters {before / 1e6:.1f}M -> {after / 1e6:.1f}M "
        f"({100 * (1 - after / before):.1f} % fewer). Pruning took {prune.get('seconds', 0):.0f} s"
        + (" (resumed from a checkpoint)." if prune.get("resumed") else ".")
    )})
    details = prune.get("details", {})
    if details.get("gate_trajectory"):
        images["gates.png"] = _gate_trajectory_png(details["gate_trajectory"], details.get("selection_order", []))
        blocks.append({"kind": "img", "src": "gates.png", "alt": "TRSP gate trajectory"})
    deltas = details.get("delta_before_stage2", {})
    if deltas:
        after_stage2 = details.get("delta_after_stage2", {})
        rows = [[layer, f"{deltas[layer]:.3f}", f"{after_stage2.get(layer, float('nan')):.3f}"] for layer in deltas]
        blocks.append(paragraph("Relative ||y - x|| of the selected layers around stage 2:"))
        blocks.append(table(["layer", "before stage 2", "after stage 2"], rows))
    return blocks


def _gate_trajectory_png(trajectory: list[list[float]], selection_order: list[int]) -> bytes:
    """Every layer's gate after every TRSP stage-1 round; the selected layers are drawn in colour."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    rounds = list(range(1, len(trajectory) + 1))
    layers = len(trajectory[0]) if trajectory else 0
    for layer in range(layers):
        values = [row[layer] for row in trajectory]
        if layer in selection_order:
            label = f"layer {layer} (round {selection_order.index(layer) + 1})"
            axis.plot(rounds, values, marker="o", linewidth=1.6, label=label)
        else:
            axis.plot(rounds, values, color="#bbbbbb", linewidth=0.8)
    axis.set_xlabel("stage-1 round")
    axis.set_ylabel("gate value at the end of the round")
    axis.set_title("TRSP gate trajectory (grey: kept layers)")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


PRUNE = register_stage(
    StageSpec(name="prune", run=_run, order=10, keyed_by=_keyed_by, writes=("pruned", "pruned.partial"),
              section="prune", settings_class=PruneSettings, report=_report)
)
