"""`slimllm compile`: the whole pipeline, from a Hugging Face model to validated ONNX/GGUF and a report."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from slimllm.cli.app import (
    DebugOpt,
    DeviceOpt,
    JsonOpt,
    ModelArg,
    ModelOpt,
    ProgressBar,
    app,
    emit,
    pick_model,
    run_command,
)
from slimllm.cli.export_command import _split_types
from slimllm.errors import UserInputError


@app.command("compile")
def compile_command(
    model: ModelArg = None,
    model_option: ModelOpt = None,
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="onnx, gguf or all (default: the recipe's, else all).")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option("--method", help="trsp (default), shortgpt, angular, sleb, last, random or none (no pruning)."),
    ] = None,
    remove: Annotated[
        int | None, typer.Option("--remove", "-k", help="Number of layers to remove.", show_default=False)
    ] = None,
    ratio: Annotated[
        float | None, typer.Option("--ratio", help="Fraction of layers to remove (0-1).", show_default=False)
    ] = None,
    calib: Annotated[
        str | None, typer.Option("--calib", help="Calibration text: self (offline default), wikitext2, c4 or a file.")
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option("--eval-data", help="Evaluation text (default: a built-in paragraph).", show_default=False),
    ] = None,
    eval_seq_len: Annotated[
        int | None, typer.Option("--eval-seq-len", help="Tokens per evaluation window (512).", show_default=False)
    ] = None,
    eval_windows: Annotated[
        int | None, typer.Option("--eval-windows", help="Evaluation windows (8).", show_default=False)
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option("--profile", "-p", help="Latency profile: built-in name (cpu-x86, cuda...), TOML path or none."),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe", help="TOML recipe: [compile], [prune], [trsp], [onnx], [gguf] tables; flags override it."
        ),
    ] = None,
    onnx_quant: Annotated[
        str | None, typer.Option("--onnx-quant", help="ONNX quantization: none, int8 or int4.", show_default=False)
    ] = None,
    onnx_engine: Annotated[
        str | None, typer.Option("--onnx-engine", help="ONNX engine: optimum or genai.", show_default=False)
    ] = None,
    outtype: Annotated[
        list[str] | None,
        typer.Option("--outtype", help="GGUF type(s) (default f16,q8_0,q4_k_m).", show_default=False),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory.", show_default=False)] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a killed run (TRSP from its last round checkpoint).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace another run slimllm wrote in --out.")] = False,
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Prune, export, check parity, evaluate and profile; writes DIR/report.md, report.html and manifest.json."""

    def action() -> None:
        from slimllm.pipeline import compile as compile_pipeline

        if out is None:
            raise UserInputError("--out is required: the directory of the compile run")
        overrides = {
            "compile": {"eval_seq_len": eval_seq_len, "eval_windows": eval_windows},
            "onnx": {"quant": onnx_quant, "engine": onnx_engine},
            "gguf": {"outtypes": _split_types(outtype) or None},
        }
        bar = ProgressBar("compile")
        try:
            result = compile_pipeline(
                pick_model(model, model_option),
                out=out,
                target=target,
                method=method,
                remove=remove,
                ratio=ratio,
                calib=calib,
                eval_data=eval_data,
                profile=profile if profile is not None else "default",
                recipe=recipe,
                overrides=overrides,
                resume=resume,
                force=force,
                device=device,
                progress=bar,
                command=shlex.join(["slimllm", *sys.argv[1:]]) if sys.argv[1:2] == ["compile"] else None,
            )
        finally:
            bar.close()
        stages = {name: result.manifest["stages"][name] for name in result.manifest["run_stages"]}
        lines = []
        prune = stages["prune"].get("result", {})
        if prune.get("removed_layers") is not None:
            removed, total = prune["removed_layers"], prune["original_num_layers"]
            lines.append(f"removed layers {removed} of {total} ({prune['method']})")
        for name, value in stages.get("evaluate", {}).get("result", {}).get("perplexity", {}).items():
            lines.append(f"  PPL {name}: {value:.3f}")
        for label, entry in stages.get("profile", {}).get("result", {}).get("summary", {}).items():
            decode = next(v for k, v in entry["speedups"].items() if k.startswith("tg"))
            lines.append(f"  {label}: decode x{decode['measured']:.3f} (ideal x{decode['ideal']:.3f})")
        if result.reused_stages:
            lines.append(f"reused finished stages: {', '.join(result.reused_stages)}")
        lines.append(f"done in {result.seconds:.0f} s; report: {result.report_path}")
        emit(result.to_dict(), as_json, lines)

    run_command(
        debug,
        action,
        resume_hint="rerun the same command with --resume to continue (TRSP continues from its last round checkpoint)",
    )
