"""What a frontier run measures and chooses: `[frontier]` in a recipe, and `slimllm frontier`'s flags.

    >>> settings = FrontierSettings(pruned=["shortgpt:8", "2ssp:0.25:stage=width"], gguf_types=["q8_0", "q4_0"])
    >>> [variant.label for variant in settings.pruned_variants()]
    ['shortgpt-8', '2ssp-0.25-width']

A pruned variant is `METHOD:BUDGET[:KEY=VALUE...]`: for a method that removes whole layers the budget is their
number (`shortgpt:8`) or, below 1, their share (`shortgpt:0.27`: 8 of 30 layers, 5 of 18); for one that sets its own
target it is the sparsity (`2ssp:0.25`, `dress:0.2`); each `KEY=VALUE` sets one of the method's own settings
(`stage=width`). Every variant is pruned with the recipe's
[prune] settings (calibration, repair) and healed with its [heal] settings, as `slimllm compile` would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimllm.core.errors import UserInputError

DEFAULT_GGUF_TYPES = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
DEFAULT_ONNX_VARIANTS = ["fp32", "int8", "int4"]
ONNX_VARIANTS = ("fp32", "int8", "int8-dynamic", "int4")


@dataclass(frozen=True)
class PrunedVariant:
    """One pruned model of the frontier: a method, its budget and its own settings."""

    method: str
    budget: float
    options: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        budget = int(self.budget) if float(self.budget).is_integer() else self.budget
        return "-".join([self.method, str(budget), *(value for _, value in self.options)])


def parse_variant(text: str) -> PrunedVariant:
    """`shortgpt:8`, `2ssp:0.25:stage=width` -> a `PrunedVariant` (checked against the method registry)."""
    from slimllm.pruning.registry import get_method

    parts = [part.strip() for part in str(text).split(":")]
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise UserInputError(f"pruned variant {text!r} is not METHOD:BUDGET[:KEY=VALUE...], e.g. shortgpt:8")
    method = get_method(parts[0])
    try:
        budget = float(parts[1])
    except ValueError:
        raise UserInputError(f"pruned variant {text!r}: the budget {parts[1]!r} is not a number") from None
    if method.removes_layers and not (0 < budget < 1 or (budget >= 1 and budget.is_integer())):
        raise UserInputError(f"pruned variant {text!r}: {method.name} removes whole layers; give their number, "
                             "or their share below 1")
    if not method.removes_layers and not 0 < budget < 1:
        raise UserInputError(f"pruned variant {text!r}: {method.name} takes a sparsity between 0 and 1")
    options = []
    known = set(method.settings_class.__dataclass_fields__) if method.settings_class else set()
    for part in parts[2:]:
        key, sep, value = part.partition("=")
        if not sep or key not in known:
            raise UserInputError(f"pruned variant {text!r}: {part!r} is not a {method.name} setting "
                                 f"(KEY=VALUE with KEY one of {', '.join(sorted(known)) or 'none'})")
        options.append((key, value))
    return PrunedVariant(method.name, budget, tuple(options))


@dataclass
class FrontierSettings:
    """The candidates, the measurement protocol and the choice of a frontier run."""

    gguf_types: list[str] = field(default_factory=lambda: list(DEFAULT_GGUF_TYPES))
    """The quantization ladder on llama.cpp: every model is exported to each type (f16, q8_0, q6_k, q5_k_m, q4_k_m,
    q4_0, ...)."""
    onnx_variants: list[str] = field(default_factory=lambda: list(DEFAULT_ONNX_VARIANTS))
    """The ladder on onnxruntime: fp32, int8 (weight-only), int8-dynamic or int4."""
    pruned: list[str] = field(default_factory=lambda: ["shortgpt:0.27", "shortgpt:0.14"])
    """Pruned variants, METHOD:BUDGET[:KEY=VALUE...]: layers (or their share below 1), or the sparsity of 2ssp and
    dress; none measures the dense model's ladder alone."""
    heal: bool = True
    """Heal every pruned variant with the recipe's [heal] settings before exporting it."""
    eval_data: str | None = None
    """Text of the KLD and perplexity windows (a test split: never used for calibration or healing)."""
    eval_seq_len: int = 512
    """Tokens per KLD and perplexity window."""
    eval_windows: int = 8
    """KLD and perplexity windows, the same for every candidate."""
    task: str | None = "hellaswag"
    """Multiple-choice task scored for every candidate (acc_norm with its standard error); none skips it."""
    task_file: str | None = None
    """The task's file (default: the shared copy)."""
    tasks: int = 200
    """How many tasks to score (the first N of the file)."""
    baseline: str = "dense f16"
    """The candidate speedups are measured against (a candidate's name, e.g. `dense f16`, `dense fp32`)."""
    min_speedup: float | None = None
    """Choice: decode at least this many times the baseline's tokens/s."""
    min_tokens_per_s: float | None = None
    """Choice: decode at least this many tokens/s."""
    max_size: float | None = None
    """Choice: at most this many MiB on disk."""
    max_kld: float | None = None
    """Choice: mean KL divergence from the dense model at most this (nats per token)."""
    max_ppl_ratio: float | None = None
    """Choice: perplexity at most this many times the dense model's."""
    max_minutes: float | None = None
    """Time budget: measure every candidate's KLD on two windows first, then spend the task and latency on
    candidates that can still reach the frontier, until the budget is spent."""

    def __post_init__(self) -> None:
        from slimllm.exporters.gguf_writer import GgufType

        self.gguf_types = _listed(self.gguf_types)
        self.onnx_variants = _listed(self.onnx_variants)
        self.pruned = _listed(self.pruned)
        for gguf_type in self.gguf_types:
            if gguf_type not in {t.value for t in GgufType}:
                raise UserInputError(f"unknown quantization type {gguf_type!r} in --gguf-types; use one of "
                                     f"{', '.join(t.value for t in GgufType)}")
        for variant in self.onnx_variants:
            if variant not in ONNX_VARIANTS:
                raise UserInputError(f"unknown ONNX variant {variant!r} in --onnx-variants; use one of "
                                     f"{', '.join(ONNX_VARIANTS)}")
        self.pruned_variants()  # every variant parses
        if self.eval_seq_len < 16 or self.eval_windows < 1 or self.tasks < 0:
            raise UserInputError("--eval-seq-len >= 16, --eval-windows >= 1 and --tasks >= 0")
        if self.task in ("none", ""):
            self.task = None
        for name in ("min_speedup", "min_tokens_per_s", "max_size", "max_kld", "max_ppl_ratio", "max_minutes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserInputError(f"--{name.replace('_', '-')} must be positive, got {value}")

    def pruned_variants(self) -> list[PrunedVariant]:
        return [parse_variant(text) for text in self.pruned]

    def constraints(self) -> dict[str, Any]:
        """The choice's constraints that were set, by name."""
        names = ("min_speedup", "min_tokens_per_s", "max_size", "max_kld", "max_ppl_ratio")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _listed(values: Any) -> list[str]:
    """`["f16,q8_0", "q4_0"]`, `"f16,q8_0"` -> `["f16", "q8_0", "q4_0"]`, lower-cased, each once."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    parts = [part.strip() for value in values for part in str(getattr(value, "value", value)).split(",")]
    return list(dict.fromkeys(part.lower() for part in parts if part and part.lower() != "none"))
