"""The Typer app and what every command shares: option types, error handling, output and progress bars."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
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


def pick_model(positional: str | None, option: str | None) -> str:
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


def run_command(debug: bool, action: Callable[[], T]) -> T:
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
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if debug:
            traceback.print_exc()
        where = f" while writing {exc.filename}" if exc.filename else ""
        typer.echo(f"error: no space left on the device{where}; free some disk space or choose another --out", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    except KeyboardInterrupt:
        typer.echo(
            "interrupted: finished artifacts were kept and unfinished ones removed; rerun the same command with "
            "--resume to continue (TRSP continues from its last round checkpoint)",
            err=True,
        )
        raise typer.Exit(130) from None


def emit(payload: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(payload, indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


class ProgressBar:
    """A tqdm bar on stderr driven by (done, total) callbacks."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar = None
        self.stage: str | None = None

    def __call__(self, done: int, total: int, **postfix: Any) -> None:
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, file=sys.stderr, leave=False)
        if "stage" in postfix:
            stage = postfix.pop("stage")
            if stage != self.stage:  # a new stage starts its own count and clears the last stage's figures
                self.stage = stage
                self.bar.reset(total=total)
                self.bar.set_postfix({}, refresh=False)
            self.bar.set_description(f"{self.description} {stage}", refresh=False)
        self.bar.n = done
        if postfix:
            self.bar.set_postfix(
                {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=False
            )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
