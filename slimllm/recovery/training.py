"""The one training loop: healing, fine-tuning, TRSP's two stages and DReSS's regularization all run `train`.

    >>> optimization = Optimization(model, [torch.optim.AdamW(params, lr=1e-4)], warmup_steps=10, lr_flags="--lr")
    >>> seconds = train(model, blocks, batch_schedule(64, 2, 100, seed=0), range(100), optimization, "healing")
    >>> log = fine_tune(model, blocks, steps=100, lr=1e-4, batch_size=2, seed=0)

`train` owns what every loop shares: the batch order, autocast (bf16 on CUDA over fp32 master weights), CE and the
distillation KL, non-finite checks before any update, loss scaling for fp16, the warm-up schedule and train/eval
mode. A caller adds its own penalty and its per-step hook (logging, shrinking, checkpointing), and saves
`Optimization.state_dict()` in a `TrainingCheckpoints` file to resume. The batch order is a pure function of (blocks,
batch size, steps, seed), so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import io
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F

from slimllm.core.artifacts import atomic_write_bytes
from slimllm.core.device import autocast_dtype, model_autocast
from slimllm.core.errors import SlimllmError, UserInputError
from slimllm.core.placement import input_device
from slimllm.core.progress import Progress
from slimllm.recovery.teacher_targets import TeacherTargets


def batch_schedule(n_blocks: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Block indices for every step: epochs of seeded permutations, cut into batches."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    needed = steps * batch_size
    while len(order) < needed:
        order.extend(torch.randperm(n_blocks, generator=generator).tolist())
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def causal_lm_loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position (fp32 loss even under autocast)."""
    return training_losses(model, input_ids)[0]


Teacher = torch.nn.Module | TeacherTargets
"""What distillation compares with: the dense model run on every batch, or its stored top-k (`teacher_targets`)."""


def training_losses(
    model, input_ids: torch.Tensor, teacher: Teacher | None = None, rows: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cross-entropy, KL(teacher || model)) per predicted token; the KL is None without a teacher.

    A teacher model runs without gradient; stored targets are looked up by the batch's `rows` of the training blocks.
    Both losses are computed in fp32 even under autocast.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    if teacher is None:
        return ce, None
    if isinstance(teacher, TeacherTargets):
        if rows is None:
            raise ValueError("stored teacher targets need the batch's rows of the training blocks")
        return ce, teacher.kl(logits, rows)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    return ce, distillation_kl(logits, teacher_logits)


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) between next-token distributions, in nats."""
    vocab = student_logits.shape[-1]
    return F.kl_div(
        F.log_softmax(student_logits.reshape(-1, vocab), dim=-1),
        F.log_softmax(teacher_logits.reshape(-1, vocab), dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def frozen_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of `model` in eval mode: the unpruned model whose predictions training distils."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class TrainingDivergedError(SlimllmError):
    """A loss became NaN or infinite; training stopped before the weights were corrupted."""


TRSP_LR_FLAGS = "--gate-lr, --weight-lr, --stage2-lr"


def finite_loss(loss: torch.Tensor, where: str, lr_flags: str = TRSP_LR_FLAGS) -> float:
    """The loss as a float; a NaN or infinite loss stops training instead of corrupting the weights."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TrainingDivergedError(
            f"the {where} loss became {value}; lower the learning rate ({lr_flags}) or, "
            "on a GPU, compute in fp32 (--dtype fp32)"
        )
    return value


def require_master_weights(model: torch.nn.Module, where: str) -> None:
    """Training updates fp32 weights only: in bf16/fp16 small updates round away and the model stops learning."""
    low = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.dtype != torch.float32})
    if low:
        raise UserInputError(
            f"{where} trains weights, which must be held in fp32 (found {', '.join(low)}); load the model with "
            "load_model(..., for_training=True), which computes in bf16 under autocast on CUDA"
        )


