"""Training-free repair after removing layers, for every selection method.

    >>> report = repair_before_removal(model, removed=[3, 12, 13], blocks=calibration.blocks, batch_size=2,
    ...                                method=RepairMethod.LSQ, ridge=1e-3)

`lsq` is ReplaceMe's least-squares transform (arXiv 2505.02819). For each contiguous run of removed layers
[i+1 .. j], with block i the last kept block before it, calibration tokens give M (block i's MLP output, before the
residual add), Y (block i's residual stream after its attention, so that block i's output is Y + M) and L (the
output of block j, the last removed block). The ridge solution T = (MᵀM + αI)⁻¹ Mᵀ(L − Y), accumulated in float64
with α = ridge × mean(diag MᵀM), makes block i's output Y + M·T approximate what block j produced; it is folded into
block i's `down_proj` (W ← TᵀW, b ← Tᵀb), so the repaired model has no new parameters and stays a standard
checkpoint. Runs are processed in order, each on the model with the earlier runs already skipped and repaired.

The figure recorded for each run is the relative error of block i's output against L on the calibration tokens,
‖Y + M·T − L‖ / ‖L‖, before (T = I) and after the fold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import Enum

import torch
from torch import nn

from slimllm.architectures import decoder_layers
from slimllm.errors import UserInputError
from slimllm.pruning.layer_io import layer_output_tensor, layers_skipped

Progress = Callable[..., None]


class RepairMethod(str, Enum):
    NONE = "none"
    LSQ = "lsq"


@dataclass
class RunRepair:
    """What the repair did for one contiguous run of removed layers (original indices)."""

    removed: list[int]
    folded_into: int | None
    """The kept layer whose down_proj holds the transform; None where no layer precedes the run."""
    error_before: float | None = None
    error_after: float | None = None
    note: str = ""


def contiguous_runs(removed: Sequence[int]) -> list[list[int]]:
    """[3, 12, 13, 14, 25] -> [[3], [12, 13, 14], [25]]."""
    runs: list[list[int]] = []
    for index in sorted(set(removed)):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


class _StopForward(Exception):
    """Raised by the last hook of a pass: the layers after the run are not needed."""


@dataclass
class _Moments:
    """Float64 sums over calibration tokens for one run, with D = L − Y: MᵀM, MᵀD, ‖D‖², tr(MᵀD) and ‖L‖²."""

    mtm: torch.Tensor
    mtd: torch.Tensor
    dtd: float = 0.0
    target_norm: float = 0.0
    trace_md: float = 0.0
    """tr(Mᵀ D): with tr(MᵀM) the error at T = I."""

    def add(self, m: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> None:
        m, d = m.reshape(-1, m.shape[-1]).double(), (target - y).reshape(-1, m.shape[-1]).double()
        self.mtm += m.T @ m
        self.mtd += m.T @ d
        self.dtd += float((d * d).sum())
        self.trace_md += float((m * d).sum())
        self.target_norm += float(target.double().pow(2).sum())

    def error(self, transform: torch.Tensor | None) -> float:
        """‖M·T − D‖ / ‖L‖ from the sums (T = I when None)."""
        if transform is None:
            squared = float(torch.trace(self.mtm)) - 2 * self.trace_md + self.dtd
        else:
            squared = float((transform * (self.mtm @ transform)).sum()) - 2 * float((transform * self.mtd).sum())
            squared += self.dtd
        return math.sqrt(max(squared, 0.0) / max(self.target_norm, 1e-30))


def _mlp_of(layer: nn.Module) -> nn.Module:
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not isinstance(getattr(mlp, "down_proj", None), nn.Linear):
        raise UserInputError("--repair lsq needs decoder layers with an `mlp.down_proj` linear layer")
    if hasattr(layer, "post_feedforward_layernorm"):
        raise UserInputError("--repair lsq cannot fold through a norm after the MLP (Gemma-style layers); "
                             "use --repair none")
    return mlp


@torch.no_grad()
def _collect(model: nn.Module, fold: int, last: int, blocks: torch.Tensor, batch_size: int,
             skipped: Sequence[int]) -> _Moments:
    """Run the calibration blocks up to layer `last` (earlier runs skipped) and sum the moments of the fold."""
    layers = decoder_layers(model)
    hidden = model.config.hidden_size
    moments = _Moments(*(torch.zeros(hidden, hidden, dtype=torch.float64) for _ in range(2)))
    captured: dict[str, torch.Tensor] = {}
    device = next(model.parameters()).device

    def on_mlp(module, args, output):
        captured["m"] = output.detach().float()

    def on_fold(module, args, output):
        captured["out"] = layer_output_tensor(output).detach().float()

    def on_last(module, args, output):
        m = captured["m"]
        moments.add(m.cpu(), (captured["out"] - m).cpu(), layer_output_tensor(output).detach().float().cpu())
        raise _StopForward

    handles = [
        _mlp_of(layers[fold]).register_forward_hook(on_mlp),
        layers[fold].register_forward_hook(on_fold),
        layers[last].register_forward_hook(on_last),
    ]
    try:
        with layers_skipped(model, skipped):
            for start in range(0, blocks.shape[0], batch_size):
                try:
                    model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return moments


def solve_transform(moments: _Moments, ridge: float) -> torch.Tensor:
    """T = (MᵀM + αI)⁻¹ Mᵀ D in float64, α = ridge × mean(diag MᵀM)."""
    alpha = ridge * float(torch.diagonal(moments.mtm).mean())
    system = moments.mtm + alpha * torch.eye(moments.mtm.shape[0], dtype=torch.float64)
    return torch.linalg.solve(system, moments.mtd)


@torch.no_grad()
def fold_into_down_proj(layer: nn.Module, transform: torch.Tensor) -> None:
    """Make the MLP output M·T: W ← TᵀW (and b ← Tᵀb), in float64, stored back in the weight's dtype."""
    down = _mlp_of(layer).down_proj
    weight = down.weight.double()
    down.weight.copy_((transform.T.to(weight.device) @ weight).to(down.weight.dtype))
    if down.bias is not None:
        down.bias.copy_((transform.T.to(weight.device) @ down.bias.double()).to(down.bias.dtype))


