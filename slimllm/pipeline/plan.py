"""Peak memory and time class of every compile stage, estimated before any work from the model's configuration.

    >>> plans, machine, work = plan_compile(config, resolve_compile_settings(...), device="cpu")
    >>> [(p.stage, round(p.host_bytes / 2**30, 1)) for p in plans]     # Llama-3.2-1B shape, 4 of 16 layers removed
    [('prune', 5.5), ('export_onnx', 12.5), ('export_gguf', 4.9), ('evaluate', 10.5), ('report', 1.5)]
    >>> check_fits(plans, machine)        # a UserInputError (one line, exit 2 in the CLI) when a stage cannot fit

The model is built on PyTorch's meta device, so parameter counts are exact and nothing is allocated or downloaded
beyond the configuration. Each stage's estimate counts the copies of the weights that stage's code holds at its
peak, plus its largest activations; the coefficients are written out below with the code path they stand for, and
`bench/scale.py` puts every estimate beside the measured peak (README, Scale). Host figures are resident memory of
the process and its children; device figures are the CUDA allocator's peak.

Resident memory includes the pages of checkpoints read in place: transformers maps a safetensors file stored in the
dtype it loads (fp32 on CPU) instead of copying it, so those weights are page cache the kernel can drop and read
again. Each stage's `private_bytes` leaves them out, and the fit check holds that figure against the machine: a
stage whose resident peak exceeds memory still runs when its private part fits (slower, if the kernel must re-read
pages). Checkpoints stored in another dtype (bf16 on the hub) are converted on loading and count as private.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch

from slimllm.core.errors import UserInputError
from slimllm.core.placement import Placement

GIB = 2**30

PROCESS_BASE_BYTES = int(0.75 * GIB)
"""Python, torch, transformers, onnxruntime and llama.cpp loaded, before any model: measured 0.35 GiB after imports
and about 0.7 GiB once the first kernels and tokenizer are loaded (SmolLM2-135M stages, less their weights)."""

RETAINED_BYTES = int(0.05 * GIB)
RETAINED_SHARE = 0.15
"""Heap a process keeps after its large stages have freed their tensors (the allocator does not return all of it):
0.05 GiB + 0.15 x the dense fp32 weights, fitted to the SmolLM2-135M and Llama-3.2-1B-shaped runs."""

ONNX_RUNTIME_BYTES = int(0.4 * GIB)
"""onnxruntime's and optimum's fixed state beside the weights (arenas, graph, tokenizer): the part of the ONNX
stage's peak that does not grow with the model (SmolLM2-135M and Llama-3.2-1B-shaped runs)."""

LIBRARY_PAGES_BYTES = int(0.15 * GIB)
"""Pages of the shared libraries (torch, onnxruntime, llama.cpp) in every process's resident memory: file pages, so
not private (the difference between resident and private memory of the report stage, 135M and 1B runs alike)."""

GGUF_REPACKED_BITS = {"q8_0": 8.5, "q4_0": 4.5, "q4_k_m": 4.5, "q4_k_s": 4.5, "iq4_nl": 4.5}
"""Bits per weight of the GGUF types whose matrices llama.cpp's CPU backend repacks into interleaved rows when it
loads them: a private copy beside the mapped file (other types run from the mapped pages)."""

ONNX_QUANT_BITS = {"int8": 8.5, "int8-dynamic": 8.0, "int4": 4.5}
"""Bits per weight of a quantized ONNX graph's matrices with their block scales; below the external-data threshold
onnxruntime holds the whole graph in private memory."""

CPU_FLOPS_PER_CORE = 40e9
"""Sustained fp32 matmul throughput per core in our forward passes (SmolLM2-135M: 4-6 s per forward+backward of
1k tokens on 2 cores)."""
GPU_FLOPS = 150e12
"""Sustained bf16 throughput of a data-centre GPU in training and scoring (about a third of an H100's peak)."""

SAVE_SHARD_BYTES = 5 * 10**9
"""transformers' default `max_shard_size`: saving a model with offloaded modules reads one shard's worth of them
back (pages of the checkpoint they are read from) before writing it."""

FP32 = 4
BF16 = 2


