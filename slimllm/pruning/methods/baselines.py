"""Baseline layer-selection methods: ShortGPT, angular block, SLEB, SLEB scored by the KL to the unpruned model
(output-aware), last-k and random.

    >>> selection = select_layers(model, "shortgpt", k=8, blocks=calib_blocks, candidates=range(30))
    >>> selection.removed_layers
    [3, 12, 13, 14, 15, 17, 25, 26]

Every method sees the same calibration blocks and candidate layers and returns original layer indices. They share
the removal and evaluation path, so comparisons between methods are made in one run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from slimllm.core.errors import UserInputError
from slimllm.core.progress import Progress
from slimllm.models.architectures import decoder_layers
from slimllm.models.layer_io import stream_layers
from slimllm.pruning.greedy import Criterion, calibration_loss, greedy_removal, without_layers
from slimllm.pruning.registry import (
    BenchmarkVariant,
    PlannedWork,
    PruningMethod,
    Selection,
    SelectionRequest,
    get_method,
    register,
    select_layers_with,
)

__all__ = ["Selection", "select_layers", "block_influence", "angular_distances", "sleb_greedy", "kl_greedy"]


@torch.no_grad()
def block_influence(model, blocks: torch.Tensor, batch_size: int, progress: Progress | None = None) -> list[float]:
    """ShortGPT's Block Influence per layer: 1 - mean over all tokens of cos(x_i, x_{i+1}) on the raw stream.

    Computed block by block (`stream_layers`): one layer's activations in memory at a time.
    """
    cosine_sums = torch.zeros(len(decoder_layers(model)), dtype=torch.float64)

    def visit(layer: int, _batch: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        cosine_sums[layer] += F.cosine_similarity(x_in.float(), x_out.float(), dim=-1).sum().double().cpu()

    stream_layers(model, blocks, batch_size, visit, progress)
    return (1.0 - cosine_sums / blocks.numel()).tolist()


@torch.no_grad()
def angular_distances(
    model, blocks: torch.Tensor, k: int, batch_size: int, progress: Progress | None = None
) -> list[float]:
    """Gromov et al.: arccos(cos(x_l, x_{l+k}))/pi on each sample's last token, averaged; one value per start l.

    Computed block by block (`stream_layers`); only the last token's state of every layer is kept.
    """
    num_layers = len(decoder_layers(model))
    states = torch.zeros(blocks.shape[0], num_layers + 1, model.config.hidden_size, dtype=torch.float32)

    def visit(layer: int, batch: int, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        rows = slice(batch * batch_size, batch * batch_size + x_in.shape[0])
        states[rows, layer] = x_in[:, -1].float().cpu()
        if layer == num_layers - 1:
            states[rows, num_layers] = x_out[:, -1].float().cpu()

    stream_layers(model, blocks, batch_size, visit, progress)
    distances = []
    for start in range(num_layers - k + 1):
        cos = F.cosine_similarity(states[:, start].double(), states[:, start + k].double(), dim=-1).clamp(-1, 1)
        distances.append(float((torch.arccos(cos) / math.pi).mean()))
    return distances


def sleb_greedy(
    model,
    blocks: torch.Tensor,
    k: int,
    candidates: Sequence[int],
    batch_size: int,
    progress: Progress | None = None,
    criterion: Criterion = calibration_loss,
) -> tuple[list[int], list[dict[str, float]]]:
    """SLEB-style greedy: k times, remove the layer whose removal gives the lowest `criterion` (default: the
    calibration loss).

    Returns the removal order and, per step, the mean criterion of every candidate's removal.
    """
    search = greedy_removal(model, blocks, k, candidates, batch_size, without_layers(model), progress, criterion)
    return search.removed, search.mean_losses


def select_layers(
    model,
    method,
    k: int,
    blocks: torch.Tensor | None,
    candidates: Sequence[int],
    batch_size: int = 2,
    seed: int = 0,
    progress: Progress | None = None,
) -> Selection:
    """Choose k of the candidate layers with a registered method that trains nothing (`method`: name or enum)."""
    spec = get_method(method)
    if spec.trains_weights:
        raise ValueError(f"{spec.name} trains weights; run it through slimllm.pruning.stage.prune_in_memory")
    request = SelectionRequest(model, blocks, k, list(candidates), batch_size, seed, progress=progress)
    return select_layers_with(spec, request)


@register
class ShortGPT(PruningMethod):
    name = "shortgpt"
    rank = 40
    description = "ShortGPT Block Influence: remove the k layers whose output is most similar to their input."

    def benchmark_variants(self) -> list[BenchmarkVariant]:
        """The baseline rows, and healing after ShortGPT's removal at TRSP's token budget: plain fine-tuning, with
        TRSP's distillation term, and (after least squares) full-weight and LoRA healing."""
        return [
            *super().benchmark_variants(),
            BenchmarkVariant("shortgpt+heal", "fine-tune", repair=None, trains=True),
            BenchmarkVariant("shortgpt+heal-kd", "fine-tune", repair=None, options=(("distill", True),), trains=True),
            BenchmarkVariant("shortgpt+lsq+heal", "heal", repair="lsq", options=(("scope", "full"),), trains=True),
            BenchmarkVariant("shortgpt+lsq+heal-lora", "heal", repair="lsq", options=(("scope", "lora"),),
                             trains=True),
        ]

    def select(self, request: SelectionRequest) -> Selection:
        influence = block_influence(request.model, request.blocks, request.batch_size, request.progress)
        ranked = sorted(request.candidates, key=lambda i: (influence[i], i))
        return Selection(sorted(ranked[: request.k]), scores={str(i): influence[i] for i in range(len(influence))})


