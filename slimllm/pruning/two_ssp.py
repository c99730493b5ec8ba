"""2SSP (arXiv 2501.17771): FFN neurons in every block (width), then whole attention modules (depth).

    >>> budget = balance_budget(block_parameters(model), num_layers=30, d_ff=1536, sparsity=0.25)
    >>> budget.attention_modules, budget.ffn_kept
    (2, 1058)

One sparsity target s (a fraction of the decoder blocks' parameters) is split between the two stages by the paper's
balancing rule (α = 1.5): N_A = round(N · s^((P_mlp / P_attn) / α)) attention modules go, and every block keeps
K = round(d_ff · (1 − ((s·P_main − N_A·P_attn) / N) / P_mlp)) FFN neurons. Stage 1 keeps each block's top-K neurons
by their activation norm at the input of `down_proj` (`slimllm.pruning.width`); stage 2 removes attention modules
greedily, each round the one whose removal gives the lowest calibration perplexity. The first block's attention is
never removed (llama.cpp reads head sizes from layer 0; caches read the sequence length there).
`../shared/METHODS.md` §1 has the formulas and the reference's defaults; `docs/design-notes.md` what we chose.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from slimllm.architectures import decoder_layers
from slimllm.device import model_autocast
from slimllm.errors import UserInputError
from slimllm.evaluate import causal_lm_loss_sum
from slimllm.pruning.layer_io import attention_skipped, run_from_layer, trace_decoder
from slimllm.pruning.width import ffn_of

Progress = Callable[..., None]


class WidthRounding(str, Enum):
    """What the kept FFN width is rounded to: llama.cpp's K-quants need widths divisible by 256."""

    NONE = "none"
    M64 = "64"
    M256 = "256"

    @property
    def multiple(self) -> int:
        return 1 if self is WidthRounding.NONE else int(self.value)


class TwoSspStage(str, Enum):
    BOTH = "both"
    WIDTH = "width"
    ATTENTION = "attention"


@dataclass(frozen=True)
class BlockParameters:
    """Parameters of one decoder block's attention and FFN, and of all blocks (norms included; embeddings and the
    LM head excluded), counted from the real modules."""

    attention: int
    ffn: int
    main: int


@dataclass(frozen=True)
class Budget:
    attention_modules: int
    """N_A: attention modules to remove."""
    ffn_kept: int
    """K: FFN neurons every block keeps (after rounding)."""
    ffn_kept_unrounded: int
    """K as the balancing rule gives it, before rounding."""
    sparsity: float
    """The achieved fraction of the blocks' parameters removed."""


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_parameters(model: nn.Module) -> BlockParameters:
    """P_attn, P_mlp (of the first block; every block must match) and P_main."""
    layers = decoder_layers(model)
    sizes = {(_count(layer.self_attn), _count(ffn_of(layer))) for layer in layers}
    if len(sizes) != 1:
        raise UserInputError("2SSP needs a model whose blocks are all the same size; this one was already pruned")
    attention, ffn = sizes.pop()
    return BlockParameters(attention, ffn, sum(_count(layer) for layer in layers))


def balance_budget(
    params: BlockParameters,
    num_layers: int,
    d_ff: int,
    sparsity: float,
    alpha: float = 1.5,
    rounding: WidthRounding = WidthRounding.M256,
    stage: TwoSspStage = TwoSspStage.BOTH,
) -> Budget:
    """N_A and K for a target sparsity; one stage alone takes the whole target. An unreachable target is a user
    error saying what the model allows."""
    if not 0.0 < sparsity < 1.0:
        raise UserInputError(f"--sparsity must be between 0 and 1 (exclusive), got {sparsity}")
    if alpha <= 0:
        raise UserInputError(f"--alpha must be positive, got {alpha}")
    target = sparsity * params.main
    if stage is TwoSspStage.WIDTH:
        n_attention = 0
    elif stage is TwoSspStage.ATTENTION:
        n_attention = round(target / params.attention)
    else:
        n_attention = round(num_layers * sparsity ** ((params.ffn / params.attention) / alpha))
    if n_attention > num_layers - 1:
        most = (num_layers - 1) * params.attention / params.main
        raise UserInputError(
            f"--sparsity {sparsity} needs {n_attention} attention modules removed, but only {num_layers - 1} may go "
            f"(the first block keeps its attention; at most {most:.3f} of the blocks' parameters); lower --sparsity "
            "or use --stage both"
        )
    if stage is TwoSspStage.BOTH and n_attention * params.attention > target:
        raise UserInputError(
            f"--sparsity {sparsity}: the balancing rule removes {n_attention} attention modules, more than the "
            f"target; raise --alpha or --sparsity, or use --stage width"
        )
    if stage is TwoSspStage.ATTENTION:
        k_exact = d_ff
    else:
        per_block = (target - n_attention * params.attention) / num_layers
        k_exact = round(d_ff * (1.0 - per_block / params.ffn))
        if k_exact < 1:
            raise UserInputError(
                f"--sparsity {sparsity} cannot be reached: the FFNs would keep no neurons; lower --sparsity"
            )
    multiple = rounding.multiple
    k = k_exact if stage is TwoSspStage.ATTENTION else min(d_ff, max(multiple, multiple * round(k_exact / multiple)))
    per_neuron = params.ffn / d_ff
    removed = n_attention * params.attention + num_layers * (d_ff - k) * per_neuron
    return Budget(n_attention, k, k_exact, removed / params.main)


@dataclass
class AttentionSearch:
    removed: list[int] = field(default_factory=list)
    """Block indices whose attention goes, in the order chosen."""
    perplexities: list[dict[str, float]] = field(default_factory=list)
    """Per round, the calibration perplexity of removing each remaining attention module."""


@torch.no_grad()
def greedy_attention_removal(
    model: nn.Module,
    blocks: torch.Tensor,
    count: int,
    candidates: Sequence[int],
    batch_size: int,
    progress: Progress | None = None,
) -> AttentionSearch:
    """`count` rounds; in each, the candidate whose attention's removal (with those already chosen) gives the lowest
    perplexity on `blocks`. Each round traces the layer inputs once and re-runs only the suffix per candidate."""
    device = next(model.parameters()).device
    search = AttentionSearch()
    for round_index in range(count):
        alive = [c for c in candidates if c not in search.removed]
        losses = dict.fromkeys(alive, 0.0)
        tokens = 0
        with attention_skipped(model, search.removed):
            for start in range(0, blocks.shape[0], batch_size):
                batch = blocks[start : start + batch_size].to(device)
                with model_autocast(model):
                    trace = trace_decoder(model, batch, keep_kwargs=True)
                    for candidate in alive:
                        with attention_skipped(model, [candidate]):
                            loss, scored = causal_lm_loss_sum(run_from_layer(model, trace, start=candidate), batch)
                        losses[candidate] += loss
                tokens += scored
        search.perplexities.append({str(c): math.exp(losses[c] / tokens) for c in alive})
        search.removed.append(min(alive, key=lambda c: (losses[c], c)))
        if progress:
            progress(round_index + 1, count)
    return search
