"""`slimllm eval`: perplexity of a model on a text source."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimllm.cli.app import (
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    ModelOpt,
    ProgressBar,
    app,
    emit,
    pick_model,
    run_command,
)
from slimllm.errors import UserInputError


@app.command("eval")
def eval_command(
    model: ModelArg = None,
    model_option: ModelOpt = None,
    data: Annotated[
        str,
        typer.Option("--data", help="Evaluation text: wikitext2, c4 (test splits) or a .txt/.jsonl/.parquet file."),
    ] = "wikitext2",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 2048,
    max_windows: Annotated[
        int | None, typer.Option("--max-windows", help="Score only the first N windows.", show_default=False)
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 1,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Also write the result to this JSON file.", show_default=False),
    ] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Perplexity of a model on a text source (non-overlapping windows, every predicted token scored)."""

    def action() -> None:
        from slimllm.artifacts import atomic_write_json
        from slimllm.device import dtype_name
        from slimllm.evaluate import EvalSettings, evaluate_model
        from slimllm.models import load_model

        settings = EvalSettings(data=data, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size)
        if batch_size < 1:
            raise UserInputError(f"--batch-size must be at least 1, got {batch_size}")
        loaded = load_model(pick_model(model, model_option), device=device, dtype=dtype)
        bar = ProgressBar("eval")
        try:
            result = evaluate_model(loaded, settings, progress=bar)
        finally:
            bar.close()
        payload = result.to_dict() | {"device": str(loaded.device), "dtype": dtype_name(loaded.dtype)}
        if out is not None:
            atomic_write_json(out, payload)
        emit(
            payload,
            as_json,
            [
                f"perplexity {result.perplexity:.3f}  ({result.tokens_scored} tokens in {result.windows} windows "
                f"of {result.seq_len}, {result.seconds:.1f} s on {loaded.device})",
                *([f"wrote {out}"] if out is not None else []),
            ],
        )

    run_command(debug, action)