@register
class Angular(PruningMethod):
    name = "angular"
    rank = 50
    description = "Gromov et al.: the contiguous block of k layers with the smallest angular distance across it."

    def select(self, request: SelectionRequest) -> Selection:
        k = request.k
        distances = angular_distances(request.model, request.blocks, k, request.batch_size, request.progress)
        candidate_set = set(request.candidates)
        starts = [s for s in range(len(distances)) if all(i in candidate_set for i in range(s, s + k))]
        if not starts:
            raise UserInputError(
                f"no run of {k} consecutive candidate layers exists for the angular method; "
                "remove fewer layers or protect fewer"
            )
        best = min(starts, key=lambda s: (distances[s], s))
        return Selection(
            list(range(best, best + k)),
            scores={str(s): distances[s] for s in range(len(distances))},
            details={"start": best},
        )


@register
class Sleb(PruningMethod):
    name = "sleb"
    rank = 60
    description = "SLEB-style greedy: repeatedly remove the layer whose removal hurts the calibration loss least."

    def benchmark_variants(self) -> list[BenchmarkVariant]:
        """Scored on the benchmark's first `--sleb-blocks` calibration blocks: the greedy search costs one suffix
        forward per candidate per step."""
        return [dataclasses.replace(v, options=(*v.options, ("limit_calibration", True)))
                for v in super().benchmark_variants()]

    def planned_work(self, settings, k, num_layers, calib_blocks, block_len, batch_size) -> PlannedWork:
        # k rounds, each scoring every remaining candidate (about half a pass each: only the suffix re-runs).
        candidates = sum(num_layers - r for r in range(k))
        return PlannedWork(selection_tokens=calib_blocks * block_len * max(1, candidates // 2))

    def select(self, request: SelectionRequest) -> Selection:
        order, history = sleb_greedy(
            request.model, request.blocks, request.k, list(request.candidates), request.batch_size, request.progress
        )
        return Selection(sorted(order), details={"removal_order": order, "step_losses": history})


def kl_greedy(
    model,
    blocks: torch.Tensor,
    k: int,
    candidates: Sequence[int],
    batch_size: int,
    progress: Progress | None = None,
    top_k: int = 64,
) -> tuple[list[int], list[dict[str, float]]]:
    """Output-aware greedy: k times, remove the layer whose removal moves the model's next-token distributions least
    from the unpruned model's (KL on the calibration blocks, the unpruned top-`top_k` stored once before the search).

    Returns the removal order and, per step, the mean KL of every candidate's removal.
    """
    from slimllm.recovery.teacher_targets import compute_teacher_targets

    dense = compute_teacher_targets(model, blocks, top_k, batch_size)

    def kl_to_dense(logits: torch.Tensor, batch: torch.Tensor, rows: list[int]) -> tuple[float, int]:
        predicted = logits[:, :-1].float()
        count = predicted.shape[0] * predicted.shape[1]
        return float(dense.kl(predicted, rows)) * count, count

    return sleb_greedy(model, blocks, k, candidates, batch_size, progress, kl_to_dense)


@register
class SlebKl(Sleb):
    name = "sleb-kl"
    rank = 65
    description = ("Output-aware greedy: repeatedly remove the layer whose removal moves the next-token distributions "
                   "least from the unpruned model's (KL on the calibration blocks).")

    def planned_work(self, settings, k, num_layers, calib_blocks, block_len, batch_size) -> PlannedWork:
        # SLEB's search, plus one pass of the unpruned model to store its top-64.
        work = super().planned_work(settings, k, num_layers, calib_blocks, block_len, batch_size)
        return PlannedWork(selection_tokens=work.selection_tokens + calib_blocks * block_len)

    def select(self, request: SelectionRequest) -> Selection:
        order, history = kl_greedy(
            request.model, request.blocks, request.k, list(request.candidates), request.batch_size, request.progress
        )
        return Selection(sorted(order), details={"removal_order": order, "step_kl": history})


@register
class Last(PruningMethod):
    name = "last"
    rank = 70
    description = "The last k candidate layers (the final layer is protected by default)."
    needs_calibration = False

    def select(self, request: SelectionRequest) -> Selection:
        return Selection(sorted(list(request.candidates)[-request.k :]), details={"rule": "last k candidate layers"})


@register
class Random(PruningMethod):
    name = "random"
    rank = 80
    description = "k candidate layers drawn with the seed."
    needs_calibration = False

    def select(self, request: SelectionRequest) -> Selection:
        candidates = list(request.candidates)
        generator = torch.Generator().manual_seed(request.seed)
        order = torch.randperm(len(candidates), generator=generator).tolist()
        return Selection(sorted(candidates[i] for i in order[: request.k]), details={"seed": request.seed})
