"""Stages `export_onnx` and `export_gguf`: lower the checkpoint and check it against PyTorch."""

from __future__ import annotations

from typing import Any

from slimllm.core.artifacts import plain
from slimllm.pipeline.stages import CompileContext, StageSpec, register_stage
from slimllm.pipeline.stages.prune import checkpoint_of


def _wants(target: str):
    return lambda ctx: ctx.compile.target.value in (target, "all")


def _run_onnx(ctx: CompileContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from slimllm.exporters.onnx import export_onnx

    target = ctx.out_dir / "onnx"
    result = export_onnx(checkpoint_of(ctx), target, ctx.settings["onnx"], force=True)
    return {"path": str(target), "variant": result.variant}, {
        "variant": result.variant,
        "provider": result.provider,
        "files": result.files,
        "checks": check_summaries(result.validation["checks"]),
        "notes": result.notes,
    }


def _run_gguf(ctx: CompileContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from slimllm.exporters.gguf import export_gguf

    target = ctx.out_dir / "gguf"
    result = export_gguf(checkpoint_of(ctx), target, ctx.settings["gguf"], force=True)
    files = {info["type"]: str(target / name) for name, info in result.files.items()}
    return {"path": str(target), "files": files}, {
        "files": result.files,
        "greedy": result.greedy_samples,
        "checks": {name: check_summaries(report["checks"]) for name, report in result.validation["files"].items()},
    }


def check_summaries(checks: list[dict]) -> list[dict]:
    """The figures of each parity check that the report shows."""
    return [
        {k: check.get(k) for k in ("name", "passed", "metric", "value", "bound")}
        | {"argmax_agreement": check.get("details", {}).get("argmax_agreement")}
        for check in checks
    ]


EXPORT_ONNX = register_stage(
    StageSpec(
        name="export_onnx",
        run=_run_onnx,
        reads=("prune", "heal"),
        keyed_by=lambda ctx: {"onnx": plain(ctx.settings["onnx"])},
        enabled=_wants("onnx"),
        writes=("onnx", "onnx.failed"),
    )
)
EXPORT_GGUF = register_stage(
    StageSpec(
        name="export_gguf",
        run=_run_gguf,
        reads=("prune", "heal"),
        keyed_by=lambda ctx: {"gguf": plain(ctx.settings["gguf"])},
        enabled=_wants("gguf"),
        writes=("gguf", "gguf.failed"),
    )
)
