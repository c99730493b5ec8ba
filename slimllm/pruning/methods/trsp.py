"""TRSP: two-stage regularization-based structured pruning (arXiv 2505.18232), implemented from the paper.

    >>> model_out, info = run_trsp(model, blocks, k=8, candidates=range(0, 29), settings=TrspSettings(),
    ...                            work_dir=Path("out.partial/trsp"))

Stage 1 (selection): learnable per-layer gates; k greedy rounds of CE + lambda1 * sum|g| over the alive candidates,
each ending by switching off the candidate with the smallest |g|.
Stage 2 (knowledge transfer): the selected layers are switched back on and the weights are trained so the kept layers
take over their work, either with the paper's regularizer CE + lambda2 * sum ||y_i - x_i|| over the selected layers
(added one per phase in selection order) or by fading their delta gates from 1 to 0 while training on CE.
The selected layers are then removed physically with the shared surgery.

Each stage checkpoints to `work_dir` (after every stage-1 round, after every stage-2 phase); `resume=True` continues
from the last checkpoint and gives the same result as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

import torch

from slimllm.core.artifacts import plain
from slimllm.core.device import model_autocast
from slimllm.core.errors import UserInputError
from slimllm.core.placement import input_device
from slimllm.core.progress import Progress
from slimllm.pruning.gates import GateMode, GateSet, attach_gates, detach_gates
from slimllm.pruning.registry import BenchmarkVariant, PlannedWork, PruningMethod, Selection, SelectionRequest, register
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


class TrainScope(str, Enum):
    GATES = "gates"
    """Stage 1 trains only the gates: no weight gradients or optimizer state (fits large models)."""
    FULL = "full"
    """Stage 1 trains the gates and all weights, as the reference does."""


class Stage2Mode(str, Enum):
    REGULARIZE = "regularize"
    """The paper: CE + lambda2 * sum ||y_i - x_i|| over the selected layers, added one per phase."""
    FADE = "fade"
    """Move the selected layers' delta gates linearly from 1 to 0 while training the kept layers on CE."""
    NONE = "none"
    """No knowledge transfer (the ablation): remove the stage-1 selection directly."""


class GateOptimizer(str, Enum):
    ADAM = "adam"
    """AdamW: every gate moves about gate_lr per step, whatever its gradient's size."""
    SGD = "sgd"
    """SGD with momentum 0.9: gates move in proportion to their gradient, a first-order importance signal."""


class RegNorm(str, Enum):
    L2 = "l2"
    L1 = "l1"


