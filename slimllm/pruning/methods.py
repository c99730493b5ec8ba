"""The closed set of pruning methods."""

from __future__ import annotations

from enum import Enum


class PruneMethod(str, Enum):
    TRSP = "trsp"
    """Two-stage regularization-based structured pruning: learned gates select, knowledge transfer, removal."""
    SHORTGPT = "shortgpt"
    """ShortGPT Block Influence: remove the k layers whose output is most similar to their input."""
    ANGULAR = "angular"
    """Gromov et al.: remove the contiguous block of k layers with the smallest angular distance across it."""
    SLEB = "sleb"
    """SLEB-style greedy: repeatedly remove the layer whose removal hurts the calibration loss least."""
    LAST = "last"
    """The last k candidate layers (the final layer is protected by default)."""
    RANDOM = "random"
    """k candidate layers drawn with the seed."""

    @property
    def needs_calibration(self) -> bool:
        return self not in (PruneMethod.LAST, PruneMethod.RANDOM)

    @property
    def trains_weights(self) -> bool:
        """The method updates weights, so the model is held in fp32 master weights (autocast on CUDA)."""
        return self is PruneMethod.TRSP


BASELINE_METHODS: tuple[PruneMethod, ...] = tuple(m for m in PruneMethod if m is not PruneMethod.TRSP)
"""The methods `slimllm.pruning.baselines.select_layers` implements."""
