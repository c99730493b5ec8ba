"""Multiple-choice tasks for zero-shot accuracy: a small registry of readers, one module per task format.

    >>> tasks = read_task("hellaswag", Path("../shared/data/hellaswag/hellaswag_val_full.txt"))
    >>> tasks[0].context, tasks[0].endings[tasks[0].label]

A task format is a reader from a file to `MultipleChoiceTask`s, registered by name with `register_task` in a module
of this package (every module here is imported); ARC, PIQA or WinoGrande plug in by writing their reader. Scoring
(`slimllm.evaluation.accuracy`) is the same for every format.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from slimllm.core.errors import UserInputError


@dataclass(frozen=True)
class MultipleChoiceTask:
    """One question: a context, its candidate endings and the index of the right one."""

    context: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class TaskFormat:
    name: str
    description: str
    reader: Callable[[Path], list[MultipleChoiceTask]]
    default_file: str
    """Where the file usually is, relative to the shared data directory (`SLIMLLM_DATA_DIR`'s parent)."""


_FORMATS: dict[str, TaskFormat] = {}


def register_task(task_format: TaskFormat) -> TaskFormat:
    _FORMATS[task_format.name] = task_format
    return task_format


def task_formats() -> dict[str, TaskFormat]:
    """Every registered task format by name (each module of this package registers its own)."""
    for module in pkgutil.iter_modules(__path__):
        import_module(f"{__name__}.{module.name}")
    return dict(sorted(_FORMATS.items()))


def default_task_file(name: str) -> Path:
    """The task's file under the shared data directory, found like the text data (`slimllm.core.data.shared_data_dir`:
    `SLIMLLM_DATA_DIR`, which points at its wikitext2 folder, else beside the installed package), whatever the
    working directory."""
    from slimllm.core.data import shared_data_dir

    return shared_data_dir().parent / task_formats()[name].default_file


def read_task(name: str, path: Path | str | None = None) -> list[MultipleChoiceTask]:
    """The tasks of a registered format from `path` (default: the shared copy)."""
    formats = task_formats()
    if name not in formats:
        raise UserInputError(f"unknown --task {name!r}; use one of {', '.join(formats)}")
    path = Path(path) if path is not None else default_task_file(name)
    if not path.is_file():
        raise UserInputError(f"{name} file {path} does not exist; pass --task-file PATH")
    return formats[name].reader(path)
