"""The pruning-method registry: every layer-selection method is one class registered by name.

    >>> from slimllm.pruning.registry import get_method
    >>> spec = get_method("shortgpt")
    >>> selection = spec.select(SelectionRequest(model, blocks, k=8, candidates=range(29)))

A method declares its name, a one-line description, whether it reads calibration text, whether it trains weights,
and the settings class of its own hyperparameters (None where it has none). The CLI's `--method` choices, the
recipe sections (`[trsp]`, ...), the `compile` pipeline and the quality benchmark's rows all come from here, so a
new method is one module in `slimllm/pruning/methods/` that registers itself, plus its tests (`docs/extending.md`).
"""

from __future__ import annotations

import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, ClassVar

import torch

from slimllm.core.errors import UserInputError
from slimllm.core.progress import Progress


@dataclass
class Selection:
    """Layers a method chose to remove, with the per-layer scores behind the choice."""

    removed_layers: list[int]
    """Original indices, sorted."""
    scores: dict[str, float] = field(default_factory=dict)
    """Per-layer (or per-start) score, keyed by the original index as a string (JSON-friendly)."""
    details: dict = field(default_factory=dict)
    summary: str = ""
    """One line saying what was removed, from a method that does more than remove layers (shown by the CLI)."""
    model: torch.nn.Module | None = None
    """The model a method that edits the architecture built (narrower FFNs, blocks without attention); the caller
    removes `removed_layers` from it instead of from the request's model. None: the request's model."""


@dataclass
class SelectionRequest:
    """Everything a method is given: the model (trained in place by methods that train), data and constraints."""

    model: torch.nn.Module
    blocks: torch.Tensor | None
    """Calibration blocks [n, block_len]; None for methods that need none."""
    k: int
    candidates: Sequence[int]
    batch_size: int = 2
    seed: int = 0
    settings: Any = None
    """The method's own settings (an instance of its `settings_class`), or None for its defaults."""
    work_dir: Path | None = None
    """Where a method that trains may checkpoint, for `resume`."""
    resume: bool = False
    progress: Progress | None = None

    def stage_progress(self, stage: str) -> Callable[[int, int], None] | None:
        """`progress` for one named stage of a method (the CLI shows the stage beside the bar), or None."""
        progress = self.progress
        if progress is None:
            return None
        return lambda done, total: progress(done, total, stage=stage)


@dataclass(frozen=True)
class BenchmarkVariant:
    """One row of the quality benchmark (`bench/quality.py`) that a method asks for, under the row's name."""

    name: str
    kind: str = "select"
    """How the benchmark builds the row. `select`: the method as the benchmark's recipe configures it (with
    `options` over its settings), removed with `repair`. Other kinds are experiments on a method that the benchmark
    implements: `trsp-stage1` (TRSP's selection without stage 2), `heal` and `fine-tune` (healing at the TRSP row's
    token budget), `width` (FFN-width removal, regularized or not, recovered or not)."""
    repair: str | None = "none"
    """The training-free repair folded in before removal (`slimllm.recovery.repair.RepairMethod` value); None: the
    method's default (`PruningMethod.default_repair`)."""
    options: tuple[tuple[str, Any], ...] = ()
    """Settings of the method, or of the kind, as (name, value) pairs."""
    trains: bool = False
    """The row trains (it draws its batches from the benchmark's training blocks)."""


@dataclass(frozen=True)
class PlannedWork:
    """A method's arithmetic and training, as the memory plan sees them (`PruningMethod.planned_work`)."""

    selection_tokens: int
    """Tokens run forward to choose what to remove (every greedy candidate counted)."""
    train_tokens: int = 0
    train_scope: str = "none"
    """full, gates, lora or none: what the method's own training updates."""
    ffn_kept: float = 1.0
    """Fraction of every FFN the method keeps (width pruning)."""
    teacher: bool = True
    """The method's training runs a frozen copy of the unpruned model beside the student (distillation)."""
    activation_checkpointing: bool = False
    """Backward recomputes each layer's activations, keeping only the layers' inputs."""