@dataclass(frozen=True)
class ModelFootprint:
    """Exact parameter counts of a decoder-only model and the shapes its activations take."""

    parameters: int
    layer_parameters: int
    """Parameters of one decoder layer (layers are identical in the models slimllm prunes)."""
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config) -> ModelFootprint:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        from slimllm.models.architectures import decoder_layers

        layers = decoder_layers(model)
        return cls(
            parameters=sum(p.numel() for p in model.parameters()),
            layer_parameters=sum(p.numel() for p in layers[0].parameters()),
            num_layers=len(layers),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
            vocab_size=int(config.vocab_size),
        )

    def without_layers(self, removed: int) -> ModelFootprint:
        return replace(self, parameters=self.parameters - removed * self.layer_parameters,
                       num_layers=self.num_layers - removed)

    def with_ffn_width(self, fraction_kept: float) -> ModelFootprint:
        """After width pruning keeps `fraction_kept` of every FFN."""
        removed = int(3 * self.hidden_size * self.intermediate_size * (1 - fraction_kept))
        return replace(self, parameters=self.parameters - self.num_layers * removed,
                       layer_parameters=self.layer_parameters - removed,
                       intermediate_size=int(self.intermediate_size * fraction_kept))

    @property
    def fp32_bytes(self) -> int:
        return FP32 * self.parameters


@dataclass(frozen=True)
class StagePlan:
    stage: str
    host_bytes: int
    """Resident memory at the stage's peak, mapped checkpoint pages included (what RSS measures)."""
    private_bytes: int
    """The part of `host_bytes` that is not a mapped checkpoint: what must fit in the machine's memory."""
    device_bytes: int
    flops: float
    """Arithmetic of the stage's forward and backward passes (time class from the machine's throughput)."""
    counts: str
    """What the estimate counts, in words."""
    time_class: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MachineMemory:
    host_bytes: int
    device_bytes: int | None
    """Memory of the one GPU a whole model runs on (None on the CPU)."""
    device: str
    cores: int
    gpu_bytes: tuple[int, ...] = ()
    """Memory of every GPU a `--device-map` model may use (after --max-memory), in index order."""
    spread: bool = False
    """The run spreads its PyTorch models over `gpu_bytes` with `--device-map`."""
    host_weights_cap: int | None = None
    """`--max-memory cpu=...` of a spread run on the CPU: the host memory a model's weights may take; accelerate
    offloads the layers beyond it to disk and loads one at a time while it runs."""

    @classmethod
    def here(cls, device: str, placement: Placement | None = None) -> MachineMemory:
        import os

        import psutil

        device_bytes = None
        gpus: tuple[int, ...] = ()
        if torch.cuda.is_available():
            gpus = tuple(int(torch.cuda.get_device_properties(i).total_memory)
                         for i in range(torch.cuda.device_count()))
        if device.startswith("cuda") and gpus:
            device_bytes = gpus[torch.device(device).index or 0]
        spread = placement is not None and placement.spread and bool(gpus)
        if spread and placement.max_memory:
            gpus = tuple(min(total, placement.max_memory[i]) for i, total in enumerate(gpus)
                         if i in placement.max_memory)
        cap = placement.max_memory.get("cpu") if placement is not None and placement.spread and placement.max_memory \
            else None
        return cls(int(psutil.virtual_memory().total), device_bytes, device, os.cpu_count() or 1, gpus, spread, cap)

    def device_capacity(self, stage: str, work: Workload | None) -> int | None:
        """What a stage may hold on its devices: every GPU of the map where the stage can run spread (no weight
        training, see `spreads`), else the one GPU."""
        if self.spread and work is not None and spreads(stage, work):
            return sum(self.gpu_bytes)
        return self.device_bytes

    def time_class(self, flops: float) -> str:
        rate = GPU_FLOPS if self.device.startswith("cuda") else CPU_FLOPS_PER_CORE * self.cores
        seconds = flops / rate
        for limit, label in ((60, "under a minute"), (600, "minutes"), (3600, "tens of minutes"), (86400, "hours")):
            if seconds < limit:
                return label
        return "days"


