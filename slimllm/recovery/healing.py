"""Healing: train a pruned checkpoint back towards the dense model it came from, on a token budget.

    >>> result = run_heal("runs/x/pruned", HealSettings(calib="wiki.valid.tokens", tokens=114_688), "runs/x/healed")

The loss is CE + W·KL(teacher ‖ student) on next-token distributions, the teacher being the dense model (by default
the one recorded in the checkpoint's `slimllm_pruning.json`). The budget is in tokens, not steps, so that recipes
compare at equal cost. Scope `full` trains every weight (fp32 master weights, bf16 autocast on CUDA); scope `lora`
trains low-rank adapters on every linear layer of the decoder (peft) over frozen base weights held in the compute
dtype, and merges them before saving, so the output is a plain checkpoint that loads in transformers and exports like
any other. Progress is checkpointed under `<out>.partial/heal/`; `resume=True` continues from there and reaches
the same weights as an uninterrupted run (the batch order is a pure function of the settings).
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimllm.core.artifacts import check_output_directory, content_id, digest, library_versions, local_inputs, plain
from slimllm.core.data import SELF_SOURCE
from slimllm.core.device import autocast_dtype, dtype_name
from slimllm.core.errors import UserInputError, parse_choice
from slimllm.core.placement import Placement, PlacementNeeds, check_placement_supports, input_device
from slimllm.core.progress import Progress
from slimllm.recovery.teacher_targets import cached_teacher_targets
from slimllm.recovery.training import (
    LrSchedule,
    Optimization,
    StepLosses,
    TrainingCheckpoints,
    batch_schedule,
    default_warmup,
    require_master_weights,
    train,
)
from slimllm.recovery.training_text import TeacherPrompts, TeacherText, training_text

log = logging.getLogger(__name__)

HEALING_RECORD_FILE = "slimllm_healing.json"
HEAL_STATE = "state"
"""The healing checkpoint in the work directory: `<work>/state.pt`."""

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The decoder's linear layers that receive adapters (attention and MLP projections, not the LM head)."""


class HealScope(str, Enum):
    FULL = "full"
    LORA = "lora"
    CUTS = "cuts"
    """The kept layers next to each cut and the final norm (from the checkpoint's pruning record); the rest frozen."""


DEFAULT_LR = {HealScope.FULL: 1e-4, HealScope.LORA: 1e-3, HealScope.CUTS: 1e-4}
"""Learning rates used when `lr` is not set: adapters start at zero and take a larger step."""


