"""`slimllm eval`: perplexity of a model on a text source. Its flags are generated from `EvalSettings`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
from slimllm.cli.options import fixed_option, flag_names, settings_command, settings_flags
from slimllm.evaluate import EvalSettings

FLAGS = settings_flags(EvalSettings, "eval")

FIXED = [
    fixed_option("model", ModelArg),
    fixed_option("model_option", ModelOpt),
    fixed_option(
        "out", Annotated[Path | None, typer.Option("--out", help="Also write the result to this JSON file.")]
    ),
    fixed_option(
        "recipe", Annotated[Path | None, typer.Option("--recipe", help="TOML recipe: an [eval] table.")]
    ),
    fixed_option("device", DeviceOpt, "auto"),
    fixed_option("dtype", DtypeOpt, "auto"),
    fixed_option("as_json", JsonOpt, False),
    fixed_option("debug", DebugOpt, False),
]


def _eval(fixed: dict[str, Any], given: dict[str, dict[str, Any]]) -> None:
    def action() -> None:
        from slimllm.artifacts import atomic_write_json
        from slimllm.device import dtype_name
        from slimllm.evaluate import evaluate_model
        from slimllm.models import load_model
        from slimllm.recipes import load_recipe
        from slimllm.settings import build_settings

        sections = load_recipe(fixed["recipe"]) if fixed["recipe"] is not None else {}
        settings = build_settings(
            EvalSettings, sections.get("eval"), given.get("eval", {}), "[eval]", flag_names(FLAGS, "eval")
        )
        loaded = load_model(pick_model(fixed["model"], fixed["model_option"]), fixed["device"], fixed["dtype"])
        bar = ProgressBar("eval")
        try:
            result = evaluate_model(loaded, settings, progress=bar)
        finally:
            bar.close()
        payload = result.to_dict() | {"device": str(loaded.device), "dtype": dtype_name(loaded.dtype)}
        out = fixed["out"]
        if out is not None:
            atomic_write_json(out, payload)
        emit(payload, fixed["as_json"], [
            f"perplexity {result.perplexity:.3f}  ({result.tokens_scored} tokens in {result.windows} windows "
            f"of {result.seq_len}, {result.seconds:.1f} s on {loaded.device})",
            *([f"wrote {out}"] if out is not None else []),
        ])

    run_command(fixed["debug"], action)


eval_command = settings_command(
    app,
    "eval",
    FIXED,
    FLAGS,
    _eval,
    "Perplexity of a model on a text source (non-overlapping windows, every predicted token scored).",
)