class PruningMethod(ABC):
    """Base of every registered method. Subclasses set the class attributes and implement `select`."""

    name: ClassVar[str]
    description: ClassVar[str]
    rank: ClassVar[int]
    """Where `--method` lists it (lower first): TRSP 10, 2SSP 20, DReSS 30, then the baselines from 40."""
    needs_calibration: ClassVar[bool] = True
    trains_weights: ClassVar[bool] = False
    """The method updates weights: the model is held in fp32 master weights and works on a copy."""
    settings_class: ClassVar[type | None] = None
    """Dataclass of the method's own hyperparameters; its recipe section is `[<name>]`."""
    removes_layers: ClassVar[bool] = True
    """The method removes whole layers, `--remove K` (or `--ratio`) of them; a method that sets its own target
    (2SSP's `--sparsity`) sets False and gets k = 0 and every layer as a candidate."""
    edits_model: ClassVar[bool] = False
    """`select` changes weights or shapes (surgery): it works on a copy of the loaded model."""

    def benchmark_variants(self) -> list[BenchmarkVariant]:
        """The quality benchmark's rows for this method: by default the method as configured, and, for a method that
        removes whole layers without training, each training-free repair beside it."""
        variants = [BenchmarkVariant(self.name, trains=self.trains_weights)]
        if self.removes_layers and not self.trains_weights and not self.edits_model:
            from slimllm.recovery.repair import RepairMethod

            variants += [BenchmarkVariant(f"{self.name}+{r.value}", repair=r.value)
                         for r in RepairMethod if r is not RepairMethod.NONE]
        return variants

    def default_settings(self) -> Any:
        return self.settings_class() if self.settings_class is not None else None

    spread_alternative: ClassVar[str] = ""
    """A setting of the method under which it runs on a model spread with `--device-map` (one that trains no
    weights), offered when the chosen settings cannot."""

    def updates_weights(self, settings: Any) -> bool:
        """The method's training updates weights under these settings (not only gates or scores)."""
        return self.trains_weights

    def transfers_removed_work(self, settings: Any) -> bool:
        """True when selection already trains the kept layers to do without the removed ones (then a training-free
        repair, which fits the removed layers' outputs, would undo that work)."""
        return False

    def default_repair(self, settings: Any) -> Any:
        """The training-free repair used when none is asked for: least squares after a selection that removes layers
        without training the kept ones (it recovers much of the loss in seconds), else none."""
        from slimllm.recovery.repair import RepairMethod

        if not self.removes_layers or self.transfers_removed_work(settings):
            return RepairMethod.NONE
        return RepairMethod.LSQ

    def planned_work(self, settings: Any, k: int, num_layers: int, calib_blocks: int, block_len: int,
                     batch_size: int) -> PlannedWork:
        """What `slimllm plan` counts for this method: tokens of its scoring passes and of its training, what the
        training updates, and the FFN share it keeps. The default is one scoring pass over the calibration set."""
        return PlannedWork(selection_tokens=calib_blocks * block_len if self.needs_calibration else 0)

    @abstractmethod
    def select(self, request: SelectionRequest) -> Selection:
        """The layers to remove. Callers go through `select_layers_with`, which checks what every method needs."""


def select_layers_with(method: PruningMethod, request: SelectionRequest) -> Selection:
    """Run a method's selection after the checks every method shares."""
    if method.needs_calibration and request.blocks is None:
        raise ValueError(f"{method.name} needs calibration blocks")
    return method.select(request)


_METHODS: dict[str, PruningMethod] = {}


def register(cls: type[PruningMethod]) -> type[PruningMethod]:
    """Class decorator: register a method under its `name` (a second registration of a name is an error)."""
    if cls.name in _METHODS and type(_METHODS[cls.name]) is not cls:
        raise ValueError(f"pruning method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls()
    return cls


def all_methods() -> dict[str, PruningMethod]:
    """Every registered method by name, in `rank` order: each module of `slimllm.pruning.methods` is imported (and
    registers its methods) first, so no list of modules is kept anywhere."""
    import slimllm.pruning.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        import_module(f"{package.__name__}.{module.name}")
    return dict(sorted(_METHODS.items(), key=lambda item: (item[1].rank, item[0])))


def method_names() -> list[str]:
    return list(all_methods())


def get_method(name: str | Any) -> PruningMethod:
    """The registered method called `name` (an enum member's value works too); a user error for anything else."""
    value = getattr(name, "value", name)
    methods = all_methods()
    if value not in methods:
        raise UserInputError(f"unknown --method {value!r}; use one of {', '.join(methods)}")
    return methods[value]


def method_settings_sections() -> dict[str, type]:
    """Recipe section name -> settings class, for every method that has its own settings."""
    return {name: m.settings_class for name, m in all_methods().items() if m.settings_class is not None}