@dataclass
class TrspSettings:
    """Every TRSP hyperparameter. Defaults are the CPU-sized recipe; see examples/recipes/ for tuned ones."""

    gate_mode: GateMode = GateMode.DELTA
    """delta: x + g*(y - x) (g = 0 is exact removal); output: g*y (the paper's form)."""
    train_scope: TrainScope = TrainScope.GATES
    """Stage 1 trainable scope: gates only, or gates and all weights."""
    lambda1: float = 5e-3
    """Stage 1 weight of the L1 penalty on the alive candidates' gates."""
    gate_lr: float = 1e-2
    """Learning rate of the gates (their own optimizer group)."""
    gate_optimizer: GateOptimizer = GateOptimizer.ADAM
    """Optimizer of the gates in stage 1."""
    weight_lr: float = 2e-5
    """Stage 1 learning rate of the weights (train_scope=full)."""
    steps_per_round: int = 6
    """Stage 1 optimizer steps per greedy round (k rounds)."""
    stage2: Stage2Mode = Stage2Mode.FADE
    """Stage 2 knowledge-transfer mode."""
    lambda2: float = 1e-3
    """Stage 2 weight of the output-input difference regularizer (regularize mode)."""
    reg_norm: RegNorm = RegNorm.L2
    """Norm of the per-token difference y_i - x_i, relative to ||x_i||, averaged over tokens."""
    stage2_steps: int = 64
    """Stage 2 optimizer steps in all."""
    stage2_lr: float = 1e-4
    """Stage 2 learning rate of the weights (AdamW, linear warm-up then constant)."""
    fade_fraction: float = 0.5
    """Fade mode: fraction of stage 2 over which the gates go from 1 to 0; the rest trains without the layers."""
    distill: float = 0.0
    """Stage 2 weight of KL(unpruned || model) on next-token distributions, added to the CE. The teacher is a frozen
    copy of the model as stage 2 starts, every layer on (one more forward per step and a second copy of the
    weights); 0 trains on CE alone."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (saves memory on large models; slower)."""

    def __post_init__(self) -> None:
        self.gate_mode = GateMode(self.gate_mode)
        self.train_scope = TrainScope(self.train_scope)
        self.stage2 = Stage2Mode(self.stage2)
        self.reg_norm = RegNorm(self.reg_norm)
        self.gate_optimizer = GateOptimizer(self.gate_optimizer)
        for name in ("lambda1", "lambda2", "gate_lr", "weight_lr", "stage2_lr", "distill"):
            if getattr(self, name) < 0:
                raise UserInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.steps_per_round < 1:
            raise UserInputError(f"steps_per_round must be >= 1, got {self.steps_per_round}")
        if self.stage2_steps < 0:
            raise UserInputError(f"stage2_steps must be >= 0, got {self.stage2_steps}")
        if not 0.0 < self.fade_fraction <= 1.0:
            raise UserInputError(f"fade_fraction must be in (0, 1], got {self.fade_fraction}")

    def training_steps(self, k: int) -> int:
        stage2 = 0 if self.stage2 is Stage2Mode.NONE else self.stage2_steps
        return k * self.steps_per_round + stage2


@dataclass
class TrspInfo:
    """What TRSP did, for `slimllm_pruning.json`."""

    selection_order: list[int] = field(default_factory=list)
    gate_trajectory: list[list[float]] = field(default_factory=list)
    """Every layer's gate at the end of every stage-1 round, before that round's switch-off (off layers read 0)."""
    stage1_losses: list[float] = field(default_factory=list)
    stage2_losses: list[float] = field(default_factory=list)
    stage2_kl: list[float] = field(default_factory=list)
    """KL(unpruned || model) per stage-2 step when distilling."""
    delta_before_stage2: dict[str, float] = field(default_factory=dict)
    """Mean relative ||y_i - x_i|| of each selected layer before knowledge transfer."""
    delta_after_stage2: dict[str, float] = field(default_factory=dict)
    training_tokens: int = 0
    stage1_seconds: float = 0.0
    stage2_seconds: float = 0.0
    resumed_from: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _mean_relative_delta(gates: GateSet, layers: Sequence[int], model, batch: torch.Tensor, norm: RegNorm):
    """Mean relative ||y - x|| of each given layer on a batch (no gradient)."""
    for i in layers:
        gates.layers[i].record_delta = True
        gates.layers[i].delta_norm = norm
    try:
        with torch.no_grad(), model_autocast(model):
            model(input_ids=batch, use_cache=False)
        return {str(i): float(gates.layers[i].last_delta.mean()) for i in layers}
    finally:
        for i in layers:
            gates.layers[i].record_delta = False
            gates.layers[i].last_delta = None