@dataclass(frozen=True)
class Workload:
    """The settings of a compile run that decide memory and arithmetic."""

    removed_layers: int
    ffn_kept: float
    """Fraction of each FFN that width pruning keeps (1.0 for layer removal)."""
    selection_tokens: int
    """Tokens of the calibration passes that choose what to remove (every greedy candidate counted)."""
    calib_batch: int
    block_len: int
    calib_blocks: int
    train_tokens: int
    """Tokens the pruning method trains on (TRSP, DReSS, 2SSP's none)."""
    train_scope: str
    """full, gates or lora: what the pruning method's training updates."""
    repair: bool
    heal_tokens: int
    heal_scope: str | None
    heal_batch: int
    heal_block_len: int
    onnx_quant: str | None
    gguf_types: tuple[str, ...]
    eval_tokens: int
    eval_seq_len: int
    eval_artifacts: int
    task_tokens: int
    profile: bool
    dense_mapped: bool = False
    """The dense checkpoint is stored in fp32 and loads in place (its pages are the file's)."""
    pruned_mapped: bool = False
    """Likewise for the checkpoint the export and evaluation stages read (slimllm writes fp32 on CPU)."""
    train_teacher: bool = True
    """The pruning method's training runs a frozen dense teacher beside the student."""
    train_checkpointed: bool = False
    """The pruning method's training recomputes activations in backward (gradient checkpointing)."""
    frontier_candidates: int = 0
    """Artifacts the frontier stage measures (models × quantization types); 0 when it does not run."""
    frontier_heal_tokens: int = 0
    """Tokens the frontier stage heals its own pruned variants on, all of them together."""


def _logits(model: ModelFootprint, tokens: int) -> int:
    return FP32 * tokens * model.vocab_size


def _training_bytes(model: ModelFootprint, scope: str, batch: int, block_len: int, frozen_bytes: int = FP32,
                    checkpointed: bool = False) -> int:
    """Student state for AdamW in fp32 (weights, gradients, two moments; LoRA and gates: the frozen weights, at
    `frozen_bytes` a parameter, + rank-16 adapters), and the activations kept for backward: about 16 hidden-sized and
    3 FFN-sized tensors per layer and token (with checkpointing, each layer's input and one layer's recomputed
    activations), and the logits four times (student, teacher, both log-softmaxes for the KL term)."""
    tokens = batch * block_len
    frozen = frozen_bytes * model.parameters
    if scope in ("full", "cuts"):  # cuts trains some of the layers: the full state bounds it
        state = 4 * model.fp32_bytes
    elif scope == "lora":
        adapters = model.num_layers * 16 * (4 * model.hidden_size + 3 * (model.hidden_size + model.intermediate_size))
        state = frozen + 4 * FP32 * adapters
    else:  # gates: the weights are frozen, a few scalars train
        state = frozen
    layer = FP32 * tokens * (16 * model.hidden_size + 3 * model.intermediate_size)
    kept = model.num_layers * FP32 * tokens * model.hidden_size + layer if checkpointed else model.num_layers * layer
    return state + kept + 4 * _logits(model, tokens)


def _gguf_private_copy(model: ModelFootprint, gguf_types: tuple[str, ...]) -> int:
    """The largest repacked copy llama.cpp makes of one of the GGUF files (loaded one at a time)."""
    return int(max((GGUF_REPACKED_BITS.get(t, 0.0) for t in gguf_types), default=0.0) / 8 * model.parameters)


def _onnx_quantized_copy(model: ModelFootprint, quant: str | None) -> int:
    """The quantized ONNX graph in memory while it is written and validated; an fp32 graph is counted apart."""
    bits = ONNX_QUANT_BITS.get(quant or "none")
    return int(bits / 8 * model.parameters) if bits else 0


def _weights_held(machine: MachineMemory, work: Workload, stage: str, model: ModelFootprint,
                  mapped: int) -> tuple[int, int]:
    """(host bytes, mapped bytes) of a model's fp32 weights in a stage on the CPU: all of them, or under a host budget
    for a spread model, the budget and the one offloaded layer being run. accelerate reads that layer in place from
    the checkpoint's safetensors (or from the memory-mapped files of its offload folder), so its pages are mapped."""
    cap = machine.host_weights_cap
    if cap is None or machine.device.startswith("cuda") or not spreads(stage, work) or model.fp32_bytes <= cap:
        return model.fp32_bytes, mapped
    layer = FP32 * model.layer_parameters
    return cap + layer, min(mapped, cap) + layer


