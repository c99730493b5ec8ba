"""Stage `report`: report.md, report.html and their images, from the blocks every stage of this run contributes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimllm.core.report import Block, heading, paragraph, table, write_report
from slimllm.pipeline.stages import CompileContext, StageSpec, compile_stages, register_stage


def _run(ctx: CompileContext) -> tuple[dict[str, Any], dict[str, Any]]:
    blocks, images = report_blocks(ctx.out_dir, ctx.manifest.data)
    paths = write_report(ctx.out_dir, blocks, images)
    return {"path": str(ctx.out_dir / "report.md"), "external": True}, {"files": [str(p) for p in paths]}


def report_blocks(out_dir: Path, manifest: dict[str, Any]) -> tuple[list[Block], dict[str, bytes]]:
    """The report of a compile run's manifest: a heading, each stage's blocks in pipeline order, the stages' table,
    the command that reproduces it and the library versions."""
    run_stages = manifest.get("run_stages") or list(manifest.get("stages", {}))
    # Only this run's stages: an earlier run's exports or latency in the same directory are not this run's results.
    stages = {name: manifest["stages"][name] for name in run_stages if name in manifest.get("stages", {})}
    images: dict[str, bytes] = {}
    blocks: list[Block] = [
        {"kind": "h1", "text": f"slimllm compile report: {manifest['model']}"},
        paragraph(f"Output directory `{out_dir}`; dense checkpoint `{manifest['dense_checkpoint']}`."),
    ]
    for spec in compile_stages():
        result = (stages.get(spec.name) or {}).get("result")
        if spec.report is not None and (result or spec.name == "prune"):
            blocks += spec.report(result or {}, images)
    blocks.append(heading("Stages"))
    blocks.append(table(["stage", "status", "seconds", "finished"], [_stage_row(n, e) for n, e in stages.items()]))
    blocks.append(heading("Reproduce"))
    blocks.append({"kind": "code", "text": manifest.get("command", "")})
    versions = next((s.get("versions") for s in stages.values() if s.get("versions")), {})
    if versions:
        blocks.append(paragraph("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."))
    return blocks, images


def _stage_row(name: str, entry: dict[str, Any]) -> list[Any]:
    if name == "report":  # this very file: it is being written, so it is done once anyone reads it
        return [name, "done", "", "(this report)"]
    status = entry.get("status")
    if entry.get("reused_at") and status == "done" and entry.get("finished", "") < entry["reused_at"]:
        status = "reused"
    return [name, status, entry.get("seconds", ""), entry.get("finished") or ""]


REPORT = register_stage(
    StageSpec(
        name="report",
        run=_run,
        order=100,
        reads=None,  # every stage before it
        writes=("report.md", "report.html", "gates.png", "latency.png"),
    )
)