class MixedPrecisionStepper:
    """backward + optimizer step with the loss scaling fp16 autocast needs (a no-op scaler otherwise).

    bf16 has fp32's range and needs no scaling; fp16 gradients underflow without it. The scaler skips a step whose
    gradients overflowed and lowers its scale, as torch.amp does. Several optimizers (TRSP's gates and weights)
    share one scaler.
    """

    def __init__(self, model: torch.nn.Module, optimizers: torch.optim.Optimizer | list[torch.optim.Optimizer]):
        self.optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        device = input_device(model)
        self.scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(model) == torch.float16)

    @property
    def enabled(self) -> bool:
        return self.scaler.is_enabled()

    def step(
        self,
        loss: torch.Tensor,
        where: str = "training",
        lr_flags: str = TRSP_LR_FLAGS,
        terms: dict[str, torch.Tensor | None] | None = None,
    ) -> None:
        """One update from `loss`. The loss and each of its `terms` (CE, KL, ...) are checked first: a NaN or infinite
        value stops training here, before backward, so that nothing non-finite ever reaches the weights."""
        for name, value in {**(terms or {}), "total": loss}.items():
            if value is not None:
                finite_loss(value, f"{where} {name}", lr_flags)
        self.scaler.scale(loss).backward()
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)


class LrSchedule(str, Enum):
    """The learning rate after the linear warm-up: held, or decayed to a tenth of the peak by the last step."""

    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"


FINAL_LR_FRACTION = 0.1
"""Where a decaying schedule ends, as a fraction of the peak learning rate."""


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: LrSchedule) -> float:
    """The learning-rate factor of `step`: linear warm-up to 1, then `schedule` over the remaining steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule is LrSchedule.CONSTANT:
        return 1.0
    span = max(1, total_steps - max(warmup_steps, 0) - 1)
    done = min(1.0, (step - max(warmup_steps, 0)) / span)
    shape = 0.5 * (1.0 + math.cos(math.pi * done)) if schedule is LrSchedule.COSINE else 1.0 - done
    return FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * shape


class Optimization:
    """The optimizers of one run stepped as one, each with a warm-up and then a constant or decaying schedule (none
    with `warmup_steps` None), behind one loss scaler; their state saves and restores as one dict."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        warmup_steps: int | None,
        lr_flags: str = TRSP_LR_FLAGS,
        schedule: LrSchedule = LrSchedule.CONSTANT,
        total_steps: int = 0,
    ) -> None:
        self.optimizers = list(optimizers)
        if schedule is not LrSchedule.CONSTANT and total_steps < 1:
            raise ValueError(f"a {schedule.value} schedule needs the run's total steps")
        self.schedulers = (
            [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_multiplier(s, warmup_steps, total_steps, schedule))
             for o in self.optimizers]
            if warmup_steps is not None
            else []
        )
        self.stepper = MixedPrecisionStepper(model, self.optimizers)
        self.lr_flags = lr_flags
        """The flags that lower this run's learning rates, named when a loss diverges."""

    def step(self, loss: torch.Tensor, where: str, terms: dict[str, torch.Tensor | None]) -> None:
        self.stepper.step(loss, where, self.lr_flags, terms)
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self) -> dict:
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.stepper.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
        self.stepper.load_state_dict(state["scaler"])


