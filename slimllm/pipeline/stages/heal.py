"""Stage `heal`: train the pruned checkpoint towards the dense model (CE + W·KL) before it is exported."""

from __future__ import annotations

import dataclasses
from typing import Any

from slimllm.core.artifacts import plain
from slimllm.pipeline.stages import CompileContext, StageSpec, register_stage, source_hash
from slimllm.pipeline.stages.prune import pruned_checkpoint
from slimllm.recovery.healing import HealSettings


def _keyed_by(ctx: CompileContext) -> dict[str, Any]:
    heal = ctx.settings["heal"]
    return {
        "heal": plain(heal),
        "training_text": source_hash(heal.calib),
        "teacher_sha256": ctx.dense_sha,
        "dtype": ctx.dtype,
    }


def _run(ctx: CompileContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from slimllm.recovery.healing import run_heal, work_directory

    settings = dataclasses.replace(ctx.settings["heal"], teacher=str(ctx.dense_dir))
    target = ctx.out_dir / "healed"
    resume = ctx.resume and work_directory(target).is_dir()
    result = run_heal(pruned_checkpoint(ctx), settings, target, force=True, device=ctx.device, dtype=ctx.dtype,
                      progress=ctx.progress, resume=resume, placement=ctx.placement, restart_stale=True)
    summary = result.to_dict()
    summary["resumed"] = resume
    return {"path": str(target)}, summary


HEAL = register_stage(
    StageSpec(
        name="heal",
        run=_run,
        order=20,
        section="heal",
        settings_class=HealSettings,
        reads=("prune",),
        keyed_by=_keyed_by,
        enabled=lambda ctx: ctx.settings.get("heal") is not None and ctx.settings.get("prune") is not None,
        writes=("healed", "healed.partial"),
    )
)