@dataclass
class HealSettings:
    """How a pruned checkpoint is healed."""

    teacher: str | None = None
    """The dense model to distil from (default: the source model recorded in the checkpoint)."""
    calib: str | None = None
    """Training text: a file, a hub dataset or `self`."""
    tokens: int = 114_688
    """Training budget in tokens (steps = tokens / (batch size × block length), rounded up)."""
    block_len: int = 512
    """Tokens per training sequence."""
    batch_size: int = 2
    """Sequences per step."""
    lr: float | None = None
    """AdamW learning rate (default: 1e-4 for full, 1e-3 for lora)."""
    distill: float = 1.0
    """W in CE + W·KL(teacher ‖ student); 0 trains on CE alone and needs no teacher."""
    scope: HealScope = HealScope.FULL
    """full (every weight), lora (adapters merged before saving) or cuts (the layers next to each cut)."""
    lora_rank: int = 16
    """Adapter rank for scope lora."""
    lora_alpha: float = 32.0
    """Adapter scaling numerator (scale = alpha / rank)."""
    warmup_steps: int | None = None
    """Linear LR warm-up steps (default: a tenth of the steps, at most 10)."""
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    """After the warm-up: constant, or cosine / linear decay to a tenth of the peak by the last step."""
    teacher_text: float = 0.0
    """Share of the training blocks cut from text the teacher samples itself (0: only `calib`; `calib self` is 1)."""
    teacher_prompts: TeacherPrompts = TeacherPrompts.OPENINGS
    """What the teacher's samples start from: openings (fixed varied openings), calibration (the first tokens of
    random places in `calib`) or none (the start token alone)."""
    teacher_temperature: float = 0.8
    """Sampling temperature of the teacher's text."""
    teacher_top_p: float = 0.95
    """Nucleus threshold of the teacher's text."""
    teacher_top_k: int = 0
    """0 runs the teacher on every batch; k > 0 stores the teacher's top-k log-probabilities of the training blocks
    once (cached on disk by content) and distils on that support with the tail mass as one outcome."""
    save_every: int = 50
    """Steps between resumable checkpoints."""
    seed: int = 0
    """Seed of the block choice and the batch order."""

    def __post_init__(self) -> None:
        self.scope = parse_choice(HealScope, self.scope, "--scope")
        self.lr_schedule = parse_choice(LrSchedule, self.lr_schedule, "--lr-schedule")
        self.teacher_prompts = self.written_text.prompts  # checks the teacher-text settings, parses the choice
        if self.teacher_top_k < 0:
            raise UserInputError(
                f"--teacher-top-k must be 0 (run the teacher) or a positive k, got {self.teacher_top_k}"
            )
        if self.tokens < 1:
            raise UserInputError(f"--tokens must be a positive token budget, got {self.tokens}")
        if self.block_len < 16 or self.batch_size < 1:
            raise UserInputError("--block-len must be at least 16 and --batch-size at least 1")
        if self.lr is not None and not self.lr > 0:
            raise UserInputError(f"--lr must be positive, got {self.lr}")
        if self.distill < 0:
            raise UserInputError(f"--distill must be >= 0, got {self.distill}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise UserInputError("--lora-rank must be at least 1 and --lora-alpha positive")
        if self.save_every < 1:
            raise UserInputError(f"--save-every must be at least 1, got {self.save_every}")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / (self.batch_size * self.block_len))

    @property
    def written_text(self) -> TeacherText:
        return TeacherText(self.teacher_text, self.teacher_prompts, self.teacher_temperature, self.teacher_top_p)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.scope]


@dataclass
class HealResult:
    out_dir: Path | None
    scope: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    losses: list[float] = field(default_factory=list)
    """CE per step."""
    kl: list[float] = field(default_factory=list)
    """KL(teacher ‖ student) per step (empty without distillation)."""
    trainable_params: int = 0
    resumed_from_step: int = 0
    peak_memory_gib: float | None = None
    """Peak CUDA memory allocated during training (None on CPU)."""
    teacher_seconds: float = 0.0
    """The one teacher pass that stored its top-k (`teacher_top_k`; 0 when read from the cache or not used)."""

    def to_dict(self) -> dict[str, Any]:
        return plain(asdict(self))


def check_teacher_matches(student_tokenizer, teacher_tokenizer, student: nn.Module, teacher: nn.Module,
                          teacher_name: str) -> None:
    """Distillation compares next-token distributions token by token: both models must share one vocabulary."""
    student_vocab, teacher_vocab = student.config.vocab_size, teacher.config.vocab_size
    if student_vocab != teacher_vocab:
        raise UserInputError(
            f"--teacher {teacher_name} predicts {teacher_vocab} tokens but the checkpoint predicts {student_vocab}; "
            "distillation needs the same vocabulary: pass the dense model the checkpoint was pruned from"
        )
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise UserInputError(
                f"--teacher {teacher_name} uses another tokenizer than the checkpoint; distillation needs the same "
                "tokenizer: pass the dense model the checkpoint was pruned from"
            )


def add_lora_adapters(model: nn.Module, settings: HealSettings) -> nn.Module:
    """Wrap `model` with LoRA adapters on every decoder projection; the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    targets = [t for t in LORA_TARGETS if t in present]
    if not targets:
        raise UserInputError(
            "--scope lora found none of the usual projections (q_proj ... down_proj); use --scope full"
        )
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                        target_modules=targets, bias="none")
    # peft keeps the adapters in fp32 over bf16/fp16 base weights (autocast_adapter_dtype). Their random A matrices
    # come from the run's seed, so that a LoRA healing run is repeatable like a full one.
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        return get_peft_model(model, config, autocast_adapter_dtype=True)


def merge_lora_adapters(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights (in fp32) and return the plain transformers model."""
    base_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" not in n)
    model = model.float()
    merged = model.merge_and_unload()
    return merged.to(base_dtype)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def layers_next_to_cuts(kept_layers: list[int], num_layers: int) -> list[int]:
    """Indices (in the pruned model) of the kept layers right before or right after a run of removed layers, given
    the original indices of the kept layers in order and the original number of layers."""
    near = []
    for position, original in enumerate(kept_layers):
        following = kept_layers[position + 1] if position + 1 < len(kept_layers) else num_layers
        preceding = kept_layers[position - 1] if position else -1
        if following != original + 1 or preceding != original - 1:
            near.append(position)
    return near