@dataclass
class StepLosses:
    """What one step trained on: the total, and its terms (each checked for NaN and infinity before the update)."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor | None = None


def train(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    schedule: list[list[int]],
    steps: range,
    optimization: Optimization,
    label: str,
    teacher: Teacher | None = None,
    distill: float = 0.0,
    before_step: Callable[[int], None] | None = None,
    penalty: Callable[[int], torch.Tensor | None] | None = None,
    after_step: Callable[[int, torch.Tensor, StepLosses], None] | None = None,
) -> float:
    """Train `model` on `blocks[schedule[step]]` for each of `steps`; returns the seconds it took.

    The loss is CE + `distill` · KL(teacher ‖ model) (the teacher runs only when `distill` > 0; stored targets must
    have been computed on `blocks`) + `penalty(step)`.
    `before_step(step)` runs before the forward pass (TRSP sets its gates there), `after_step(step, batch, losses)`
    after the update (logging, DReSS's shrinking, checkpoints). The model's train/eval mode is restored afterwards.
    """
    device = input_device(model)
    started = time.perf_counter()
    was_training = model.training
    model.train()
    try:
        for step in steps:
            if before_step is not None:
                before_step(step)
            batch = blocks[schedule[step]].to(device)
            with model_autocast(model):
                ce, kl = training_losses(model, batch, teacher if distill > 0 else None, schedule[step])
            loss = ce if kl is None else ce + distill * kl
            extra = penalty(step) if penalty is not None else None
            if extra is not None:
                loss = loss + extra
            optimization.step(loss, f"{label} step {step}", {"CE": ce, "KL": kl})
            if after_step is not None:
                after_step(step, batch, StepLosses(loss, ce, kl))
    finally:
        model.train(was_training)
    return time.perf_counter() - started


def default_warmup(steps: int) -> int:
    return max(1, min(10, steps // 10))


@dataclass
class TrainingLog:
    steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def fine_tune(
    model,
    blocks: torch.Tensor,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
    params: Iterable[torch.nn.Parameter] | None = None,
    progress: Progress | None = None,
    teacher: torch.nn.Module | None = None,
    distill: float = 0.0,
) -> TrainingLog:
    """Causal-LM fine-tuning with AdamW (the healing baseline and dense+ft).

    With a `teacher` and `distill` > 0 the loss is CE + distill * KL(teacher || model) (healing by distillation).
    """
    require_master_weights(model, "fine-tuning")
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    optimization = Optimization(model, [optimizer], default_warmup(steps), "--lr")
    log = TrainingLog()

    def record(step: int, batch: torch.Tensor, losses: StepLosses) -> None:
        log.steps += 1
        log.tokens += batch.numel()
        log.losses.append(float(losses.ce.detach()))
        if progress:
            progress(step + 1, steps, loss=log.losses[-1])

    schedule = batch_schedule(blocks.shape[0], batch_size, steps, seed)
    log.seconds = train(model, blocks, schedule, range(steps), optimization, "training", teacher, distill,
                        after_step=record)
    return log


CHECKPOINT_FORMAT = 2
"""Version of what training checkpoints hold (2: one `Optimization` state); checked with the key, so an older
checkpoint is refused rather than misread."""


class TrainingCheckpoints:
    """The latest state of each training stage in a work directory (written atomically, one file per stage), keyed by
    what the run must share with the run that wrote it (`key`: model, data and settings, hashed)."""

    def __init__(self, work_dir: Path | None, key: str, what: str) -> None:
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.what = what
        """The run in words ("TRSP", "healing"), for the error a stale checkpoint gets."""
        self.key = key

    def path(self, stage: str) -> Path | None:
        return self.work_dir / f"{stage}.pt" if self.work_dir is not None else None

    def save(self, stage: str, state: dict) -> None:
        path = self.path(stage)
        if path is None:
            return
        buffer = io.BytesIO()
        torch.save({**state, "key": self.key, "format": CHECKPOINT_FORMAT}, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def matches(self, stage: str) -> bool:
        """Whether the stage has a checkpoint written for this key (read lazily: the weights are not loaded)."""
        path = self.path(stage)
        if path is None or not path.is_file():
            return False
        return self._written_here(torch.load(path, map_location="cpu", weights_only=False, mmap=True))

    def _written_here(self, state: dict) -> bool:
        return state.get("key") == self.key and state.get("format") == CHECKPOINT_FORMAT

    def load(self, stage: str) -> dict | None:
        """The stage's checkpoint, if any; one made by a run with other settings, data or model is refused."""
        path = self.path(stage)
        if path is None or not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not self._written_here(state):
            raise UserInputError(
                f"the {self.what} checkpoint in {self.work_dir} was made with other settings, calibration data or "
                "model (the settings, data and model are hashed); rerun with the same ones, or without --resume to "
                "start over (it will be replaced)"
            )
        return state


def run_fingerprint(model, blocks: torch.Tensor, settings, batch_size: int, seed: int, **extra) -> str:
    """What a resumed run must share with the run that wrote the checkpoint: model, data and every setting."""
    from slimllm.core.artifacts import digest, plain, sha256_bytes
    from slimllm.core.data import model_fingerprint

    payload = {
        "model": model_fingerprint(model),
        "blocks": sha256_bytes(blocks.cpu().numpy().tobytes()) + str(tuple(blocks.shape)),
        "settings": plain(settings),
        "batch_size": batch_size,
        "seed": seed,
        **{key: plain(value) for key, value in extra.items()},
    }
    return digest(payload)


def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's full state dict, for a checkpoint (wrapper modules' names included, so it loads
    back into the same wrapped model)."""
    return {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
