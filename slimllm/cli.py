"""The `slimllm` command line: thin commands over the library. The only module that prints or exits.

$ slimllm eval --model smollm2-135m --data ../shared/data/wikitext2/wiki.test.raw --seq-len 1024 --max-windows 24
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from slimllm.errors import (
    EXIT_FAILURE,
    EXIT_USER_ERROR,
    MissingDependencyError,
    SlimllmError,
    UserInputError,
)

app = typer.Typer(
    name="slimllm",
    help="Prune decoder-only LLMs (TRSP and baselines), export them to ONNX and GGUF, and check them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

T = TypeVar("T")

# Options shared by every command, spelled the same way everywhere.
ModelArg = Annotated[
    str | None,
    typer.Argument(help="Model: hub id, local HF directory, .gguf file or smollm2-135m (default).", show_default=False),
]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Same as the MODEL argument.", show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (fp32 on CPU, bf16 on CUDA), fp32, fp16, bf16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
DebugOpt = Annotated[
    bool, typer.Option("--debug", envvar="SLIMLLM_DEBUG", help="Show full tracebacks (also SLIMLLM_DEBUG=1).")
]


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"slimllm {version('slimllm')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Prune decoder-only LLMs (TRSP and baselines), export them to ONNX and GGUF, and check them."""


def _pick_model(positional: str | None, option: str | None) -> str:
    from slimllm.models import DEFAULT_MODEL

    if positional and option and positional != option:
        raise UserInputError(f"two different models given ({positional!r} and --model {option!r}); pass one")
    return positional or option or DEFAULT_MODEL


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:
        import transformers

        transformers.utils.logging.set_verbosity_error()


def _run(debug: bool, action: Callable[[], T]) -> T:
    """Run a command body; user errors become one line on stderr and exit code 2 (tracebacks with --debug)."""
    _configure_logging(debug)
    try:
        return action()
    except (UserInputError, MissingDependencyError) as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except SlimllmError as exc:
        if debug:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    except KeyboardInterrupt:
        typer.echo(
            "interrupted: finished artifacts were kept and unfinished ones removed; "
            "`slimllm prune ... --resume` continues TRSP from its last checkpoint",
            err=True,
        )
        raise typer.Exit(130) from None


