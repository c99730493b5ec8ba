"""`slimllm inspect` and `slimllm validate`: look at an artifact, or re-run its parity checks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimllm.cli.app import DebugOpt, JsonOpt, app, emit, run_command
from slimllm.core.errors import ValidationError

ArtifactArg = Annotated[Path, typer.Argument(help="A .gguf file, an ONNX export directory or a checkpoint directory.")]


@app.command("inspect")
def inspect_command(artifact: ArtifactArg, as_json: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Print an artifact's metadata and a tensor or graph summary."""

    def action() -> None:
        from slimllm.exporters.inspect import inspect_artifact

        summary = inspect_artifact(artifact)
        lines = [f"{summary['kind']}: {summary['path']} ({summary['bytes'] / 2**20:.1f} MiB)"]
        if summary["kind"] == "gguf":
            for key, value in summary["metadata"].items():
                lines.append(f"  {key} = {value}")
            lines.append(
                f"  tensors: {summary['tensor_count']} in {summary['blocks']} blocks, "
                f"{summary['parameters'] / 1e6:.1f}M parameters, types {summary['tensor_types']}"
            )
            lines += [f"    {t['name']:<28} {t['type']:<6} {t['shape']}" for t in summary["tensors"]]
        elif summary["kind"] == "onnx":
            lines.append(f"  opset {summary['opset']}")
            lines += [f"  input  {i['name']} {i['shape']}" for i in summary["inputs"][:6]]
            if len(summary["inputs"]) > 6:
                lines.append(f"  ... {len(summary['inputs']) - 6} more inputs (KV cache)")
            lines += [f"  output {o['name']} {o['shape']}" for o in summary["outputs"][:3]]
            top = list(summary["op_types"].items())[:12]
            lines.append("  ops: " + ", ".join(f"{op} x{count}" for op, count in top))
        else:
            lines.append(
                f"  {summary['architecture']}, {summary['layers']} layers, hidden {summary['hidden_size']}, "
                f"vocab {summary['vocab_size']}, tied embeddings {summary['tied_embeddings']}"
            )
            if summary["pruning"]:
                pruning = summary["pruning"]
                lines.append(
                    f"  pruned by {pruning['method']}: removed {pruning['removed_layers']} of "
                    f"{pruning['original_num_layers']} layers"
                )
        emit(summary, as_json, lines)

    run_command(debug, action)


@app.command("validate")
def validate_command(
    artifact: ArtifactArg,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference", help="Checkpoint to compare with (default: the one the export records).", show_default=False
        ),
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option("--eval-data", help="Text for the perplexity checks.", show_default=False)
    ] = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Re-run the parity checks of an ONNX export or a GGUF file against a checkpoint; exit 1 on a mismatch."""

    def action() -> None:
        from slimllm.exporters.validate import validate_artifact

        report = validate_artifact(artifact, reference, eval_data)
        lines = [f"{'passed' if report.passed else 'FAILED'}: {report.artifact}"]
        lines += [f"  {'ok  ' if c.passed else 'FAIL'} {c.describe()}" for c in report.checks]
        emit(report.to_dict(), as_json, lines)
        if not report.passed:
            raise ValidationError(f"{report.artifact} does not match {report.context.get('reference_checkpoint')}")

    run_command(debug, action)
