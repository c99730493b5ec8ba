"""Which layers a method may remove, and how many: shared by every pruning method.

>>> candidate_layers(num_layers=30, protect_first=0, protect_last=1)
[0, 1, ..., 28]
"""

from __future__ import annotations

from slimllm.core.errors import UserInputError


def layers_to_remove(num_layers: int, remove: int | None, ratio: float | None) -> int:
    """k from `--remove K` or `--ratio R` (R of all layers, rounded), validated."""
    if (remove is None) == (ratio is None):
        raise UserInputError("pass exactly one of --remove K or --ratio R")
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise UserInputError(f"--ratio must be between 0 and 1 (exclusive), got {ratio}")
        remove = round(ratio * num_layers)
        if remove < 1:
            raise UserInputError(
                f"--ratio {ratio} of {num_layers} layers rounds to 0 layers; use a larger ratio or --remove"
            )
    assert remove is not None
    if remove < 1:
        raise UserInputError(f"--remove must be a positive number of layers, got {remove}")
    return remove


def candidate_layers(num_layers: int, protect_first: int, protect_last: int) -> list[int]:
    """Original indices of the layers that are not protected."""
    if protect_first < 0 or protect_last < 0:
        raise UserInputError(f"--protect-first and --protect-last must be >= 0, got {protect_first} and {protect_last}")
    return list(range(protect_first, max(protect_first, num_layers - protect_last)))


def check_removable(num_layers: int, k: int, candidates: list[int]) -> None:
    """At least one candidate must stay: removing every candidate is not pruning, it is a different model."""
    if k >= len(candidates):
        raise UserInputError(
            f"cannot remove {k} layers: the model has {num_layers} layers and only {len(candidates)} are candidates "
            f"(after the protected first/last layers); remove fewer than {len(candidates)} layers or protect fewer"
        )
