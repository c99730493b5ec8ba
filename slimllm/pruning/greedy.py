"""Greedy removal by calibration loss, the search SLEB (whole layers) and 2SSP (attention modules) share.

Each round removes the candidate whose removal, together with those already chosen, gives the lowest loss on the
calibration blocks. A round records the input of every layer once and re-runs only the suffix from each candidate,
so its cost is one forward plus the candidates' suffixes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from slimllm.core.device import model_autocast
from slimllm.core.placement import input_device
from slimllm.evaluation.perplexity import causal_lm_loss_sum
from slimllm.models.layer_io import DecoderTrace, attention_skipped, layers_skipped, run_from_layer, trace_decoder

CandidateLogits = Callable[[DecoderTrace, int], torch.Tensor]
"""Logits of the model (as traced) with one more candidate removed."""

Removal = Callable[[list[int]], contextlib.AbstractContextManager[CandidateLogits]]
"""Enter: the model runs without the given candidates; yields how to score one more removal from a trace."""

Criterion = Callable[[torch.Tensor, torch.Tensor, list[int]], tuple[float, int]]
"""(logits, batch, the batch's rows of the blocks) -> (summed loss, tokens scored); lower is better."""


def calibration_loss(logits: torch.Tensor, batch: torch.Tensor, _rows: list[int]) -> tuple[float, int]:
    """The next-token cross-entropy on the calibration text (SLEB's criterion)."""
    return causal_lm_loss_sum(logits, batch)


@dataclass
class GreedySearch:
    removed: list[int] = field(default_factory=list)
    """Candidates in the order chosen."""
    mean_losses: list[dict[str, float]] = field(default_factory=list)
    """Per round, the mean calibration loss (nats per token) of removing each remaining candidate."""


@torch.no_grad()
def greedy_removal(
    model: nn.Module,
    blocks: torch.Tensor,
    count: int,
    candidates: Sequence[int],
    batch_size: int,
    removal: Removal,
    progress: Callable[[int, int], None] | None = None,
    criterion: Criterion = calibration_loss,
) -> GreedySearch:
    """`count` rounds of greedy removal by `criterion` (default: the calibration loss); ties go to the lower index."""
    device = input_device(model)
    search = GreedySearch()
    for round_index in range(count):
        alive = [c for c in candidates if c not in search.removed]
        loss_sums = dict.fromkeys(alive, 0.0)
        tokens = 0
        with removal(list(search.removed)) as candidate_logits:
            for start in range(0, blocks.shape[0], batch_size):
                batch = blocks[start : start + batch_size].to(device)
                with model_autocast(model):
                    trace = trace_decoder(model, batch, keep_kwargs=True)
                    rows = list(range(start, start + batch.shape[0]))
                    for candidate in alive:
                        loss, scored = criterion(candidate_logits(trace, candidate), batch, rows)
                        loss_sums[candidate] += loss
                tokens += scored
        search.mean_losses.append({str(c): loss_sums[c] / tokens for c in alive})
        search.removed.append(min(alive, key=lambda c: (loss_sums[c], c)))
        if progress:
            progress(round_index + 1, count)
    return search


def without_layers(model: nn.Module) -> Removal:
    """Candidates are whole decoder layers (original indices)."""

    @contextlib.contextmanager
    def removal(removed: list[int]) -> Iterator[CandidateLogits]:
        with layers_skipped(model, removed) as kept:
            position = {original: j for j, original in enumerate(kept)}
            yield lambda trace, c: run_from_layer(model, trace, start=position[c], skip={position[c]})

    return removal


def without_attention(model: nn.Module) -> Removal:
    """Candidates are the attention modules of decoder layers (the residual passes through)."""

    @contextlib.contextmanager
    def removal(removed: list[int]) -> Iterator[CandidateLogits]:
        def logits(trace: DecoderTrace, candidate: int) -> torch.Tensor:
            with attention_skipped(model, [candidate]):
                return run_from_layer(model, trace, start=candidate)

        with attention_skipped(model, removed):
            yield logits

    return removal
