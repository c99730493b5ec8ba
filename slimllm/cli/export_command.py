"""`slimllm export`: lower a checkpoint to ONNX or GGUF and validate it against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimllm.cli.app import DebugOpt, JsonOpt, ModelArg, ModelOpt, app, emit, pick_model, run_command
from slimllm.errors import UserInputError


def _split_types(values: list[str] | None) -> list[str]:
    """`--outtype f16,q8_0 --outtype q4_k_m` -> ['f16', 'q8_0', 'q4_k_m']."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


@app.command("export")
def export_command(
    checkpoint: ModelArg = None,
    model_option: ModelOpt = None,
    target: Annotated[str | None, typer.Option("--target", "-t", help="onnx or gguf.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory.", show_default=False)] = None,
    engine: Annotated[str, typer.Option("--engine", help="ONNX engine: optimum or genai.")] = "optimum",
    dtype: Annotated[str, typer.Option("--dtype", help="ONNX precision: fp32 or fp16 (CUDA only).")] = "fp32",
    quant: Annotated[str, typer.Option("--quant", help="ONNX quantization: none, int8 or int4.")] = "none",
    block_size: Annotated[int, typer.Option("--block-size", help="ONNX int4 block size.")] = 32,
    opset: Annotated[
        int | None, typer.Option("--opset", help="ONNX opset (default: the exporter's).", show_default=False)
    ] = None,
    provider: Annotated[
        str, typer.Option("--provider", help="onnxruntime EP for validation: auto, cpu or cuda.")
    ] = "auto",
    outtype: Annotated[
        list[str] | None,
        typer.Option(
            "--outtype",
            help="GGUF type(s): f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k, ... Repeat or comma-separate.",
            show_default=False,
        ),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option("--eval-data", help="Text for the perplexity checks (default: a built-in paragraph)."),
    ] = None,
    eval_seq_len: Annotated[
        int | None, typer.Option("--eval-seq-len", help="Tokens per perplexity window.", show_default=False)
    ] = None,
    eval_windows: Annotated[
        int | None, typer.Option("--eval-windows", help="Perplexity windows scored.", show_default=False)
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="llama.cpp threads (GGUF).", show_default=False)
    ] = None,
    allow_full_attention: Annotated[
        bool,
        typer.Option(
            "--allow-full-attention",
            help="GGUF: export a sliding-window model that llama.cpp runs with full attention (recorded).",
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an output directory that slimllm wrote earlier.")
    ] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Export a checkpoint to ONNX or GGUF; the command fails if the export does not match PyTorch."""

    def action() -> None:
        from slimllm.exporters.parity import CheckResult
        from slimllm.models import checkpoint_directory

        if target not in ("onnx", "gguf"):
            raise UserInputError(f"--target must be onnx or gguf, got {target!r}")
        if out is None:
            raise UserInputError("--out is required: the directory to write the export to")
        source = checkpoint_directory(pick_model(checkpoint, model_option))
        evaluation = {
            key: value
            for key, value in (("eval_seq_len", eval_seq_len), ("eval_windows", eval_windows))
            if value is not None
        }
        if target == "onnx":
            if outtype or allow_full_attention:
                raise UserInputError(
                    "--outtype and --allow-full-attention are GGUF options; for ONNX use --dtype and --quant"
                )
            from slimllm.exporters.onnx import OnnxExportSettings, export_onnx

            settings = OnnxExportSettings(
                engine=engine,
                dtype=dtype,
                quant=quant,
                block_size=block_size,
                opset=opset,
                provider=provider,
                eval_data=eval_data,
                **evaluation,
            )
            result = export_onnx(source, out, settings, force=force)
            checks = result.validation["checks"]
            lines = [f"exported {result.variant} to {result.out_dir} (validated on {result.provider})"]
        else:
            if quant != "none" or dtype != "fp32" or engine != "optimum":
                raise UserInputError("--engine, --dtype and --quant are ONNX options; for GGUF use --outtype")
            from slimllm.exporters.gguf import GgufExportSettings, export_gguf

            settings = GgufExportSettings(
                outtypes=_split_types(outtype) or ["f16"],
                eval_data=eval_data,
                threads=threads,
                allow_full_attention=allow_full_attention,
                **evaluation,
            )
            result = export_gguf(source, out, settings, force=force)
            checks = [c for report in result.validation["files"].values() for c in report["checks"]]
            lines = [f"exported {len(result.files)} GGUF file(s) to {result.out_dir}"]
            for name, info in result.files.items():
                lines.append(
                    f"  {name}: {info['bytes'] / 2**20:.1f} MiB, PPL {info['ppl']:.3f} "
                    f"(PyTorch {info['reference_ppl']:.3f}, ratio {info['ppl_ratio']:.4f})"
                )
            for label, text in result.greedy_samples.items():
                lines.append(f"  greedy [{label}]: {text[:120]!r}")
        lines += [f"  check {CheckResult(**c).describe()}" for c in checks]
        emit(result.to_dict(), as_json, lines)

    run_command(debug, action)
