"""Small training utilities shared by TRSP and the healing/fine-tuning baselines.

    >>> schedule = batch_schedule(n_blocks=64, batch_size=2, steps=100, seed=0)
    >>> log = fine_tune(model, blocks, steps=100, lr=1e-4, batch_size=2, seed=0)

The batch order is a pure function of (blocks, batch size, steps, seed), so a resumed run sees exactly the batches
an uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import io
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from slimllm.core.artifacts import atomic_write_bytes
from slimllm.core.device import autocast_dtype, model_autocast
from slimllm.core.errors import SlimllmError, UserInputError
from slimllm.core.placement import input_device

Progress = Callable[..., None]


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


def training_losses(
    model, input_ids: torch.Tensor, teacher: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cross-entropy, KL(teacher || model)) per predicted token; the KL is None without a teacher.

    The teacher runs without gradient; both losses are computed in fp32 even under autocast.
    """
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    if teacher is None:
        return ce, None
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


def warmup_constant(step: int, warmup_steps: int) -> float:
    """LR multiplier: linear warm-up, then constant."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


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
    device = input_device(model)
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warmup = default_warmup(steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_constant(s, warmup))
    stepper = MixedPrecisionStepper(model, optimizer)
    log = TrainingLog()
    started = time.perf_counter()
    was_training = model.training
    model.train()
    try:
        for step, indices in enumerate(batch_schedule(blocks.shape[0], batch_size, steps, seed)):
            batch = blocks[indices].to(device)
            with model_autocast(model):
                ce, kl = training_losses(model, batch, teacher if distill > 0 else None)
            loss = ce if kl is None else ce + distill * kl
            stepper.step(loss, f"training step {step}", "--lr", {"CE": ce, "KL": kl})
            scheduler.step()
            log.steps += 1
            log.tokens += batch.numel()
            log.losses.append(float(ce.detach()))
            if progress:
                progress(step + 1, steps, loss=log.losses[-1])
    finally:
        model.train(was_training)
    log.seconds = time.perf_counter() - started
    return log


class TrainingCheckpoints:
    """The latest state of each training stage in a work directory (written atomically, one file per stage)."""

    def __init__(self, work_dir: Path | None, fingerprint: str, method: str) -> None:
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.method = method
        self.fingerprint = fingerprint
        """Hash of the run's model, data and settings; saved in every checkpoint and checked on resume."""

    def path(self, stage: str) -> Path | None:
        return self.work_dir / f"{stage}.pt" if self.work_dir is not None else None

    def save(self, stage: str, state: dict) -> None:
        path = self.path(stage)
        if path is None:
            return
        buffer = io.BytesIO()
        torch.save({**state, "fingerprint": self.fingerprint}, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def load(self, stage: str) -> dict | None:
        """The stage's checkpoint, if any; one made by a run with other settings, data or model is refused."""
        path = self.path(stage)
        if path is None or not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != self.fingerprint:
            raise UserInputError(
                f"the {self.method} checkpoint in {self.work_dir} was made with other settings, calibration data or "
                f"model (seed, batch size, {self.method} settings and data are hashed); rerun with the same ones, "
                "or without --resume to start over"
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
