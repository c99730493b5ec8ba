"""Stage `frontier` (`[compile] frontier = true`): this run's model and the dense one through the quantization
ladder of every backend of the profile, with the [frontier] pruned variants, measured alike; see `slimllm frontier`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimllm.core.artifacts import plain
from slimllm.core.report import Block, heading, paragraph
from slimllm.frontier.settings import FrontierSettings
from slimllm.pipeline.stages import CompileContext, StageSpec, register_stage
from slimllm.pipeline.stages.prune import checkpoint_of, final_stage

COMPILED_LABEL = "compiled"
"""The label of this run's own model among the frontier's candidates."""


def _keyed_by(ctx: CompileContext) -> dict[str, Any]:
    return {"dense_sha256": ctx.dense_sha, "frontier": plain(ctx.settings["frontier"]),
            "prune": plain(ctx.settings["prune"]), "heal": plain(ctx.settings["heal"]),
            "profile": ctx.compile.profile}


def _run(ctx: CompileContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from slimllm.frontier.run import run_frontier

    sections = {name: plain(ctx.settings[name]) for name in ("prune", "heal") if ctx.settings[name] is not None}
    for section in sections.values():
        section.pop("method", None)
    extra = {COMPILED_LABEL: checkpoint_of(ctx)} if ctx.settings["prune"] is not None else {}
    target = ctx.out_dir / "frontier"
    result = run_frontier(str(ctx.dense_dir), ctx.settings["frontier"], ctx.compile.profile or "cpu-x86", target,
                          sections, ctx.device, progress=ctx.progress, extra=extra)
    return {"path": str(target)}, {
        "choice": result.choice.to_dict(),
        "frontier": result.verdicts,
        "seconds": result.seconds,
        "compiled_from": final_stage(ctx),
        "charts": sorted(str(p) for p in Path(target).glob("frontier-*.png")),
    }


def _report(result: dict[str, Any], images: dict[str, bytes]) -> list[Block]:
    if not result.get("frontier"):
        return []
    blocks = [heading("Deployment frontier"), paragraph(result["choice"]["summary"])]
    for backend, axes in result["frontier"].items():
        on = [name for name, by in axes["decode"].items() if by is None]
        blocks.append(paragraph(f"{backend}: on the decode-speed/KLD frontier: {', '.join(on)}."))
    for chart in result.get("charts", []):
        if Path(chart).is_file():
            images[f"frontier/{Path(chart).name}"] = Path(chart).read_bytes()
            blocks.append({"kind": "img", "src": f"frontier/{Path(chart).name}", "alt": Path(chart).stem})
    blocks.append(paragraph("Every candidate's figures: `frontier/frontier.md` (and `frontier.html`)."))
    return blocks


FRONTIER = register_stage(
    StageSpec(
        name="frontier",
        run=_run,
        order=70,
        section="frontier",
        settings_class=FrontierSettings,
        report=_report,
        reads=("prune", "heal"),
        keyed_by=_keyed_by,
        enabled=lambda ctx: ctx.compile.frontier,
        writes=("frontier",),
    )
)
