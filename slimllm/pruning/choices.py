"""`PruneMethod`: the registered pruning methods as an enum, for settings fields and `--method` choices.

The members are made from the registry (`slimllm.pruning.registry`), so registering a method adds its member; each
member answers `needs_calibration`, `trains_weights` and `spec` (the registered method object).
"""

from __future__ import annotations

from enum import Enum

from slimllm.pruning.registry import PruningMethod, all_methods, get_method


class _RegisteredMethod(str, Enum):
    @property
    def spec(self) -> PruningMethod:
        return get_method(self.value)

    @property
    def needs_calibration(self) -> bool:
        return self.spec.needs_calibration

    @property
    def trains_weights(self) -> bool:
        """The method updates weights, so the model is held in fp32 master weights (autocast on CUDA)."""
        return self.spec.trains_weights


PruneMethod = _RegisteredMethod("PruneMethod", {name.upper(): name for name in all_methods()})
"""Every registered method: TRSP, 2SSP, SHORTGPT, ANGULAR, SLEB, LAST, RANDOM and any method registered after them."""

BASELINE_METHODS: tuple[PruneMethod, ...] = tuple(
    m for m in PruneMethod if not m.trains_weights and not m.spec.edits_model and m.spec.removes_layers
)
"""The registered methods that select whole layers without training or editing the model (the baselines)."""