def _scoring_stages(dense: ModelFootprint, work: Workload) -> list[tuple[str, float, str]]:
    """(stage, arithmetic, what it holds) of the stages that score the dense model beside each artifact."""
    stages = [("evaluate", 2 * 2 * dense.parameters * work.eval_tokens * max(1, work.eval_artifacts),
               "the dense model and one evaluated artifact at a time (a quantized one in private memory); the logits "
               "of one window from each, with their log-softmaxes and the KL terms")]
    if work.task_tokens:
        stages.append(("accuracy", 2 * dense.parameters * work.task_tokens * (1 + work.eval_artifacts),
                       "one scored model at a time: the dense model, then each artifact"))
    return stages


def _scoring_weights(
    stage: str, dense: tuple[int, int], pruned: tuple[int, int], artifact_copy: int
) -> tuple[int, int]:
    """(weights' host bytes, their mapped part) in a scoring stage, from the (held, mapped) bytes of each model:
    evaluation holds the dense model beside one artifact; accuracy scores one model at a time (the dense model, then
    each artifact)."""
    (dense_bytes, dense_map), (pruned_bytes, pruned_map) = dense, pruned
    if stage == "accuracy":
        artifact = pruned_bytes + artifact_copy
        return (dense_bytes, dense_map) if dense_bytes >= artifact else (artifact, pruned_map)
    return dense_bytes + pruned_bytes + artifact_copy, dense_map + pruned_map