def _emit(payload: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(payload, indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


class _ProgressBar:
    """A tqdm bar on stderr driven by (done, total) callbacks."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar = None

    def __call__(self, done: int, total: int, **postfix: Any) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, file=sys.stderr, leave=False)
        self.bar.n = done
        if "stage" in postfix:
            self.bar.set_description(f"{self.description} {postfix.pop('stage')}", refresh=False)
        if postfix:
            self.bar.set_postfix(
                {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=False
            )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
        loaded = load_model(_pick_model(model, model_option), device=device, dtype=dtype)
        bar = _ProgressBar("eval")
        try:
            result = evaluate_model(loaded, settings, progress=bar)
        finally:
            bar.close()
        payload = result.to_dict() | {"device": str(loaded.device), "dtype": dtype_name(loaded.dtype)}
        if out is not None:
            atomic_write_json(out, payload)
        _emit(
            payload,
            as_json,
            [
                f"perplexity {result.perplexity:.3f}  ({result.tokens_scored} tokens in {result.windows} windows "
                f"of {result.seq_len}, {result.seconds:.1f} s on {loaded.device})",
                *([f"wrote {out}"] if out is not None else []),
            ],
        )

    _run(debug, action)


@app.command("prune")
def prune_command(
    model: ModelArg = None,
    model_option: ModelOpt = None,
    method: Annotated[
        str | None, typer.Option("--method", help="trsp (default), shortgpt, angular, sleb, last or random.")
    ] = None,
    remove: Annotated[
        int | None, typer.Option("--remove", "-k", help="Number of layers to remove.", show_default=False)
    ] = None,
    ratio: Annotated[
        float | None, typer.Option("--ratio", help="Fraction of layers to remove (0-1).", show_default=False)
    ] = None,
    calib: Annotated[
        str | None,
        typer.Option("--calib", help="Calibration text: self (offline default), wikitext2, c4 or a file."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory.", show_default=False)] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="TOML recipe ([prune] and [trsp] tables); flags override it.")
    ] = None,
    protect_first: Annotated[
        int | None, typer.Option("--protect-first", help="Never remove the first N layers (0).")
    ] = None,
    protect_last: Annotated[
        int | None, typer.Option("--protect-last", help="Never remove the last M layers (1).")
    ] = None,
    calib_blocks: Annotated[
        int | None, typer.Option("--calib-blocks", help="Number of calibration blocks (16).")
    ] = None,
    block_len: Annotated[int | None, typer.Option("--block-len", help="Tokens per calibration block (512).")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Blocks per forward/training step (2).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for data order, sampling and random (0).")] = None,
    gate_mode: Annotated[str | None, typer.Option("--gate-mode", help="TRSP gate: delta (default) or output.")] = None,
    train_scope: Annotated[
        str | None, typer.Option("--train-scope", help="TRSP stage 1 trains: gates (default) or full.")
    ] = None,
    lambda1: Annotated[float | None, typer.Option("--lambda1", help="TRSP stage-1 L1 weight on gates (5e-3).")] = None,
    gate_lr: Annotated[float | None, typer.Option("--gate-lr", help="TRSP gate learning rate (1e-2).")] = None,
    gate_optimizer: Annotated[
        str | None, typer.Option("--gate-optimizer", help="TRSP gate optimizer: adam (default) or sgd.")
    ] = None,
    weight_lr: Annotated[
        float | None, typer.Option("--weight-lr", help="TRSP stage-1 weight LR, full scope (2e-5).")
    ] = None,
    steps_per_round: Annotated[
        int | None, typer.Option("--steps-per-round", help="TRSP stage-1 steps per greedy round (6).")
    ] = None,
    stage2: Annotated[
        str | None, typer.Option("--stage2", help="TRSP knowledge transfer: fade (default), regularize or none.")
    ] = None,
    lambda2: Annotated[float | None, typer.Option("--lambda2", help="TRSP stage-2 regularizer weight (1e-3).")] = None,
    reg_norm: Annotated[str | None, typer.Option("--reg-norm", help="TRSP stage-2 norm: l2 (default) or l1.")] = None,
    stage2_steps: Annotated[int | None, typer.Option("--stage2-steps", help="TRSP stage-2 steps (64).")] = None,
    stage2_lr: Annotated[float | None, typer.Option("--stage2-lr", help="TRSP stage-2 weight LR (1e-4).")] = None,
    fade_fraction: Annotated[
        float | None, typer.Option("--fade-fraction", help="TRSP fade: share of stage 2 spent fading (0.5).")
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted TRSP run from its last round checkpoint.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output directory.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Remove transformer layers chosen by a pruning method and save a checkpoint plain transformers loads."""

    def action() -> None:
        from slimllm.pruning.methods import PruneMethod
        from slimllm.pruning.stage import PruneSettings, run_prune
        from slimllm.pruning.trsp import TrspSettings
        from slimllm.recipes import build_settings, load_recipe

        if out is None:
            raise UserInputError("--out is required: the directory to write the pruned checkpoint to")
        if method is not None and method not in {m.value for m in PruneMethod}:
            raise UserInputError(f"unknown --method {method!r}; use one of {', '.join(m.value for m in PruneMethod)}")
        sections = load_recipe(recipe) if recipe is not None else {}
        settings = build_settings(
            PruneSettings,
            sections.get("prune"),
            dict(
                method=method,
                remove=remove,
                ratio=ratio,
                protect_first=protect_first,
                protect_last=protect_last,
                calib=calib,
                calib_blocks=calib_blocks,
                block_len=block_len,
                batch_size=batch_size,
                seed=seed,
            ),
        )
        trsp = build_settings(
            TrspSettings,
            sections.get("trsp"),
            dict(
                gate_mode=gate_mode,
                train_scope=train_scope,
                lambda1=lambda1,
                gate_lr=gate_lr,
                gate_optimizer=gate_optimizer,
                weight_lr=weight_lr,
                steps_per_round=steps_per_round,
                stage2=stage2,
                lambda2=lambda2,
                reg_norm=reg_norm,
                stage2_steps=stage2_steps,
                stage2_lr=stage2_lr,
                fade_fraction=fade_fraction,
                gradient_checkpointing=gradient_checkpointing,
            ),
        )
        bar = _ProgressBar(settings.method.value)
        try:
            result = run_prune(
                _pick_model(model, model_option),
                settings,
                out,
                force=force,
                device=device,
                dtype=dtype,
                progress=bar,
                trsp=trsp,
                resume=resume,
            )
        finally:
            bar.close()
        _emit(
            result.to_dict(),
            as_json,
            [
                f"removed {len(result.removed_layers)} of {result.original_num_layers} layers with {result.method}: "
                f"{result.removed_layers}",
                f"parameters {result.params_before / 1e6:.1f}M -> {result.params_after / 1e6:.1f}M "
                f"({100 * (1 - result.params_after / result.params_before):.1f}% fewer)",
                f"time {result.seconds:.1f} s (selection {result.selection_seconds:.1f} s)",
                f"wrote {result.out_dir}",
            ],
        )

    _run(debug, action)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
