"""The Typer app and what every command shares: option types, error handling, output and progress bars."""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from slimllm.core.errors import (
    EXIT_FAILURE,
    EXIT_USER_ERROR,
    MissingDependencyError,
    SlimllmError,
    UserInputError,
)

app = typer.Typer(
    name="slimllm",
    help="Compile decoder-only LLMs for edge devices: prune (ShortGPT, TRSP, 2SSP, DReSS and baselines), repair and "
    "heal, export to ONNX and GGUF with parity checks, measure perplexity, divergence and HellaSwag accuracy, "
    "profile latency, and plan memory before any work.",
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
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Spread the model with accelerate over the GPUs, then host memory, then disk: auto, balanced, "
        "balanced_low_0 or sequential; none (default) holds it on --device.",
        show_default=False,
    ),
]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option("--max-memory", help="With --device-map: what each device may hold, e.g. 0=20GiB,1=20GiB,cpu=64GiB.",
                 show_default=False),
]
OffloadFolderOpt = Annotated[
    Path | None,
    typer.Option("--offload-folder", help="With --device-map: where weights that fit on no device are written "
                 "(in a folder slimllm makes and removes; default: slimllm's cache).", show_default=False),
]


def placement_of(fixed: dict):
    """The `Placement` the --device-map, --max-memory, --offload-folder and --device flags ask for."""
    from slimllm.core.placement import Placement

    return Placement.parse(fixed.get("device_map"), fixed.get("max_memory"), fixed.get("offload_folder"),
                           fixed.get("device", "auto"))


def run_options(fixed: dict) -> dict:
    """The keywords every command that writes a model passes on: --force, --resume, --device (with its placement)
    and --dtype."""
    return {"force": fixed["force"], "resume": fixed["resume"], "device": fixed["device"],
            "placement": placement_of(fixed), "dtype": fixed["dtype"]}

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
    from slimllm.models.loading import DEFAULT_MODEL

    if positional and option and positional != option:
        raise UserInputError(f"two different models given ({positional!r} and --model {option!r}); pass one")
    return positional or option or DEFAULT_MODEL


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:
        import transformers

        transformers.utils.logging.set_verbosity_error()


_INTERRUPTED = "interrupted: finished artifacts were kept and unfinished ones removed"
RESUME_HINT = "rerun the same command with --resume to continue (TRSP continues from its last round checkpoint)"
"""What an interrupted `compile` or `prune` should do next."""
_OUT_OF_MEMORY = (
    "out of memory{where}: lower --batch-size or --block-len (or --calib-blocks), add --gradient-checkpointing "
    "when training, or use a device with more memory (--device cpu holds the model in system RAM)"
)


def run_command(debug: bool, action: Callable[[], T], resume_hint: str | None = None) -> T:
    """Run a command body: every expected failure becomes one line on stderr and an exit code, never a traceback
    (unless --debug). User errors exit 2, failed checks and runtime failures 1, Ctrl-C 130.

    `resume_hint` is what an interrupted run of this command should do next (only commands that can resume).
    """
    _configure_logging(debug)
    try:
        return action()
    except (UserInputError, MissingDependencyError) as exc:
        _fail(debug, str(exc), EXIT_USER_ERROR)
    except SlimllmError as exc:
        _fail(debug, str(exc), EXIT_FAILURE)
    except OSError as exc:
        if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
            where = f" to {exc.filename}" if exc.filename else ""
            _fail(debug, f"permission denied writing{where}; choose an --out you can write to", EXIT_USER_ERROR)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {exc.filename}" if exc.filename else ""
        _fail(debug, f"no space left on the device{where}; free some disk space or choose another --out", EXIT_FAILURE)
    except MemoryError:
        _fail(debug, _OUT_OF_MEMORY.format(where=" (system RAM)"), EXIT_FAILURE)
    except RuntimeError as exc:
        if not _is_out_of_memory(exc):
            raise
        _fail(debug, _OUT_OF_MEMORY.format(where=_memory_where(exc)), EXIT_FAILURE)
    except KeyboardInterrupt:
        typer.echo(f"{_INTERRUPTED}; {resume_hint or 'rerun the command to start again'}", err=True)
        raise typer.Exit(130) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _fail(debug: bool, message: str, code: int) -> NoReturn:
    if debug:
        traceback.print_exc()
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code) from None


def _is_out_of_memory(exc: RuntimeError) -> bool:
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "can't allocate memory" in text


def _memory_where(exc: RuntimeError) -> str:
    return " on the GPU" if "CUDA" in str(exc) or "cuda" in type(exc).__name__.lower() else " (system RAM)"


def emit(payload: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(payload, indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


class ProgressBar:
    """tqdm bars on stderr driven by (done, total) callbacks: one bar per `bar=` name (compile's stages), whose count
    follows the callbacks' totals; a `stage=` label (a step inside it: TRSP's rounds, the repair) restarts the count
    at that step's own total."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar = None
        self.bar_name: str | None = None
        self.stage: str | None = None
        self.opened: list[str] = []
        """The names of the bars opened so far, in order."""

    def __call__(self, done: int, total: int, **postfix: Any) -> None:
        from tqdm.auto import tqdm

        bar_name = postfix.pop("bar", None)
        if self.bar is None or (bar_name is not None and bar_name != self.bar_name):
            self.close()  # the finished stage's bar stays on screen with its final count
            self.bar_name, self.stage = bar_name, None
            self.opened.append(bar_name or self.description)
            description = f"{self.description} {bar_name}" if bar_name else self.description
            self.bar = tqdm(total=total, desc=description, file=sys.stderr, leave=bar_name is not None)
        label = f"{self.description} {bar_name}" if bar_name else self.description
        if "stage" in postfix:
            stage = postfix.pop("stage")
            if stage != self.stage:  # a new step starts its own count and clears the last step's figures
                self.stage = stage
                self.bar.reset(total=total)
                self.bar.set_postfix({}, refresh=False)
            self.bar.set_description(f"{label} {stage}", refresh=False)
        elif total != self.bar.total:  # the stage's work is now known (its first callback announced 1)
            self.bar.reset(total=total)
        self.bar.n = done
        if postfix:
            self.bar.set_postfix(
                {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=False
            )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