def plan_stages(dense: ModelFootprint, work: Workload, machine: MachineMemory) -> list[StagePlan]:
    """Per compile stage, the peak host and device memory and the arithmetic, on `machine`."""
    pruned = dense.without_layers(work.removed_layers).with_ffn_width(work.ffn_kept)
    on_gpu = machine.device.startswith("cuda")
    base = PROCESS_BASE_BYTES
    W, P = dense.fp32_bytes, pruned.fp32_bytes  # noqa: N806 - the weights' sizes, named as in the docs
    plans: list[StagePlan] = []

    W_map = W if work.dense_mapped and not on_gpu else 0  # noqa: N806
    P_map = P if work.pruned_mapped and not on_gpu else 0  # noqa: N806
    held = partial(_weights_held, machine, work)

    def add(stage: str, host: int, device: int, flops: float, counts: str, mapped: int = 0) -> None:
        if on_gpu:  # the weights and activations move to the device; the host keeps the loading copy
            host = base + W
        else:
            device = 0
            mapped += LIBRARY_PAGES_BYTES
        plans.append(StagePlan(stage, int(host), int(host - mapped), int(device), flops, counts,
                               machine.time_class(flops)))

    stream = 2 * FP32 * work.calib_blocks * work.block_len * dense.hidden_size
    select_flops = 2 * dense.parameters * work.selection_tokens
    frozen_bytes = BF16 if on_gpu else FP32  # weights that do not train, in the compute dtype (design notes)
    if work.train_tokens:
        training = _training_bytes(dense, work.train_scope, work.calib_batch, work.block_len, frozen_bytes,
                                   work.train_checkpointed)
        teacher = frozen_bytes * dense.parameters if work.train_teacher else 0
        add("prune", base + W + training + teacher + P, training + teacher,
            select_flops + 6 * dense.parameters * work.train_tokens,
            "the model and its training state (AdamW in fp32, activations for backward), the dense teacher, "
            "the pruned copy while saving", mapped=W_map)
    else:
        # The repair runs the whole model, LM head included, one batch at a time; float64 moments of the hidden size.
        repair = (2 * 8 * dense.hidden_size**2 + _logits(dense, work.calib_batch * work.block_len)
                  if work.repair else 0)
        weights, weights_map = held("prune", dense, W_map)
        # Saving an offloaded model gathers one shard of its offloaded modules, read from the checkpoint in place.
        gathered = min(SAVE_SHARD_BYTES, P) if weights < W else 0
        add("prune", base + weights + stream + repair + gathered, W + stream,
            select_flops,
            "the model (layers are removed in place and saved tensor by tensor; offloaded layers are read one at a "
            "time, and one shard of them while saving), the calibration stream of one layer for every block, the "
            "logits of one calibration batch while repairing", mapped=weights_map + gathered)
    if work.heal_tokens and work.heal_scope:
        training = _training_bytes(pruned, work.heal_scope, work.heal_batch, work.heal_block_len, frozen_bytes)
        add("heal", base + training + W + P, training + frozen_bytes * dense.parameters,
            6 * pruned.parameters * work.heal_tokens,
            f"the pruned model's training state ({work.heal_scope}), the dense teacher, the healed copy while saving",
            mapped=W_map)
    onnx_copy = _onnx_quantized_copy(pruned, work.onnx_quant)
    gguf_copy = _gguf_private_copy(pruned, work.gguf_types)
    artifact_copy = max(gguf_copy, onnx_copy)
    if work.onnx_quant is not None:
        from slimllm.exporters.onnx import EXTERNAL_DATA_BYTES

        # Above the external-data threshold onnxruntime maps the weights' side file rather than copying it, so at
        # the validation peak both the session's and the reference's weights are file pages.
        session_map = P if P > EXTERNAL_DATA_BYTES and not on_gpu else 0
        add("export_onnx", base + ONNX_RUNTIME_BYTES + 3 * P + onnx_copy + _logits(pruned, work.eval_seq_len), P,
            2 * 2 * pruned.parameters * work.eval_tokens,
            "the model, its traced ONNX graph and the graph's serialization (export); the graph and its quantized "
            "copy (quantization); the ONNX session and the PyTorch reference (validation)", mapped=P_map + session_map)
    if work.gguf_types:
        add("export_gguf", base + P + gguf_copy + _logits(pruned, work.eval_seq_len) * 2, P,
            2 * 2 * pruned.parameters * work.eval_tokens * len(work.gguf_types),
            "the PyTorch reference and the logits of one window from it and from llama.cpp (validation); the "
            "writer streams one tensor at a time; llama.cpp maps each file and repacks its quantized matrices",
            mapped=P_map)
    for stage, flops, counts in _scoring_stages(dense, work):
        weights, mapped = _scoring_weights(stage, held(stage, dense, W_map), held(stage, pruned, P_map), artifact_copy)
        add(stage, base + weights + 6 * _logits(dense, work.eval_seq_len), max(W, P) if stage == "accuracy" else W + P,
            flops, counts, mapped=mapped)
    _measuring_stages(add, dense, pruned, work, frozen_bytes)
    add("report", base + RETAINED_BYTES + RETAINED_SHARE * W, 0, 0,
        "the run's records and plots, in a process that keeps what its allocator held for earlier stages")
    return plans


def _measuring_stages(add: Callable[..., None], dense: ModelFootprint, pruned: ModelFootprint, work: Workload,
                      frozen_bytes: int) -> None:
    """The latency profile and the frontier (each candidate exported, scored beside the dense model and timed; its
    own pruned variants healed one at a time)."""
    base, W, P = PROCESS_BASE_BYTES, dense.fp32_bytes, pruned.fp32_bytes  # noqa: N806
    if work.profile:
        add("profile", base + 2 * W, W, 2 * dense.parameters * 2048 * 2 * max(1, work.eval_artifacts),
            "one benchmark worker at a time, holding the model it times")
    if work.frontier_candidates:
        training = _training_bytes(pruned, "full", work.heal_batch or 2, work.heal_block_len or 512, frozen_bytes)
        per_candidate = 2 * 2 * dense.parameters * (work.eval_tokens + work.task_tokens) + 2 * dense.parameters * 2048
        add("frontier", base + max(2 * W + 6 * _logits(dense, work.eval_seq_len), training + W + P), W + P,
            6 * pruned.parameters * work.frontier_heal_tokens + work.frontier_candidates * per_candidate,
            f"{work.frontier_candidates} candidates, each exported, scored beside the dense model (KLD, the task) "
            "and timed one at a time; its pruned variants healed one at a time, with the dense teacher")


