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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from slimllm.core.artifacts import plain
from slimllm.core.errors import UserInputError
from slimllm.core.progress import Progress
from slimllm.models.architectures import decoder_layers
from slimllm.pruning.greedy import greedy_removal, without_attention
from slimllm.pruning.registry import BenchmarkVariant, PlannedWork, PruningMethod, Selection, SelectionRequest, register
from slimllm.pruning.width import ffn_neuron_scores, ffn_of, ffn_width, keep_ffn_neurons, top_neurons


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
    input_norm: int = 0
    """The norm before attention, which goes with it."""


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
    norm = getattr(layers[0], "input_layernorm", None)
    return BlockParameters(attention, ffn, sum(_count(layer) for layer in layers),
                           _count(norm) if norm is not None else 0)


def balance_budget(
    params: BlockParameters,
    num_layers: int,
    d_ff: int,
    sparsity: float,
    alpha: float = 1.5,
    rounding: WidthRounding = WidthRounding.M256,
    stage: TwoSspStage = TwoSspStage.BOTH,
    fill_rounding: bool = True,
) -> Budget:
    """N_A and K for a target sparsity; one stage alone takes the whole target. An unreachable target is a user
    error saying what the model allows. With `fill_rounding`, what rounding K up leaves of the target goes to more
    attention modules (K rounded down keeps the rule's N_A: the target is passed, not missed)."""
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
    per_attention = params.attention + params.input_norm
    if fill_rounding and stage is TwoSspStage.BOTH and k > k_exact:
        # Rounding the width up left part of the target unspent: more attention modules take it up.
        short = target - num_layers * (d_ff - k) * per_neuron
        n_attention = min(num_layers - 1, max(n_attention, round(short / per_attention)))
    removed = n_attention * per_attention + num_layers * (d_ff - k) * per_neuron
    return Budget(n_attention, k, k_exact, removed / params.main)


@dataclass
class AttentionSearch:
    removed: list[int] = field(default_factory=list)
    """Block indices whose attention goes, in the order chosen."""
    perplexities: list[dict[str, float]] = field(default_factory=list)
    """Per round, the calibration perplexity of removing each remaining attention module."""


def greedy_attention_removal(
    model: nn.Module,
    blocks: torch.Tensor,
    count: int,
    candidates: Sequence[int],
    batch_size: int,
    progress: Progress | None = None,
) -> AttentionSearch:
    """`count` rounds; in each, the candidate whose attention's removal (with those already chosen) gives the lowest
    perplexity on `blocks`."""
    search = greedy_removal(model, blocks, count, candidates, batch_size, without_attention(model), progress)
    return AttentionSearch(search.removed, [{c: math.exp(loss) for c, loss in round_losses.items()}
                                            for round_losses in search.mean_losses])


@dataclass
class TwoSspSettings:
    """2SSP's own settings (recipe section `[2ssp]`)."""

    sparsity: float = 0.25
    """Fraction of the decoder blocks' parameters to remove (norms included; embeddings and LM head excluded)."""
    alpha: float = 1.5
    """Balancing rule: larger alpha moves more of the target from the FFNs to whole attention modules."""
    width_multiple: WidthRounding = WidthRounding.M256
    """Round the kept FFN width to a multiple of 64 or 256 (llama.cpp's K-quants need 256), or none."""
    stage: TwoSspStage = TwoSspStage.BOTH
    """Run both stages, or one alone with the whole target: width (FFN neurons) or attention (whole modules)."""
    attention_blocks: int = 4
    """Calibration blocks on which stage 2 measures perplexity (the reference uses one 2048-token sequence)."""
    fill_rounding: bool = True
    """When rounding the FFN width up leaves the target short, remove more attention modules to reach it (false:
    the balancing rule's count, and the sparsity falls short by what the rounding kept)."""

    def __post_init__(self) -> None:
        self.width_multiple = WidthRounding(getattr(self.width_multiple, "value", str(self.width_multiple)))
        self.stage = TwoSspStage(self.stage)
        if self.attention_blocks < 1:
            raise UserInputError(f"--attention-blocks must be positive, got {self.attention_blocks}")


