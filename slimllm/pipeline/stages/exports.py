"""Stages `export_onnx` and `export_gguf`: lower the checkpoint and check it against PyTorch."""

from __future__ import annotations

from typing import Any

from slimllm.core.artifacts import plain
from slimllm.core.report import Block, heading, paragraph, table
from slimllm.exporters.gguf import GgufExportSettings
from slimllm.exporters.onnx import OnnxExportSettings
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


def _onnx_report(onnx: dict[str, Any], _images: dict[str, bytes]) -> list[Block]:
    rows = [[c["name"], c["passed"], _figure(c), _bound(c)] for c in onnx["checks"]]
    return [
        heading("Parity of the exports: ONNX"),
        paragraph(f"ONNX `{onnx['variant']}` against PyTorch, validated on {onnx['provider']}:"),
        table(["check", "passed", "figure", "bound"], rows),
        *[paragraph(note) for note in onnx.get("notes", [])],
    ]


def _gguf_report(gguf: dict[str, Any], _images: dict[str, bytes]) -> list[Block]:
    rows = [
        [name, f"{info['bytes'] / 2**20:.1f} MiB", f"{info['ppl']:.3f}", f"{info['ppl_ratio']:.4f}",
         f"{100 * info['argmax_agreement']:.1f} %", info["passed"]]
        for name, info in gguf["files"].items()
    ]
    blocks = [
        heading("Parity of the exports: GGUF"),
        paragraph("GGUF files in llama.cpp against PyTorch:"),
        table(["file", "size", "PPL", "PPL / PyTorch", "argmax agreement", "passed"], rows),
    ]
    token_checks = [
        c for checks in gguf["checks"].values() for c in checks if c["name"].startswith("token ids identical")
    ]
    if token_checks:
        blocks.append(paragraph(f"Tokenizer: {token_checks[0]['name']} for every file."))
    blocks += [{"kind": "code", "text": f"[{label}] {text}"} for label, text in gguf.get("greedy", {}).items()]
    return blocks


def _figure(check: dict[str, Any]) -> str:
    if check.get("value") is None:
        return str(check.get("metric"))
    return f"{check['metric']} {check['value']:.4g}"


def _bound(check: dict[str, Any]) -> str:
    return "" if check.get("bound") is None else f"{check['bound']:.3g}"


EXPORT_ONNX = register_stage(
    StageSpec(
        name="export_onnx",
        run=_run_onnx,
        order=30,
        section="onnx",
        settings_class=OnnxExportSettings,
        report=_onnx_report,
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
        order=31,
        section="gguf",
        settings_class=GgufExportSettings,
        report=_gguf_report,
        reads=("prune", "heal"),
        keyed_by=lambda ctx: {"gguf": plain(ctx.settings["gguf"])},
        enabled=_wants("gguf"),
        writes=("gguf", "gguf.failed"),
    )
)