ALTERNATIVES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "prune": [
        ('TRSP with train_scope = "gates" and stage2 = "none" in [trsp]', {"train_scope": "gates"}),
        ("a method that trains nothing (--method shortgpt)", {"train_tokens": 0, "train_scope": "none"}),
    ],
    "heal": [("--heal-scope lora", {"heal_scope": "lora"}), ("--no-heal", {"heal_tokens": 0, "heal_scope": None})],
    "export_onnx": [("--target gguf (GGUF streams one tensor at a time)", {"onnx_quant": None})],
    "accuracy": [("--eval-task none", {"task_tokens": 0})],
    "profile": [("--profile none", {"profile": False})],
    "frontier": [("[frontier] pruned = [] (the dense ladder and this run's model only)", {"frontier_heal_tokens": 0})],
}
"""Per stage, the settings that lower its peak, in the order they are offered, as Workload changes."""


SPREAD_STAGES = ("prune", "heal", "evaluate", "accuracy")
"""Stages whose PyTorch models `--device-map` spreads over several GPUs."""


def spreads(stage: str, work: Workload) -> bool:
    """The stage runs on a model spread with `--device-map`: the evaluation stages, pruning that trains no weights
    (scores, gates), healing with LoRA (frozen weights, adapters beside them)."""
    if stage == "prune":
        return work.train_scope in ("none", "gates")
    if stage == "heal":
        return work.heal_scope == "lora"
    return stage in SPREAD_STAGES


def check_fits(
    plans: list[StagePlan],
    machine: MachineMemory,
    replan: Callable[[Workload], list[StagePlan]] | None = None,
    work: Workload | None = None,
    headroom: float = 0.9,
) -> None:
    """Refuse, in one line, a run whose estimated peak exceeds what the machine has (with 10 % headroom). With
    `replan` and `work`, the line names the first alternative setting under which the whole run fits: spreading the
    models over the machine's GPUs (`--device-map auto`) where that is enough, else a cheaper setting."""

    def over(plan: StagePlan, machine: MachineMemory = machine, work: Workload | None = work) -> str | None:
        if plan.private_bytes > headroom * machine.host_bytes:
            return (f"{plan.private_bytes / GIB:.1f} GiB of memory it cannot page out and this machine has "
                    f"{machine.host_bytes / GIB:.1f} GiB")
        capacity = machine.device_capacity(plan.stage, work)
        if capacity is not None and plan.device_bytes > headroom * capacity:
            where = (f"its {len(machine.gpu_bytes)} GPUs" if capacity != machine.device_bytes
                     else machine.device)
            return f"{plan.device_bytes / GIB:.1f} GiB on {where}, which has {capacity / GIB:.1f} GiB"
        return None

    for plan in plans:
        problem = over(plan)
        if problem is None:
            continue
        advice = "no setting slimllm knows brings it under; use a machine with more memory"
        spread = replace(machine, spread=True)
        if (replan is not None and work is not None and not machine.spread and len(machine.gpu_bytes) > 1
                and all(over(p, spread) is None for p in plans)):
            advice = f"--device-map auto would fit (it spreads the model over the {len(machine.gpu_bytes)} GPUs)"
        else:
            for flag, change in ALTERNATIVES.get(plan.stage, []):
                if replan is None or work is None:
                    advice = f"try {flag}"
                    break
                changed = replace(work, **change)
                if all(over(p, work=changed) is None for p in replan(changed)):
                    advice = f"{flag} would fit"
                    break
        raise UserInputError(f"stage {plan.stage} needs about {problem}; {advice} (--no-memory-check runs it anyway)")


HELLASWAG_TOKENS_PER_TASK = 4 * 96
"""Four endings scored with their context: about 96 tokens each in HellaSwag."""