def _summary(scores: torch.Tensor) -> dict[str, float]:
    quantiles = torch.quantile(scores.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"min": float(scores.min()), "p10": float(quantiles[0]), "median": float(quantiles[1]),
            "p90": float(quantiles[2]), "max": float(scores.max())}


@register
class TwoSsp(PruningMethod):
    name = "2ssp"
    rank = 20
    description = "2SSP: keep the top FFN neurons of every block, then remove whole attention modules greedily."
    settings_class = TwoSspSettings
    removes_layers = False
    edits_model = True


    def benchmark_variants(self) -> list[BenchmarkVariant]:
        """2SSP at the block-parameter sparsity of removing the benchmark's k whole layers (`sparsity` "depth")."""
        return [BenchmarkVariant("2ssp", options=(("sparsity", "depth"),))]

    def planned_work(self, settings, k, num_layers, calib_blocks, block_len, batch_size) -> PlannedWork:
        settings = settings or TwoSspSettings()
        # Greedy attention search: about sparsity x layers rounds, each scoring every block (half a pass each).
        rounds = max(1, round(settings.sparsity * num_layers / 4))
        search = settings.attention_blocks * block_len * rounds * num_layers // 2
        return PlannedWork(selection_tokens=calib_blocks * block_len + search, ffn_kept=1.0 - settings.sparsity)

    def select(self, request: SelectionRequest) -> Selection:
        """Both stages on `request.model` (a copy the caller owns): width surgery in place, then a new model whose
        chosen blocks have no attention. No whole layer is removed."""
        from slimllm.models.attention_free import remove_attention

        settings = request.settings or TwoSspSettings()
        model = request.model
        params = block_parameters(model)
        num_layers = len(decoder_layers(model))
        d_ff = ffn_width(model)
        budget = balance_budget(params, num_layers, d_ff, settings.sparsity, settings.alpha,
                                settings.width_multiple, settings.stage, settings.fill_rounding)
        details: dict = {
            "twossp_settings": plain(settings),
            "attention_params_per_block": params.attention,
            "ffn_params_per_block": params.ffn,
            "block_params": params.main,
            "ffn_kept": budget.ffn_kept,
            "ffn_kept_unrounded": budget.ffn_kept_unrounded,
            "ffn_width_before": d_ff,
            "attention_modules_removed": budget.attention_modules,
            "target_sparsity": settings.sparsity,
            "achieved_sparsity": budget.sparsity,
        }
        started = time.perf_counter()
        if budget.ffn_kept < d_ff:
            scores = ffn_neuron_scores(model, request.blocks, request.batch_size, request.stage_progress("width"))
            keep_ffn_neurons(model, top_neurons(scores, budget.ffn_kept), inplace=True)
            details["neuron_scores"] = {str(i): _summary(s) for i, s in enumerate(scores)}
        details["width_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        search = AttentionSearch()
        if budget.attention_modules:
            blocks = request.blocks[: settings.attention_blocks]
            search = greedy_attention_removal(model, blocks, budget.attention_modules, range(1, num_layers),
                                              request.batch_size, request.stage_progress("attention"))
            model = remove_attention(model, search.removed)
        details["attention_seconds"] = time.perf_counter() - started
        details["attention_removed"] = sorted(search.removed)
        details["attention_order"] = search.removed
        details["attention_perplexities"] = search.perplexities
        summary = (
            f"FFN width {d_ff} -> {budget.ffn_kept} in every block; attention removed from blocks "
            f"{sorted(search.removed)}; {budget.sparsity:.1%} of the blocks' parameters removed "
            f"(target {settings.sparsity:.1%})"
        )
        return Selection([], details=details, summary=summary, model=model)