def lsq_repair(model: nn.Module, removed: Sequence[int], blocks: torch.Tensor, batch_size: int, ridge: float,
               progress: Progress | None = None) -> list[RunRepair]:
    """Fold one least-squares transform per run of `removed` into the model (which still has every layer)."""
    runs = contiguous_runs(removed)
    done: list[int] = []
    repairs = []
    for number, run in enumerate(runs):
        fold = run[0] - 1
        if fold < 0:
            repairs.append(RunRepair(run, None, note="no kept layer precedes this run; left as removed"))
        else:
            moments = _collect(model, fold, run[-1], blocks, batch_size, skipped=done)
            transform = solve_transform(moments, ridge)
            fold_into_down_proj(decoder_layers(model)[fold], transform)
            repairs.append(RunRepair(run, fold, moments.error(None), moments.error(transform)))
        done += run
        if progress:
            progress(number + 1, len(runs), stage="repair")
    return repairs


def repair_before_removal(
    model: nn.Module,
    removed: Sequence[int],
    blocks: torch.Tensor | None,
    batch_size: int,
    method: RepairMethod,
    ridge: float,
    progress: Progress | None = None,
) -> dict | None:
    """Apply the chosen repair to `model` (all layers still present); returns its record, None for `none`."""
    method = RepairMethod(method)
    if method is RepairMethod.NONE:
        return None
    if blocks is None:
        raise UserInputError(f"--repair {method.value} needs calibration text; pass --calib")
    runs = lsq_repair(model, removed, blocks, batch_size, ridge, progress)
    return {"method": method.value, "ridge": ridge, "runs": [asdict(r) for r in runs]}