def workload_for(settings: dict[str, Any], dense: ModelFootprint) -> Workload:
    """The workload of a compile run from its resolved settings (`slimllm.pipeline.settings.resolve_settings`)."""
    from slimllm.pipeline.settings import Target
    from slimllm.pruning.candidates import layers_to_remove

    compile_settings, prune, heal = settings["compile"], settings["prune"], settings["heal"]
    work_kwargs: dict[str, Any] = dict(removed_layers=0, ffn_kept=1.0, selection_tokens=0, train_tokens=0,
                                       train_scope="none", repair=False, calib_batch=1, block_len=512, calib_blocks=0)
    if prune is not None:
        spec = prune.method.spec
        k = layers_to_remove(dense.num_layers, prune.remove, prune.ratio) if spec.removes_layers else 0
        planned = spec.planned_work(settings["method_settings"], k, dense.num_layers, prune.calib_blocks,
                                    prune.block_len, prune.batch_size)
        from slimllm.recovery.repair import RepairMethod

        work_kwargs.update(
            removed_layers=k, ffn_kept=planned.ffn_kept, selection_tokens=planned.selection_tokens,
            train_tokens=planned.train_tokens, train_scope=planned.train_scope, train_teacher=planned.teacher,
            train_checkpointed=planned.activation_checkpointing,
            repair=prune.resolved_repair(settings["method_settings"]) is not RepairMethod.NONE,
            calib_batch=prune.batch_size, block_len=prune.block_len, calib_blocks=prune.calib_blocks,
        )
    target = compile_settings.target
    onnx = settings["onnx"].quant.value if target in (Target.ONNX, Target.ALL) else None
    gguf = tuple(t.value for t in settings["gguf"].outtypes) if target in (Target.GGUF, Target.ALL) else ()
    artifacts = 1 + (onnx is not None) + len(gguf)
    eval_tokens = compile_settings.eval_windows * compile_settings.eval_seq_len
    return Workload(
        **work_kwargs,
        heal_tokens=heal.tokens if heal is not None else 0,
        heal_scope=heal.scope.value if heal is not None else None,
        heal_batch=heal.batch_size if heal is not None else 0,
        heal_block_len=heal.block_len if heal is not None else 0,
        onnx_quant=onnx,
        gguf_types=gguf,
        eval_tokens=eval_tokens,
        eval_seq_len=compile_settings.eval_seq_len,
        eval_artifacts=artifacts,
        task_tokens=compile_settings.eval_tasks * HELLASWAG_TOKENS_PER_TASK if compile_settings.eval_task else 0,
        profile=compile_settings.profile is not None,
        **_frontier_work(settings, prune is not None),
    )


def _frontier_work(settings: dict[str, Any], pruned: bool) -> dict[str, int]:
    """The frontier stage's candidates (models × ladder) and healing tokens, when `[compile] frontier` is on."""
    frontier = settings.get("frontier")
    if frontier is None or not settings["compile"].frontier:
        return {}
    variants = len(frontier.pruned)
    models = 1 + variants + int(pruned)
    heal = settings["heal"]
    heal_tokens = variants * (heal.tokens if heal is not None and frontier.heal else 0)
    return {"frontier_candidates": models * (len(frontier.gguf_types) + len(frontier.onnx_variants)),
            "frontier_heal_tokens": heal_tokens}


def stored_in_fp32(config) -> bool:
    """The checkpoint's config says its weights are stored in fp32 (`dtype`, or `torch_dtype` before
    transformers 4.56), so that loading it on CPU maps the file instead of converting it."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") == "float32"


@dataclass(frozen=True)
class CompilePlan:
    dense: ModelFootprint
    work: Workload
    machine: MachineMemory
    stages: list[StagePlan]

    def check(self) -> None:
        """Raise a one-line UserInputError naming the stage that cannot fit and the setting that would."""
        check_fits(self.stages, self.machine, lambda work: plan_stages(self.dense, work, self.machine), self.work)


def plan_compile(config, settings: dict[str, Any], device: str, machine: MachineMemory | None = None,
                 placement: Placement | None = None) -> CompilePlan:
    """Every stage's estimate for a compile of a model with `config` under `settings`, on this machine (its models
    spread over the GPUs with a spreading `placement`)."""
    dense = ModelFootprint.from_config(config)
    machine = machine or MachineMemory.here(device, placement)
    work = workload_for(settings, dense)
    dense_mapped = stored_in_fp32(config)
    writes_checkpoint = settings["prune"] is not None or settings["heal"] is not None
    work = replace(work, dense_mapped=dense_mapped, pruned_mapped=writes_checkpoint or dense_mapped)
    return CompilePlan(dense, work, machine, plan_stages(dense, work, machine))
