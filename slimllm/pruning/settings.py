"""`PruneSettings`: what every pruning method shares (method, k, protection, calibration, seed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimllm.core.errors import UserInputError
from slimllm.pruning.choices import PruneMethod
from slimllm.recovery.repair import RepairMethod


@dataclass
class PruneSettings:
    """Settings of `slimllm prune` shared by every method (each method's own are in its settings class)."""

    method: PruneMethod = PruneMethod.SHORTGPT
    """Pruning method (default: ShortGPT, which with the least-squares repair and healing is the best measured
    recipe at 8 of 30 layers of SmolLM2-135M; see docs/benchmarks.md, Recovery)."""
    remove: int | None = None
    """Number of layers to remove (exclusive with `ratio`)."""
    ratio: float | None = None
    """Fraction of all layers to remove, rounded to a whole layer (exclusive with `remove`)."""
    protect_first: int = 0
    """The first N layers are never removed."""
    protect_last: int = 1
    """The last M layers are never removed; the final layer feeds the LM head directly."""
    calib: str = "self"
    """Calibration text: `self` (the model writes it; offline), wikitext2, c4 or a local file."""
    calib_blocks: int = 16
    """Number of calibration blocks."""
    block_len: int = 512
    """Tokens per calibration block."""
    batch_size: int = 2
    """Calibration blocks per forward pass."""
    seed: int = 0
    """Seed for block sampling, `self` text and the random method."""
    repair: RepairMethod | None = None
    """Training-free repair after removal: lsq (ReplaceMe's least-squares transform, folded into down_proj), comp
    (Prune&Comp's magnitude compensation, folded into the embedding and earlier blocks; unties a tied head) or none.
    Unset: lsq for a method that removes layers without training the kept ones, none otherwise."""
    repair_ridge: float = 1e-3
    """lsq: ridge term, as a fraction of the mean diagonal of MᵀM."""

    def __post_init__(self) -> None:
        self.method = PruneMethod(self.method)
        self.repair = RepairMethod(self.repair) if self.repair is not None else None
        if self.repair_ridge < 0:
            raise UserInputError(f"--repair-ridge must be >= 0, got {self.repair_ridge}")
        if self.calib_blocks < 1 or self.block_len < 2 or self.batch_size < 1:
            raise UserInputError("--calib-blocks, --block-len and --batch-size must be positive (block-len >= 2)")

    def resolved_repair(self, method_settings: Any = None, architecture: Any = None) -> RepairMethod:
        """The repair that runs: the one asked for, else the method's default (`PruningMethod.default_repair`),
        which is none for an architecture whose MLP output is normalized before the residual (Gemma)."""
        if self.repair is not None:
            return self.repair
        if architecture is not None and not architecture.mlp_output_is_linear:
            return RepairMethod.NONE
        return self.method.spec.default_repair(method_settings)
