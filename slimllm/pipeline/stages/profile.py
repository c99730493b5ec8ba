"""Stage `profile`: the latency of the pruned model against the dense one on the chosen target profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimllm.core.report import Block, heading
from slimllm.pipeline.stages import CompileContext, StageSpec, register_stage
from slimllm.pipeline.stages.prune import checkpoint_of, checkpoint_sha

REPORTED_PAYLOAD = ("benchmark", "partial", "profile", "threads", "models", "ideal_flops_note", "summary", "machine",
                    "versions", "notes", "failed_backends", "wall_seconds")
"""The parts of `latency.json` kept in the stage's result record (the raw samples stay in the file)."""


def _keyed_by(ctx: CompileContext) -> dict[str, Any]:
    from slimllm.latency.profiles import load_profile

    return {"dense_sha256": ctx.dense_sha, "profile": load_profile(ctx.compile.profile).to_dict()}


def _run(ctx: CompileContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from slimllm.latency.profiler import ModelArtifacts, run_profile
    from slimllm.latency.profiles import load_profile

    profile = load_profile(ctx.compile.profile)
    pruned = ModelArtifacts(checkpoint_of(ctx), sha256=checkpoint_sha(ctx))
    onnx_output = ctx.outputs.get("export_onnx")
    if onnx_output:
        pruned.onnx[onnx_output["variant"]] = Path(onnx_output["path"])
    gguf_output = ctx.outputs.get("export_gguf")
    if gguf_output:
        pruned.gguf.update({label: Path(path) for label, path in gguf_output["files"].items()})
    dense = ModelArtifacts(ctx.dense_dir, sha256=ctx.dense_sha)
    if ctx.settings["prune"] is None:  # compiling the dense model: the same artifacts on both sides
        dense = pruned
    target = ctx.out_dir / "latency"
    # Exports the profiler made in an earlier run are reused only where their source and settings still match.
    result = run_profile(dense, pruned, profile, target, ctx.compile.eval_data, ctx.progress)
    summary = {
        label: {"speedups": entry["speedups"], "backend": entry["backend"]} for label, entry in result.summary.items()
    }
    payload = {key: result.payload[key] for key in REPORTED_PAYLOAD if key in result.payload}
    return {"path": str(target)}, {
        "profile": profile.name,
        "summary": summary,
        "partial": result.partial,
        "latency": payload,
    }


def _report(result: dict[str, Any], images: dict[str, bytes]) -> list[Block]:
    from slimllm.latency.report import latency_blocks, latency_chart_png

    latency = result.get("latency")
    if not latency:
        return []
    blocks = [heading("Latency"), *latency_blocks(latency)]
    if latency["summary"]:
        images["latency.png"] = latency_chart_png(latency)
        blocks.append({"kind": "img", "src": "latency.png", "alt": "latency chart"})
    return blocks


PROFILE = register_stage(
    StageSpec(
        name="profile",
        run=_run,
        order=60,
        report=_report,
        reads=("prune", "heal", "export_onnx", "export_gguf"),
        keyed_by=_keyed_by,
        enabled=lambda ctx: ctx.compile.profile is not None,
        writes=("latency",),
    )
)
