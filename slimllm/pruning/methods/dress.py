"""DReSS (arXiv 2501.17905): regularize the FFN neurons chosen for removal toward zero, then remove them.

    >>> settings = DressSettings(sparsity=0.25)
    >>> selection = get_method("dress").select(SelectionRequest(model, blocks, k=0, candidates=[], settings=settings))
    >>> selection.model.config.intermediate_size      # 1536 -> 1152 on SmolLM2-135M

Where prune-then-fine-tune loses what the removed neurons held, DReSS first trains with a penalty that moves that
information out of them, then removes them; the recovery fine-tune that follows is the healing stage.

1. Selection, fixed up front: every block drops the same number of FFN neurons, the lowest by a stated score
   (`activation`: 2SSP's norm at the input of `down_proj`; `magnitude`: the neuron's weight norm; `random`).
2. Regularization: training on CE (+ `distill` × KL to the unpruned model) while the selected neurons' weight groups
   (gate and up rows, down column) are shrunk by the group norm's proximal step after every optimizer step.
3. Removal with the shared width surgery (`slimllm.pruning.width.keep_ffn_neurons`).

The public record leaves the penalty's form, strength and schedule open; `docs/design-notes.md` says what we chose
and why (the penalty is relative to each group's starting norm, applied as a proximal step so that it acts at the
learning rates fine-tuning uses).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum

import torch
from torch import nn

from slimllm.core.artifacts import plain
from slimllm.core.device import model_autocast
from slimllm.core.errors import UserInputError
from slimllm.core.placement import input_device
from slimllm.core.progress import Progress
from slimllm.models.architectures import decoder_layers
from slimllm.pruning.methods.trsp import RegNorm
from slimllm.pruning.methods.two_ssp import WidthRounding
from slimllm.pruning.registry import BenchmarkVariant, PlannedWork, PruningMethod, Selection, SelectionRequest, register
from slimllm.pruning.width import ffn_neuron_scores, ffn_of, ffn_width, keep_ffn_neurons, top_neurons
from slimllm.recovery.training import (
    Optimization,
    StepLosses,
    TrainingCheckpoints,
    batch_schedule,
    cpu_state_dict,
    default_warmup,
    frozen_teacher,
    require_master_weights,
    run_fingerprint,
    train,
)

log = logging.getLogger(__name__)


class NeuronScore(str, Enum):
    ACTIVATION = "activation"
    """2SSP's score: the neuron's activation norm at the input of down_proj on calibration text."""
    MAGNITUDE = "magnitude"
    """The L2 norm of the neuron's weights (gate and up rows, down column); needs no data."""
    RANDOM = "random"
    """A seeded random choice (the ablation's floor)."""


class RegSchedule(str, Enum):
    CONSTANT = "constant"
    """The same shrink every step."""
    RAMP = "ramp"
    """A shrink growing linearly from zero: the rest of the model has time to take over before the end."""


@dataclass
class DressSettings:
    """DReSS's own settings (recipe section `[dress]`)."""

    sparsity: float = 0.25
    """Fraction of every block's FFN neurons to remove (the result keeps the original architecture)."""
    score: NeuronScore = NeuronScore.ACTIVATION
    """How the neurons to remove are chosen, once, before training."""
    width_multiple: WidthRounding = WidthRounding.M64
    """Round the kept FFN width to a multiple of 64 or 256 (llama.cpp's K-quants want 256), or none."""
    reg_lambda: float = 1.5
    """Penalty strength λ: the total shrink of the penalty over the run, as a multiple of each selected group's
    starting norm (1 clears the groups by the last step if the language-modeling loss did not push back)."""
    reg_norm: RegNorm = RegNorm.L2
    """l2: the group norm of each neuron's weights (the group shrinks as a whole); l1: every weight on its own."""
    schedule: RegSchedule = RegSchedule.RAMP
    """How the shrink is spread over the steps."""
    reg_tokens: int = 32_768
    """Regularization budget in tokens (steps = tokens / (batch size × block length), rounded up)."""
    lr: float = 1e-4
    """AdamW learning rate of the weights during regularization (linear warm-up, then constant)."""
    distill: float = 1.0
    """Weight of KL(unpruned ‖ model) added to the CE (a frozen copy of the model is the teacher); 0: CE alone."""
    save_every: int = 8
    """Steps between resumable checkpoints."""

    def __post_init__(self) -> None:
        self.score = NeuronScore(self.score)
        self.width_multiple = WidthRounding(getattr(self.width_multiple, "value", str(self.width_multiple)))
        self.reg_norm = RegNorm(self.reg_norm)
        self.schedule = RegSchedule(self.schedule)
        if not 0.0 < self.sparsity < 1.0:
            raise UserInputError(f"--sparsity must be between 0 and 1 (exclusive), got {self.sparsity}")
        for name in ("reg_lambda", "distill"):
            if getattr(self, name) < 0:
                raise UserInputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UserInputError(f"--lr must be positive, got {self.lr}")
        if self.reg_tokens < 0:
            raise UserInputError(f"--reg-tokens must be >= 0, got {self.reg_tokens}")
        if self.save_every < 1:
            raise UserInputError(f"--save-every must be at least 1, got {self.save_every}")


