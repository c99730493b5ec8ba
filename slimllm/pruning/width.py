"""FFN width: score each FFN neuron on calibration text, and keep the chosen neurons of every block (surgery).

    >>> scores = ffn_neuron_scores(model, blocks, batch_size=2)     # one [d_ff] tensor per block
    >>> keep = top_neurons(scores, k=1024)
    >>> keep_ffn_neurons(model, keep, inplace=True)                 # config.intermediate_size is now 1024

A neuron's score is the L2 norm over a sequence's tokens of its activation at the input of `down_proj`
(act(gate(x)) · up(x)), averaged over calibration sequences (2SSP, `../shared/METHODS.md` §1). Keeping neurons
slices rows of `gate_proj`/`up_proj` and columns of `down_proj`: the result is the original architecture with a
smaller `intermediate_size`, so it loads, exports and runs everywhere unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from slimllm.core.errors import UserInputError
from slimllm.core.progress import Progress
from slimllm.models.architectures import decoder_layers
from slimllm.models.layer_io import stream_layers

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def ffn_of(layer: nn.Module) -> nn.Module:
    """A decoder layer's gated FFN (gate_proj, up_proj, down_proj)."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, name) for name in FFN_PROJECTIONS):
        raise UserInputError(
            f"{type(layer).__name__} has no gated FFN (mlp.gate_proj/up_proj/down_proj); width pruning needs one"
        )
    return mlp


def ffn_width(model: nn.Module) -> int:
    """The FFN width shared by every block (width pruning keeps one width for all blocks)."""
    widths = {ffn_of(layer).down_proj.in_features for layer in decoder_layers(model)}
    if len(widths) != 1:
        raise UserInputError(f"the model's blocks have different FFN widths {sorted(widths)}; expected one width")
    return widths.pop()


@torch.no_grad()
def ffn_neuron_scores(
    model: nn.Module, blocks: torch.Tensor, batch_size: int, progress: Progress | None = None
) -> list[torch.Tensor]:
    """Per block, the mean over calibration sequences of ‖activation‖₂ over the sequence's tokens, at the input of
    `down_proj` (float32, on the CPU). Computed block by block (`stream_layers`)."""
    layers = decoder_layers(model)
    sums = [torch.zeros(ffn_of(layer).down_proj.in_features, dtype=torch.float64) for layer in layers]

    def hook_for(index: int):
        def hook(_module, args):
            activation = args[0].float()  # [batch, tokens, d_ff]
            sums[index] += activation.norm(dim=1).sum(dim=0).double().cpu()

        return hook

    handles = [ffn_of(layer).down_proj.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        stream_layers(model, blocks, batch_size, lambda *_: None, progress)
    finally:
        for handle in handles:
            handle.remove()
    return [(s / blocks.shape[0]).float() for s in sums]


def top_neurons(scores: Sequence[torch.Tensor], k: int) -> list[list[int]]:
    """The `k` highest-scoring neurons of every block, as sorted indices (ties: the lower index)."""
    keep = []
    for block_scores in scores:
        if not 0 < k <= block_scores.numel():
            raise UserInputError(f"cannot keep {k} of {block_scores.numel()} FFN neurons")
        order = torch.argsort(-block_scores, stable=True)[:k]
        keep.append(sorted(int(i) for i in order))
    return keep


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep `index` along the weight's `dim` (0: output rows, 1: input columns), in place."""
    linear.weight = nn.Parameter(linear.weight.data.index_select(dim, index).clone(),
                                 requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).clone(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = index.numel()
    else:
        linear.in_features = index.numel()


def keep_ffn_neurons(model: nn.Module, keep: Sequence[Sequence[int]], inplace: bool = False) -> nn.Module:
    """The model with only the `keep[l]` FFN neurons of block l; `config.intermediate_size` is set to their number.

    Every block must keep the same number of neurons (transformers' config holds one width). The input model is
    left untouched unless `inplace`."""
    layers = decoder_layers(model)
    if len(keep) != len(layers):
        raise ValueError(f"keep lists {len(keep)} blocks, the model has {len(layers)}")
    widths = {len(k) for k in keep}
    if len(widths) != 1:
        raise UserInputError(f"every block must keep the same number of FFN neurons, got {sorted(widths)}")
    width = ffn_width(model)
    for block, indices in enumerate(keep):
        if len(set(indices)) != len(indices) or not all(0 <= int(i) < width for i in indices):
            raise UserInputError(f"block {block}: FFN neuron indices must be distinct and in [0, {width})")
    if not inplace:
        model = copy.deepcopy(model)
    for layer, indices in zip(decoder_layers(model), keep, strict=True):
        mlp = ffn_of(layer)
        index = torch.tensor(sorted(int(i) for i in indices), dtype=torch.long, device=mlp.down_proj.weight.device)
        _slice_linear(mlp.gate_proj, index, 0)
        _slice_linear(mlp.up_proj, index, 0)
        _slice_linear(mlp.down_proj, index, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = index.numel()
    model.config.intermediate_size = widths.pop()
    return model
