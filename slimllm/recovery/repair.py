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

`comp` is Prune&Comp's magnitude compensation (arXiv 2507.18212). Removing layer i leaves layer i + 1 reading x_i
where it used to read x_{i+1}, which is larger: every block adds to the residual stream. Layers are removed one at a
time, in order; before each removal the stream entering it is scaled by α = mean over channels of
mean|x_{i+1}| / mean|x_i| (token means on calibration data, in the model with the earlier removals applied). The
scale is folded exactly: the token embedding and every earlier block's o_proj and down_proj (weights and biases) are
multiplied by α, which scales the whole stream up to the cut, while every norm that reads the stream cancels the
scale (up to RMSNorm's eps). A tied embedding is untied first, or the LM head would be scaled too; the record says so.
Its figure is ‖α·x_i − x_{i+1}‖ / ‖x_{i+1}‖ against α = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import Enum

import torch
from torch import nn

from slimllm.core.errors import UserInputError
from slimllm.core.placement import input_device
from slimllm.core.progress import Progress
from slimllm.models.architectures import architecture_for, decoder_layers, get_submodule
from slimllm.models.layer_io import layer_input_tensor, layer_output_tensor, layers_skipped


class RepairMethod(str, Enum):
    NONE = "none"
    LSQ = "lsq"
    COMP = "comp"


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


def _calibration_pass(model: nn.Module, blocks: torch.Tensor, batch_size: int, skipped: Sequence[int]) -> None:
    """Run the calibration blocks through the model without the `skipped` layers; the caller's hooks gather what
    they need and may end each batch early with `_StopForward`."""
    device = input_device(model)
    with layers_skipped(model, skipped):
        for start in range(0, blocks.shape[0], batch_size):
            try:
                model(input_ids=blocks[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass


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
    _refuse_post_norms(layer, "lsq")
    return mlp


def _refuse_post_norms(layer: nn.Module, method: str) -> None:
    if hasattr(layer, "post_feedforward_layernorm"):
        raise UserInputError(f"--repair {method} cannot fold through a norm after the MLP (Gemma-style layers); "
                             "use --repair none")


@torch.no_grad()
def _collect(model: nn.Module, fold: int, last: int, blocks: torch.Tensor, batch_size: int,
             skipped: Sequence[int]) -> _Moments:
    """Run the calibration blocks up to layer `last` (earlier runs skipped) and sum the moments of the fold."""
    layers = decoder_layers(model)
    hidden = model.config.hidden_size
    moments = _Moments(*(torch.zeros(hidden, hidden, dtype=torch.float64) for _ in range(2)))
    captured: dict[str, torch.Tensor] = {}

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
        _calibration_pass(model, blocks, batch_size, skipped)
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


@dataclass
class _ScaleMoments:
    """Token sums for one cut: per-channel Σ|x_i| and Σ|x_{i+1}|, and Σ x_i·x_{i+1}, Σ‖x_i‖², Σ‖x_{i+1}‖²."""

    abs_in: torch.Tensor
    abs_out: torch.Tensor
    cross: float = 0.0
    in_norm: float = 0.0
    out_norm: float = 0.0

    def add(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        x_in, x_out = x_in.reshape(-1, x_in.shape[-1]).double(), x_out.reshape(-1, x_out.shape[-1]).double()
        self.abs_in += x_in.abs().sum(0)
        self.abs_out += x_out.abs().sum(0)
        self.cross += float((x_in * x_out).sum())
        self.in_norm += float(x_in.pow(2).sum())
        self.out_norm += float(x_out.pow(2).sum())

    def scale(self) -> float:
        """α = mean over channels of mean|x_{i+1}| / mean|x_i| (channels where x_i is never non-zero are left out)."""
        live = self.abs_in > 0
        return float((self.abs_out[live] / self.abs_in[live]).mean()) if bool(live.any()) else 1.0

    def error(self, alpha: float) -> float:
        """‖α·x_i − x_{i+1}‖ / ‖x_{i+1}‖ from the sums."""
        squared = alpha * alpha * self.in_norm - 2 * alpha * self.cross + self.out_norm
        return math.sqrt(max(squared, 0.0) / max(self.out_norm, 1e-30))


@torch.no_grad()
def _collect_scale(model: nn.Module, layer: int, blocks: torch.Tensor, batch_size: int,
                   skipped: Sequence[int]) -> _ScaleMoments:
    """Input and output of `layer` on the calibration blocks, with the `skipped` layers already gone."""
    hidden = model.config.hidden_size
    moments = _ScaleMoments(torch.zeros(hidden, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64))

    def on_layer(module, args, kwargs, output):
        moments.add(layer_input_tensor(args, kwargs).detach().float().cpu(),
                    layer_output_tensor(output).detach().float().cpu())
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(on_layer, with_kwargs=True)
    try:
        _calibration_pass(model, blocks, batch_size, skipped)
    finally:
        handle.remove()
    return moments


def untie_embeddings(model: nn.Module) -> bool:
    """Give the LM head its own copy of a tied embedding matrix; True when it was tied."""
    arch = architecture_for(model.config)
    embed = get_submodule(model, arch.embed_tokens_path)
    head = get_submodule(model, arch.lm_head_path)
    if head.weight is not embed.weight:
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    return True


@torch.no_grad()
def scale_stream_before(model: nn.Module, layer: int, alpha: float) -> None:
    """Multiply the residual stream entering `layer` by α, folded into the embedding and the earlier blocks' output
    projections. The LM head must not share the embedding's weight (see `untie_embeddings`)."""
    arch = architecture_for(model.config)
    targets = [get_submodule(model, arch.embed_tokens_path)]
    for block in list(decoder_layers(model))[:layer]:
        _refuse_post_norms(block, "comp")
        attention = getattr(block, "self_attn", None)
        projections = [getattr(attention, "o_proj", None), getattr(getattr(block, "mlp", None), "down_proj", None)]
        if not all(isinstance(p, nn.Linear) for p in projections):
            raise UserInputError("--repair comp needs decoder layers with `self_attn.o_proj` and `mlp.down_proj`")
        targets += projections
    for module in targets:
        module.weight.mul_(alpha)
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(alpha)


def comp_repair(model: nn.Module, removed: Sequence[int], blocks: torch.Tensor, batch_size: int,
                progress: Progress | None = None) -> tuple[list[RunRepair], bool]:
    """Scale before each removed layer, one at a time in order; returns the records and whether the head was untied."""
    untied = untie_embeddings(model)
    done: list[int] = []
    repairs = []
    ordered = sorted(set(removed))
    for number, layer in enumerate(ordered):
        moments = _collect_scale(model, layer, blocks, batch_size, skipped=done)
        alpha = moments.scale()
        scale_stream_before(model, layer, alpha)
        repairs.append(RunRepair([layer], None, moments.error(1.0), moments.error(alpha), note=f"alpha={alpha:.6g}"))
        done.append(layer)
        if progress:
            progress(number + 1, len(ordered), stage="repair")
    return repairs, untied


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
    if method is RepairMethod.COMP:
        runs, untied = comp_repair(model, removed, blocks, batch_size, progress)
        return {"method": method.value, "untied_embeddings": untied, "runs": [asdict(r) for r in runs]}
    runs = lsq_repair(model, removed, blocks, batch_size, ridge, progress)
    return {"method": method.value, "ridge": ridge, "runs": [asdict(r) for r in runs]}