def _prepare_model(model: nn.Module, settings: HealSettings, trainable_layers: list[int] | None) -> nn.Module:
    """Scope full: the model itself (fp32 master weights required). Scope cuts: the same with only
    `trainable_layers` and the final norm trainable. Scope lora: the model with adapters."""
    from slimllm.core.device import set_compute_dtype
    from slimllm.models.architectures import architecture_for, decoder_layers, get_submodule

    if settings.scope in (HealScope.FULL, HealScope.CUTS):
        require_master_weights(model, f"healing (--scope {settings.scope.value})")
        if settings.scope is HealScope.FULL:
            model.requires_grad_(True)  # every weight, whatever an earlier stage left frozen
            return model
        if not trainable_layers:
            raise UserInputError(
                "--scope cuts trains the layers next to each removed layer, and this model records none removed "
                "(a checkpoint `slimllm prune` wrote removes layers); use --scope full"
            )
        model.requires_grad_(False)
        layers = decoder_layers(model)
        for index in trainable_layers:
            layers[index].requires_grad_(True)
        get_submodule(model, architecture_for(model.config).final_norm_path).requires_grad_(True)
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    compute = autocast_dtype(model)
    model = add_lora_adapters(model, settings)
    if compute is not None:
        set_compute_dtype(model, compute)
    return model


def _optimization(model: nn.Module, settings: HealSettings) -> tuple[list[tuple[str, nn.Parameter]], Optimization]:
    """AdamW with warm-up over the trainable parameters (the model's own, or its LoRA adapters)."""
    named = trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=settings.learning_rate, weight_decay=0.0)
    warmup = settings.warmup_steps if settings.warmup_steps is not None else default_warmup(settings.steps)
    return named, Optimization(model, [optimizer], warmup, "--lr", settings.lr_schedule, settings.steps)