def kept_width(d_ff: int, sparsity: float, rounding: WidthRounding) -> int:
    """Neurons every block keeps: d_ff · (1 − sparsity), rounded to the multiple; one that leaves none is refused."""
    exact = round(d_ff * (1.0 - sparsity))
    multiple = rounding.multiple
    kept = min(d_ff, multiple * round(exact / multiple))
    if kept < 1:
        raise UserInputError(
            f"--sparsity {sparsity} leaves no FFN neuron of {d_ff} (rounded to a multiple of {multiple}); lower "
            "--sparsity or use --width-multiple 64 or none"
        )
    if kept == d_ff:
        raise UserInputError(
            f"--sparsity {sparsity} removes no FFN neuron of {d_ff} once rounded to a multiple of {multiple}; raise "
            "--sparsity or use --width-multiple 64 or none"
        )
    return kept


def _groups(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's FFN weights laid out neuron by neuron: gate rows, up rows and down columns (as rows)."""
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.t()


def group_norms(model: nn.Module, norm: RegNorm = RegNorm.L2) -> list[torch.Tensor]:
    """Per block, the norm of every neuron's weight group (gate row, up row, down column), float32 on the CPU."""
    norms = []
    with torch.no_grad():
        for layer in decoder_layers(model):
            parts = [p.detach().float() for p in _groups(ffn_of(layer))]
            if norm is RegNorm.L2:
                value = sum(p.pow(2).sum(dim=1) for p in parts).sqrt()
            else:
                value = sum(p.abs().sum(dim=1) for p in parts)
            norms.append(value.cpu())
    return norms


def group_penalty(model: nn.Module, selected: Sequence[Sequence[int]], reference: Sequence[torch.Tensor],
                  norm: RegNorm = RegNorm.L2) -> float:
    """Σ over blocks and selected neurons of ‖W_g‖ / ‖W_g⁽⁰⁾‖: the penalty (each group starts at 1)."""
    now = group_norms(model, norm)
    return float(sum((now[b][list(s)] / reference[b][list(s)]).sum() for b, s in enumerate(selected) if len(s)))


@torch.no_grad()
def shrink_groups(model: nn.Module, selected: Sequence[Sequence[int]], reference: Sequence[torch.Tensor],
                  amount: float, norm: RegNorm = RegNorm.L2) -> None:
    """The penalty's proximal step: every selected group loses `amount` × its starting norm, never past zero.

    l2 scales each group toward zero as a whole (group soft-threshold); l1 soft-thresholds each weight by `amount`
    × the group's starting mean absolute weight."""
    if amount <= 0:
        return
    for layer, indices, start in zip(decoder_layers(model), selected, reference, strict=True):
        if not len(indices):
            continue
        parts = _groups(ffn_of(layer))
        index = torch.tensor(list(indices), dtype=torch.long, device=parts[0].device)
        rows = [p.index_select(0, index).float() for p in parts]
        threshold = amount * start[index.cpu()].to(parts[0].device)
        if norm is RegNorm.L2:
            current = sum(r.pow(2).sum(dim=1) for r in rows).sqrt()
            scale = (1.0 - threshold / current.clamp_min(1e-12)).clamp_min(0.0).unsqueeze(1)
            shrunk = [r * scale for r in rows]
        else:
            width = sum(r.shape[1] for r in rows)
            per_weight = (threshold / width).unsqueeze(1)
            shrunk = [r.sign() * (r.abs() - per_weight).clamp_min(0.0) for r in rows]
        for p, value in zip(parts, shrunk, strict=True):
            p.index_copy_(0, index, value.to(p.dtype))


@torch.no_grad()
def selected_output_share(model: nn.Module, selected: Sequence[Sequence[int]], batch: torch.Tensor) -> float:
    """Mean over blocks of ‖selected neurons' part of the FFN output‖ / ‖FFN output‖ on `batch`."""
    shares: list[float] = []
    handles = []

    def hook_for(indices: list[int]):
        def hook(module, args):
            activation = args[0].float()
            total = activation @ module.weight.float().t()
            part = activation[..., indices] @ module.weight.float()[:, indices].t()
            shares.append(float(part.norm() / total.norm().clamp_min(1e-12)))

        return hook

    for layer, indices in zip(decoder_layers(model), selected, strict=True):
        if len(indices):
            handles.append(ffn_of(layer).down_proj.register_forward_pre_hook(hook_for(list(indices))))
    try:
        with model_autocast(model):
            model(input_ids=batch.to(input_device(model)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sum(shares) / max(len(shares), 1)


def neuron_scores(model: nn.Module, score: NeuronScore, blocks: torch.Tensor, batch_size: int, seed: int,
                  progress: Progress | None = None) -> list[torch.Tensor]:
    """Per block, a score per FFN neuron; the lowest are removed."""
    if score is NeuronScore.ACTIVATION:
        return ffn_neuron_scores(model, blocks, batch_size, progress)
    if score is NeuronScore.MAGNITUDE:
        return group_norms(model, RegNorm.L2)
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(ffn_of(layer).down_proj.in_features, generator=generator) for layer in decoder_layers(model)]


def shrink_per_step(settings: DressSettings, steps: int) -> list[float]:
    """The proximal step's amount at every step; they add up to `reg_lambda`."""
    if steps == 0:
        return []
    if settings.schedule is RegSchedule.CONSTANT:
        return [settings.reg_lambda / steps] * steps
    total = steps * (steps + 1) / 2
    return [settings.reg_lambda * (step + 1) / total for step in range(steps)]


@dataclass
class DressInfo:
    """What the regularization did, for `slimllm_pruning.json`."""

    steps: int = 0
    training_tokens: int = 0
    losses: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    penalty: list[float] = field(default_factory=list)
    """Σ ‖W_g‖ / ‖W_g⁽⁰⁾‖ over the selected groups after each step's shrink."""
    share_before: float = 0.0
    """Mean over blocks of the selected neurons' share of the FFN output norm, before regularization."""
    share_after: float = 0.0
    selected_norm_after: float = 0.0
    """Mean relative norm of the selected groups at the end (1 = untouched, 0 = cleared)."""
    seconds: float = 0.0
    resumed_from_step: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def regularize(
    model: nn.Module,
    blocks: torch.Tensor,
    selected: Sequence[Sequence[int]],
    settings: DressSettings,
    batch_size: int = 2,
    seed: int = 0,
    checkpoints: TrainingCheckpoints | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> DressInfo:
    """Train `model` in place on CE (+ KL) while shrinking the selected groups; checkpoints every `save_every`."""
    require_master_weights(model, "DReSS")
    steps = math.ceil(settings.reg_tokens / (batch_size * blocks.shape[1])) if settings.reg_tokens else 0
    reference = group_norms(model, settings.reg_norm)
    amounts = shrink_per_step(settings, steps)
    schedule = batch_schedule(blocks.shape[0], batch_size, steps, seed)
    probe = blocks[: min(2, blocks.shape[0])]
    info = DressInfo(steps=steps, share_before=selected_output_share(model, selected, probe))
    teacher = frozen_teacher(model) if settings.distill > 0 and steps else None
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    optimization = Optimization(model, [optimizer], default_warmup(steps), "--lr")
    state = checkpoints.load("dress") if resume and checkpoints is not None else None
    if state is not None:
        model.load_state_dict(state["model"], strict=True)
        optimization.load_state_dict(state["optimization"])
        info = DressInfo(**state["info"])
        info.resumed_from_step = state["step"]
        log.info("resuming DReSS regularization at step %d", state["step"])

    def shrink_and_record(step: int, batch: torch.Tensor, losses: StepLosses) -> None:
        info.losses.append(float(losses.ce.detach()))
        shrink_groups(model, selected, reference, amounts[step], settings.reg_norm)
        if losses.kl is not None:
            info.kl.append(float(losses.kl.detach()))
        info.penalty.append(group_penalty(model, selected, reference, settings.reg_norm))
        info.training_tokens += batch.numel()
        if progress:
            progress(step + 1, steps, stage="regularize", loss=info.losses[-1])
        if checkpoints is not None and ((step + 1) % settings.save_every == 0 or step + 1 == steps):
            checkpoints.save("dress", {"step": step + 1, "model": cpu_state_dict(model),
                                       "optimization": optimization.state_dict(), "info": info.to_dict()})

    model.eval()  # `train` restores this mode when it ends
    try:
        info.seconds += train(model, blocks, schedule, range(info.resumed_from_step, steps), optimization, "DReSS",
                              teacher, settings.distill, after_step=shrink_and_record)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
    info.share_after = selected_output_share(model, selected, probe)
    count = sum(len(s) for s in selected)
    info.selected_norm_after = group_penalty(model, selected, reference, settings.reg_norm) / max(count, 1)
    return info


@register
class Dress(PruningMethod):
    name = "dress"
    rank = 30
    description = "DReSS: train the chosen FFN neurons' information out of them, then remove them (width)."
    settings_class = DressSettings
    trains_weights = True
    removes_layers = False
    edits_model = True


    def benchmark_variants(self) -> list[BenchmarkVariant]:
        """FFN-width rows at the benchmark's width sparsity, all through DReSS's selection so that they remove the same
        neurons: `2ssp-width` removes them at once (2SSP's score, no training), `2ssp-width+ft` then fine-tunes for
        DReSS's regularization plus recovery tokens, `dress` regularizes first and recovers with the same fine-tune
        (equal tokens); `dress-magnitude` and `dress-random` are the ablation of the selection score."""

        def width(name: str, score: NeuronScore, regularize: bool, recover: bool) -> BenchmarkVariant:
            options = (("score", score.value), ("regularize", regularize), ("recover", recover))
            return BenchmarkVariant(name, "width", options=options, trains=True)

        return [
            width("2ssp-width", NeuronScore.ACTIVATION, regularize=False, recover=False),
            width("2ssp-width+ft", NeuronScore.ACTIVATION, regularize=False, recover=True),
            width("dress", NeuronScore.ACTIVATION, regularize=True, recover=True),
            width("dress-magnitude", NeuronScore.MAGNITUDE, regularize=True, recover=True),
            width("dress-random", NeuronScore.RANDOM, regularize=True, recover=True),
        ]

    def planned_work(self, settings, k, num_layers, calib_blocks, block_len, batch_size) -> PlannedWork:
        settings = settings or DressSettings()
        return PlannedWork(selection_tokens=calib_blocks * block_len, train_tokens=settings.reg_tokens,
                           train_scope="full", ffn_kept=1.0 - settings.sparsity)

    def select(self, request: SelectionRequest) -> Selection:
        """Selection, regularization (in place on `request.model`) and width surgery; no whole layer is removed."""
        settings = request.settings or DressSettings()
        model = request.model
        d_ff = ffn_width(model)
        kept = kept_width(d_ff, settings.sparsity, settings.width_multiple)
        started = time.perf_counter()
        scores = neuron_scores(model, settings.score, request.blocks, request.batch_size, request.seed,
                               request.stage_progress("score"))
        keep = top_neurons(scores, kept)
        selected = [sorted(set(range(d_ff)) - set(k)) for k in keep]
        score_seconds = time.perf_counter() - started
        fingerprint = run_fingerprint(model, request.blocks, settings, request.batch_size, request.seed)
        checkpoints = TrainingCheckpoints(request.work_dir, fingerprint, "DReSS")
        info = regularize(model, request.blocks, selected, settings, request.batch_size, request.seed, checkpoints,
                          request.resume, request.progress)
        pruned = keep_ffn_neurons(model, keep, inplace=True)
        per_block = sum(3 * ffn_of(layer).down_proj.out_features for layer in decoder_layers(pruned))
        details = {
            "dress_settings": plain(settings),
            "ffn_width_before": d_ff,
            "ffn_kept": kept,
            "ffn_kept_unrounded": round(d_ff * (1.0 - settings.sparsity)),
            "achieved_width_sparsity": 1.0 - kept / d_ff,
            "ffn_params_removed": per_block * (d_ff - kept),
            "removed_neurons": {str(b): s for b, s in enumerate(selected)},
            "score_seconds": score_seconds,
            **info.to_dict(),
        }
        summary = (
            f"FFN width {d_ff} -> {kept} in every block ({settings.score.value} selection, {info.steps} steps of "
            f"{settings.reg_norm.value} group regularization); the selected neurons' share of the FFN output "
            f"{info.share_before:.3f} -> {info.share_after:.3f} before removal"
        )
        return Selection([], details=details, summary=summary, model=pruned)