def run_trsp(
    model,
    blocks: torch.Tensor,
    k: int,
    candidates: Sequence[int],
    settings: TrspSettings,
    batch_size: int = 2,
    seed: int = 0,
    work_dir: Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> tuple[list[int], TrspInfo]:
    """Run both stages on `model` in place (weights are trained). Returns the layers to remove and the record.

    The gates are detached again before returning, so the model's modules and state-dict keys are the originals.
    """
    candidates = list(candidates)
    if k >= len(candidates):
        raise UserInputError(f"cannot select {k} layers from {len(candidates)} candidates")
    require_master_weights(model, "TRSP")
    device = input_device(model)
    fingerprint = run_fingerprint(model, blocks, settings, batch_size, seed, k=k, candidates=candidates)
    checkpoints = TrainingCheckpoints(work_dir, fingerprint, "TRSP")
    info = TrspInfo()
    total_steps = settings.training_steps(k)
    schedule = batch_schedule(blocks.shape[0], batch_size, total_steps, seed)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gates = attach_gates(model, settings.gate_mode)
    was_training = model.training
    model.train()
    try:
        order = _stage1(model, gates, blocks, schedule, k, candidates, settings, checkpoints, resume, info, progress)
        if settings.stage2 is not Stage2Mode.NONE:
            _stage2(model, gates, blocks, schedule, order, settings, checkpoints, resume, info, progress, device)
    finally:
        model.train(was_training)
        detach_gates(model)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_disable()
    info.selection_order = order
    return order, info


def _stage1(model, gates, blocks, schedule, k, candidates, settings, checkpoints, resume, info, progress):
    started = time.perf_counter()
    gate_params = gates.parameters(candidates)
    gate_ids = {id(p) for p in gates.parameters()}
    weights = [p for p in model.parameters() if id(p) not in gate_ids]
    for p in weights:
        p.requires_grad_(settings.train_scope is TrainScope.FULL)
    for i, g in enumerate(gates.layers):
        g.gate.requires_grad_(i in candidates)
    optimization = Optimization(
        model,
        [
            torch.optim.SGD(gate_params, lr=settings.gate_lr, momentum=0.9)
            if settings.gate_optimizer is GateOptimizer.SGD
            else torch.optim.AdamW(gate_params, lr=settings.gate_lr, weight_decay=0.0)
        ]
        + (
            [torch.optim.AdamW(weights, lr=settings.weight_lr, weight_decay=0.0)]
            if settings.train_scope is TrainScope.FULL
            else []
        ),
        warmup_steps=None,
    )
    order: list[int] = []
    start_round = 0
    state = checkpoints.load("stage1") if resume else None
    if state is not None:
        order = list(state["order"])
        start_round = state["round"]
        gates.set_gates(state["gates"])
        for i in order:
            gates.switch_off(i)
        optimization.load_state_dict(state["optimization"])
        if state.get("model") is not None:
            model.load_state_dict(state["model"], strict=True)
        info.gate_trajectory = state["trajectory"]
        info.stage1_losses = state["losses"]
        info.training_tokens = state["tokens"]
        info.resumed_from = f"stage 1 round {start_round}"
        log.info("resuming TRSP stage 1 after round %d (removed so far: %s)", start_round, order)

    total = settings.training_steps(k)
    for round_index in range(start_round, k):
        alive = [i for i in candidates if i not in order]

        def gate_penalty(_step: int, alive: list[int] = alive) -> torch.Tensor:
            return settings.lambda1 * torch.stack([gates.layers[i].gate.abs() for i in alive]).sum()

        def record(step: int, batch: torch.Tensor, losses: StepLosses, round_index: int = round_index) -> None:
            info.stage1_losses.append(float(losses.ce.detach()))
            info.training_tokens += batch.numel()
            if progress:
                progress(step + 1, total, stage=f"select {round_index + 1}/{k}", loss=info.stage1_losses[-1])

        first = round_index * settings.steps_per_round
        train(model, blocks, schedule, range(first, first + settings.steps_per_round), optimization, "stage-1",
              penalty=gate_penalty, after_step=record)
        values = gates.values()
        chosen = min(alive, key=lambda i: (abs(values[i]), i))
        info.gate_trajectory.append(values)  # gates at the end of the round, before the switch-off
        gates.switch_off(chosen)
        order.append(chosen)
        log.debug("round %d: switched off layer %d (gate %.4f)", round_index + 1, chosen, values[chosen])
        checkpoints.save(
            "stage1",
            {
                "round": round_index + 1,
                "order": order,
                "gates": gates.values(),
                "optimization": optimization.state_dict(),
                "model": cpu_state_dict(model) if settings.train_scope is TrainScope.FULL else None,
                "trajectory": info.gate_trajectory,
                "losses": info.stage1_losses,
                "tokens": info.training_tokens,
            },
        )
    info.stage1_seconds += time.perf_counter() - started
    return order


def _stage2(model, gates, blocks, schedule, order, settings, checkpoints, resume, info, progress, device):
    started = time.perf_counter()
    k = len(order)
    offset = k * settings.steps_per_round
    total = settings.training_steps(k)
    steps = settings.stage2_steps
    gates.reset()  # selected layers back on, kept layers' gates back to 1 (delta/output gates do not fold exactly)
    probe = blocks[: min(2, blocks.shape[0])].to(device)
    # The teacher is the model as stage 2 starts, every layer on; taken before a checkpoint is loaded over it.
    teacher = frozen_teacher(model) if settings.distill > 0 else None
    state = checkpoints.load("stage2") if resume else None
    if state is None:
        info.delta_before_stage2 = _mean_relative_delta(gates, order, model, probe, settings.reg_norm)

    fade = settings.stage2 is Stage2Mode.FADE
    trainable = _stage2_trainable(model, gates, set(order) if fade else set())
    optimizer = torch.optim.AdamW(trainable, lr=settings.stage2_lr, weight_decay=0.0)
    optimization = Optimization(model, [optimizer], default_warmup(steps))

    phase_len = max(1, math.ceil(steps / k))
    fade_steps = max(1, round(settings.fade_fraction * steps))
    start_step = 0
    if state is not None:
        start_step = state["step"]
        info.delta_before_stage2 = state["delta_before"]
        model.load_state_dict(state["model"], strict=True)
        optimization.load_state_dict(state["optimization"])
        info.stage2_losses = state["losses"]
        info.stage2_kl = state.get("kl", [])
        info.training_tokens = state["tokens"]
        info.resumed_from = f"stage 2 step {start_step}"
        log.info("resuming TRSP stage 2 at step %d", start_step)

    active: list[int] = []

    def set_gates(step: int) -> None:
        active[:] = _set_stage2_gates(gates, order, step, settings, fade_steps, phase_len)

    def transfer_penalty(_step: int) -> torch.Tensor | None:
        if not active or settings.lambda2 <= 0:
            return None
        return settings.lambda2 * torch.stack([gates.layers[i].last_delta.mean() for i in active]).sum()

    def record(step: int, batch: torch.Tensor, losses: StepLosses) -> None:
        if losses.kl is not None:
            info.stage2_kl.append(float(losses.kl.detach()))
        info.stage2_losses.append(float(losses.ce.detach()))
        info.training_tokens += batch.numel()
        if progress:
            progress(offset + step + 1, total, stage="transfer", loss=info.stage2_losses[-1])
        if (step + 1) % phase_len == 0 or step + 1 == steps:  # the end of a phase
            checkpoints.save("stage2", _stage2_state(step + 1, model, optimization, info))

    train(model, blocks, schedule[offset:], range(start_step, steps), optimization, "stage-2", teacher,
          settings.distill, before_step=set_gates, penalty=transfer_penalty, after_step=record)
    gates.reset()
    info.delta_after_stage2 = _mean_relative_delta(gates, order, model, probe, settings.reg_norm)
    info.stage2_seconds += time.perf_counter() - started


@register
class Trsp(PruningMethod):
    name = "trsp"
    rank = 10
    description = (
        "Two-stage regularization-based structured pruning: learned gates select, knowledge transfer, removal."
    )
    trains_weights = True
    settings_class = TrspSettings
    spread_alternative = "--train-scope gates --stage2 none trains only the gates"

    def benchmark_variants(self) -> list[BenchmarkVariant]:
        """TRSP as configured, and the ablation of stage 2: its stage-1 selection removed as it is, with least squares,
        and with least squares then healing for the rest of TRSP's token budget."""
        return [
            BenchmarkVariant("trsp", trains=True),
            BenchmarkVariant("trsp-no-stage2", "trsp-stage1", trains=True),
            BenchmarkVariant("trsp-no-stage2+lsq", "trsp-stage1", repair="lsq", trains=True),
            BenchmarkVariant("trsp+lsq+heal", "trsp-stage1", repair="lsq", options=(("heal", True),), trains=True),
        ]

    def updates_weights(self, settings: TrspSettings | None) -> bool:
        return self.transfers_removed_work(settings)

    def transfers_removed_work(self, settings: TrspSettings | None) -> bool:
        settings = settings or TrspSettings()
        return settings.stage2 is not Stage2Mode.NONE or settings.train_scope is TrainScope.FULL

    def planned_work(self, settings, k, num_layers, calib_blocks, block_len, batch_size) -> PlannedWork:
        settings = settings or TrspSettings()
        full = settings.train_scope is TrainScope.FULL or settings.stage2 is not Stage2Mode.NONE
        return PlannedWork(
            selection_tokens=0,
            train_tokens=settings.training_steps(k) * batch_size * block_len,
            train_scope="full" if full else "gates",
            teacher=settings.distill > 0 and settings.stage2 is not Stage2Mode.NONE,
            activation_checkpointing=settings.gradient_checkpointing,
        )

    def select(self, request: SelectionRequest) -> Selection:
        """Runs both stages on `request.model` in place; the selected layers are removed by the caller."""
        settings = request.settings or TrspSettings()
        order, info = run_trsp(
            request.model,
            request.blocks,
            request.k,
            request.candidates,
            settings,
            request.batch_size,
            request.seed,
            request.work_dir,
            request.resume,
            request.progress,
        )
        return Selection(
            sorted(order),
            scores={str(i): v for i, v in enumerate(info.gate_trajectory[0])} if info.gate_trajectory else {},
            details={"trsp_settings": plain(settings), **info.to_dict()},
        )


def _stage2_trainable(model, gates: GateSet, frozen_layers: set[int]) -> list[torch.nn.Parameter]:
    """Every weight except the gates and the layers in `frozen_layers` (fading layers leave the model: training
    them would be wasted work); embeddings, final norm and LM head included."""
    gate_ids = {id(p) for p in gates.parameters()}
    trainable = []
    for index, layer in enumerate(gates.layers):
        for p in layer.layer.parameters():
            p.requires_grad_(index not in frozen_layers)
            if p.requires_grad:
                trainable.append(p)
    layer_param_ids = {id(p) for layer in gates.layers for p in layer.layer.parameters()}
    for p in model.parameters():
        if id(p) not in gate_ids and id(p) not in layer_param_ids:
            p.requires_grad_(True)
            trainable.append(p)
    return trainable


def _set_stage2_gates(gates: GateSet, order: list[int], step: int, settings: TrspSettings, fade_steps: int,
                      phase_len: int) -> list[int]:
    """Fade: the selected layers' gates at this step (off once the fade ends). Regularize: record the deltas of the
    layers whose phase has begun. Returns those regularized layers (none when fading)."""
    if settings.stage2 is Stage2Mode.FADE:
        value = max(0.0, 1.0 - (step + 1) / fade_steps)
        for i in order:
            if value == 0.0:
                gates.switch_off(i)
            else:
                gates.layers[i].fixed_gate = value
        return []
    active = order[: min(len(order), step // phase_len + 1)]
    for i in order:
        gates.layers[i].record_delta = i in active
        gates.layers[i].delta_norm = settings.reg_norm
    return active


def _stage2_state(step: int, model, optimization: Optimization, info: TrspInfo) -> dict:
    return {
        "step": step,
        "model": cpu_state_dict(model),
        "optimization": optimization.state_dict(),
        "losses": info.stage2_losses,
        "kl": info.stage2_kl,
        "tokens": info.training_tokens,
        "delta_before": info.delta_before_stage2,
    }