def heal_model(
    model: nn.Module,
    blocks: torch.Tensor,
    settings: HealSettings,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
    work_dir: Path | None = None,
    resume: bool = False,
    state_key: str = "",
    teacher_key: str | None = None,
    trainable_layers: list[int] | None = None,
) -> tuple[nn.Module, HealResult]:
    """Heal `model` in memory; returns the (merged, for lora) model and what was done.

    With `work_dir`, the state is saved every `settings.save_every` steps and, with `resume`, training continues from
    the last save. The model must hold fp32 weights for scope full (load it with `for_training=True`). With
    `settings.teacher_top_k`, the teacher's pass over `blocks` is stored under `teacher_key` (default: a fingerprint
    of the teacher's weights). Scope cuts trains `trainable_layers` (see `layers_next_to_cuts`) and the final norm.
    """
    if settings.distill > 0 and teacher is None:
        raise UserInputError("healing with --distill > 0 needs a teacher model; pass --teacher or --distill 0")
    teacher_seconds = 0.0
    if settings.distill > 0 and settings.teacher_top_k > 0:
        from slimllm.core.data import model_fingerprint

        targets = cached_teacher_targets(teacher, blocks, settings.teacher_top_k,
                                         teacher_key or model_fingerprint(teacher), settings.batch_size, progress)
        teacher, teacher_seconds = targets, targets.seconds
    model = _prepare_model(model, settings, trainable_layers)
    named, optimization = _optimization(model, settings)
    device = input_device(model)
    checkpoints = TrainingCheckpoints(work_dir, state_key, "healing") if work_dir is not None else None
    schedule = batch_schedule(blocks.shape[0], settings.batch_size, settings.steps, settings.seed)
    result = HealResult(None, settings.scope.value, settings.steps, settings.steps * blocks.shape[1] *
                        settings.batch_size, 0.0, 0.0, trainable_params=sum(p.numel() for _, p in named),
                        teacher_seconds=teacher_seconds)
    if resume and checkpoints is not None and (state := checkpoints.load(HEAL_STATE)) is not None:
        _restore(named, optimization, state)
        result.losses, result.kl = list(state["losses"]), list(state["kl"])
        result.resumed_from_step = int(state["step"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()

    def after_step(step: int, batch: torch.Tensor, losses: StepLosses) -> None:
        result.losses.append(float(losses.ce.detach()))
        if losses.kl is not None:
            result.kl.append(float(losses.kl.detach()))
        if progress:
            _report(progress, result, step, batch.numel(), started, settings.steps)
        if checkpoints is not None and (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
            checkpoints.save(HEAL_STATE, {"step": step + 1, "trainable": {name: p.detach().cpu() for name, p in named},
                                          "optimization": optimization.state_dict(),
                                          "losses": result.losses, "kl": result.kl})

    model.eval()  # `train` restores this mode when it ends
    result.seconds = train(model, blocks, schedule, range(result.resumed_from_step, settings.steps), optimization,
                           "healing", teacher, settings.distill, after_step=after_step)
    trained_here = (settings.steps - result.resumed_from_step) * settings.batch_size * blocks.shape[1]
    result.tokens_per_second = trained_here / max(result.seconds, 1e-9)
    if device.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    if settings.scope is HealScope.LORA:
        model = merge_lora_adapters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, result


@torch.no_grad()
def _restore(named: list[tuple[str, nn.Parameter]], optimization: Optimization, state: dict) -> None:
    for name, p in named:
        p.copy_(state["trainable"][name].to(p.device, p.dtype))
    optimization.load_state_dict(state["optimization"])


def _report(progress: Progress, result: HealResult, step: int, batch_tokens: int, started: float, steps: int):
    seconds = max(time.perf_counter() - started, 1e-9)
    postfix: dict[str, Any] = {"loss": result.losses[-1]}
    if result.kl:
        postfix["kl"] = result.kl[-1]
    postfix["tok/s"] = round((step + 1 - result.resumed_from_step) * batch_tokens / seconds)
    progress(step + 1, steps, stage=result.scope, **postfix)


def _healing_record(checkpoint, teacher_name: str | None, settings: HealSettings, text, result: HealResult,
                    out_dir: Path, student) -> dict[str, Any]:
    """What `slimllm_healing.json` records beside the healed weights."""
    return {
        "checkpoint": str(checkpoint),
        "teacher": teacher_name if settings.distill > 0 else None,
        "settings": plain(settings),
        "learning_rate": settings.learning_rate,
        "training_text": {"source": text.source, "text_sha256": text.sha256, "blocks": int(text.blocks.shape[0]),
                          "teacher_blocks": text.teacher_blocks, "block_len": settings.block_len},
        "result": result.to_dict() | {"out_dir": str(out_dir)},
        "device": str(student.device),
        "compute_dtype": dtype_name(student.dtype),
    }


def work_directory(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial") / "heal"


def heal_placement_needs(settings: HealSettings) -> PlacementNeeds:
    """Healing on a model spread with `--device-map`: LoRA only (full healing trains every weight), with every
    layer resident on a device (the adapters are merged into the base weights before saving)."""
    full = settings.scope is not HealScope.LORA
    return PlacementNeeds(
        f"healing with --scope {settings.scope.value}",
        trains_weights=full,
        edits_weights=True,
        alternatives=["--scope lora trains adapters beside frozen weights"] if full else [],
    )


def _frozen_teacher(name: str, student, device: str, dtype: str, placement: Placement | None) -> nn.Module:
    """The dense model the student is distilled from, checked to share the student's tokenizer and vocabulary."""
    from slimllm.models.loading import load_model

    loaded = load_model(name, device=device, dtype=dtype, placement=placement)
    check_teacher_matches(student.tokenizer, loaded.tokenizer, student.model, loaded.model, name)
    teacher = loaded.model.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def run_heal(
    checkpoint: str | Path,
    settings: HealSettings,
    out_dir: Path | str,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress | None = None,
    resume: bool = False,
    placement: Placement | None = None,
    restart_stale: bool = False,
) -> HealResult:
    """Load, heal and save `checkpoint` to `out_dir` (atomically), with `slimllm_healing.json` beside the weights.

    A resumed run continues only a state written for the same checkpoint content, teacher, text and settings; another
    state is refused (`slimllm heal --resume`) or, with `restart_stale` (compile, which owns its work directory),
    discarded.

    With a spreading `placement` (`--device-map auto`) the student and teacher are spread over the GPUs; LoRA
    healing runs so when every layer is resident on a device, full-weight healing does not."""
    from slimllm.models.checkpoints import PRUNING_RECORD_FILE, read_pruning_record, save_checkpoint
    from slimllm.models.loading import load_model

    out_dir = Path(out_dir)
    checkpoint_path = Path(str(checkpoint)).expanduser()
    if not checkpoint_path.exists():
        raise UserInputError(f"checkpoint {checkpoint} does not exist; pass the directory `slimllm prune` wrote")
    if settings.calib is None:
        raise UserInputError("healing needs training text: pass --calib (a file, a hub dataset or `self`)")
    work_dir = work_directory(out_dir)
    protected = local_inputs(str(checkpoint))
    if resume and not work_dir.is_dir():
        raise UserInputError(f"nothing to resume: {work_dir} does not exist; run without --resume")
    if not resume:
        check_output_directory(out_dir, force, protected=protected)
    pruning_record = read_pruning_record(checkpoint_path) if checkpoint_path.is_dir() else None
    teacher_name = settings.teacher or (pruning_record or {}).get("source_model")
    if settings.distill > 0 and teacher_name is None:
        raise UserInputError(
            f"{checkpoint} records no source model; pass --teacher (the dense model it was pruned from) or --distill 0"
        )
    student = load_model(str(checkpoint), device=device, dtype=dtype,
                         for_training=settings.scope is not HealScope.LORA, placement=placement)
    check_placement_supports(student.model, heal_placement_needs(settings))
    needs_teacher = settings.distill > 0 or settings.teacher_text > 0 or settings.calib == SELF_SOURCE
    if needs_teacher and teacher_name is None:
        raise UserInputError(f"{checkpoint} records no source model to write the training text; pass --teacher")
    teacher = _frozen_teacher(teacher_name, student, device, dtype, placement) if needs_teacher else None
    text = training_text(settings.calib, student.tokenizer, settings.tokens, settings.block_len, settings.batch_size,
                         settings.seed, teacher, settings.written_text)
    blocks = text.blocks
    # Keyed by what the checkpoint and the teacher hold, not where they are: a rerun of pruning rewrites the same
    # directory with other weights, and its resume must not restore the old run's trained weights into it.
    key = digest({"checkpoint_sha256": content_id(checkpoint_path), "settings": plain(settings),
                  "teacher": content_id(teacher_name),
                  "text": text.sha256, "device": str(student.device), "dtype": dtype_name(student.dtype)})
    if resume and restart_stale and not TrainingCheckpoints(work_dir, key, "healing").matches(HEAL_STATE):
        log.warning("the healing state in %s is from other inputs or settings; healing starts again", work_dir)
        resume = False
    if not resume:
        shutil.rmtree(work_dir, ignore_errors=True)
    distilled_from = teacher if settings.distill > 0 else None
    record = pruning_record or {}
    near_cuts = layers_next_to_cuts(record.get("kept_layers", []), record.get("original_num_layers", 0))
    healed, result = heal_model(student.model, blocks, settings, distilled_from, progress, work_dir, resume, key,
                                teacher_key=content_id(teacher_name) if distilled_from is not None else None,
                                trainable_layers=near_cuts if settings.scope is HealScope.CUTS else None)
    result.out_dir = out_dir
    record = _healing_record(checkpoint, teacher_name, settings, text, result, out_dir, student)
    records = {HEALING_RECORD_FILE: {"format_version": 1, **record, "versions": library_versions()}}
    if pruning_record is not None:  # the healed model is still the pruned one: keep what was removed and how
        records[PRUNING_RECORD_FILE] = pruning_record
    save_checkpoint(healed, student.tokenizer, out_dir, records, force or resume, protected)
    shutil.rmtree(work_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        work_dir.parent.rmdir()  # the .partial directory, when nothing else uses it
    return result
