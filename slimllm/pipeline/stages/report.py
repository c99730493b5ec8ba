"""Stage `report`: report.md, report.html and gates.png from the records of this run's stages."""

from __future__ import annotations

from typing import Any

from slimllm.pipeline.stages import CompileContext, StageSpec, register_stage


def _run(ctx: CompileContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from slimllm.latency.report import write_compile_report

    paths = write_compile_report(ctx.out_dir, ctx.manifest.data)
    return {"path": str(ctx.out_dir / "report.md"), "external": True}, {"files": [str(p) for p in paths]}


REPORT = register_stage(
    StageSpec(
        name="report",
        run=_run,
        reads=("prune", "heal", "export_onnx", "export_gguf", "evaluate", "accuracy", "profile"),
        writes=("report.md", "report.html", "gates.png", "latency.png"),
    )
)
