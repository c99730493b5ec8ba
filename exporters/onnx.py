"""ONNX export of a (pruned) checkpoint, validated in onnxruntime against PyTorch.

    >>> result = export_onnx(Path("out/pruned"), Path("out/onnx"), OnnxExportSettings(quant="int4"))
    >>> result.validation["passed"]
    True

Two engines:
- `optimum` (default): optimum-onnx's exporter, task `text-generation-with-past`. One `model.onnx` with
  `input_ids`, `attention_mask`, `position_ids`, `past_key_values.N.key/value` -> `logits`, `present.N.*`; the
  directory loads in `optimum.onnxruntime.ORTModelForCausalLM`. Optional int8 or int4 weight-only quantization
  (MatMulNBits) or int8 dynamic quantization.
- `genai`: onnxruntime-genai's model builder (fused GroupQueryAttention, `genai_config.json`), fp32/fp16/int4.

The export is written into a temporary directory beside the target and renamed only after the parity check
passes; a failed one is kept as `<target>.failed` with its `validation.json`, for debugging.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from slimllm.core.artifacts import atomic_directory, atomic_write_json, library_versions, plain
from slimllm.core.errors import ExportError, MissingDependencyError, UserInputError, parse_choice
from slimllm.core.logs import quiet_loggers
from slimllm.exporters.checkpoint import CheckpointInfo, inspect_checkpoint
from slimllm.exporters.ort_session import OrtCausalLM, Provider, resolve_provider
from slimllm.exporters.parity import (
    PARITY_PROMPTS,
    CheckResult,
    ParityReport,
    TorchReference,
    compare_logits,
    eval_windows,
    hf_token_ids,
    left_padded_batch,
    long_window,
    past_window_length,
    perplexity,
    perplexity_check,
    tokens_check,
)
from slimllm.exporters.records import EXPORT_RECORD_FILE, VALIDATION_FILE
from slimllm.models.attention_free import attention_free_layers

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"


class OnnxEngine(str, Enum):
    OPTIMUM = "optimum"
    """optimum-onnx's exporter: the standard layout ORTModelForCausalLM loads."""
    GENAI = "genai"
    """onnxruntime-genai's model builder: fused GroupQueryAttention, runs in onnxruntime-genai."""


class OnnxDType(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"


class OnnxQuant(str, Enum):
    NONE = "none"
    INT8 = "int8"
    """Weight-only 8-bit blocks (MatMulNBits); activations stay in float."""
    INT8_DYNAMIC = "int8-dynamic"
    """onnxruntime's dynamic quantization: int8 weights, int8 activations quantized per tensor at run time."""
    INT4 = "int4"
    """Weight-only 4-bit blocks (MatMulNBits) for the layers and the embedding, 8-bit LM head."""


@dataclass(frozen=True)
class Tolerance:
    """What an export of one precision must reach against PyTorch fp32."""

    max_abs_logits: float | None
    """Absolute part of the prefill/decode logits bound; None where logits are compared through perplexity."""
    relative_logits: float
    """Relative part: the bound is max_abs_logits + relative_logits * max|reference logit|."""
    greedy_identical: bool
    """32-token greedy output must equal PyTorch's."""
    max_ppl_ratio: float | None
    """Perplexity of the export over PyTorch's; None where logits are compared directly."""
    noise_multiple: float = 0.0
    """Adds this multiple of the reference's own fp32 error on the same inputs (PyTorch fp32 against the same model
    computed in float64) to the logits bound; 0 keeps the bound fixed."""


# fp32 graphs differ from eager PyTorch only in summation order, so an fp32 export is held to the reference's own
# fp32 error on the same inputs: NOISE_MULTIPLE x max|PyTorch fp32 - PyTorch float64| + 1e-4. That error differs
# from input to input by ten times and more (on the least-squares-repaired SmolLM2-135M, a lone space token whose
# state the repaired layer keeps large), so a fixed bound is either loose where the model is exact or one unlucky
# prompt away from failing a correct export (bench/results/export-parity-smollm2-135m.md). A real export fault (a
# wrong rotary, a missing block) moves logits by 0.1 or more.
# fp16 logits of a 30-layer model drift by a few hundredths, and near-ties then flip a greedy token. Quantized
# models are judged on perplexity, measured on the repaired 8-of-30 SmolLM2-135M (same file, 8 windows of
# WikiText-2 test): int8 weight-only 1.005x; 4-bit weights 1.28-1.30x (100M-parameter models lose far more to 4 bits
# than 7B ones, which typically lose under 10 %); int8 dynamic 2.13x, because per-tensor activation quantization
# cannot represent the outlier channels of LLM activations: it passes only on models without them.
NOISE_MULTIPLE = 8.0
"""How many times the fp32 reference's own error an fp32 export may differ from it (two fp32 computations of the
same sums differ by up to about twice that error; the rest is margin)."""
TOLERANCES: dict[tuple[OnnxDType, OnnxQuant], Tolerance] = {
    (OnnxDType.FP32, OnnxQuant.NONE): Tolerance(1e-4, 0.0, True, None, noise_multiple=NOISE_MULTIPLE),
    (OnnxDType.FP16, OnnxQuant.NONE): Tolerance(0.05, 5e-3, False, 1.02),
    (OnnxDType.FP32, OnnxQuant.INT8): Tolerance(None, 0.0, False, 1.03),
    (OnnxDType.FP32, OnnxQuant.INT8_DYNAMIC): Tolerance(None, 0.0, False, 1.10),
    (OnnxDType.FP32, OnnxQuant.INT4): Tolerance(None, 0.0, False, 1.50),
    (OnnxDType.FP16, OnnxQuant.INT4): Tolerance(None, 0.0, False, 1.50),
}

# The genai builder fuses attention (GroupQueryAttention with rotary embeddings from precomputed cos/sin tables)
# and the norms, so its fp32 logits sit further from eager PyTorch: up to 9e-4 on SmolLM2-135M, with identical
# argmax and greedy tokens.
GENAI_FP32_TOLERANCE = Tolerance(1e-3, 1e-4, True, None)

# onnxruntime's CUDA EP runs fp32 MatMuls in TF32 on Ampere and newer GPUs (its `use_tf32` option is on by
# default): a 10-bit mantissa, so logits move by about 1e-3 of their scale. Held to that, with greedy tokens
# still required to match; the fp32 numbers of the CPU EP keep the tight bound above.
CUDA_FP32_TOLERANCE = Tolerance(2e-2, 2e-3, True, None)


@dataclass
class OnnxExportSettings:
    """Settings of `slimllm export --target onnx`."""

    engine: OnnxEngine = OnnxEngine.OPTIMUM
    """optimum (standard layout, ORTModelForCausalLM) or genai (onnxruntime-genai model builder)."""
    dtype: OnnxDType = OnnxDType.FP32
    """Precision of the graph; fp16 needs a CUDA device."""
    quant: OnnxQuant = OnnxQuant.NONE
    """none, int8 (weight-only), int8-dynamic (weights and activations) or int4 (weight-only, 8-bit LM head)."""
    block_size: int = 32
    """Block size of int4/int8 weight-only quantization (16, 32, 64, 128 or 256)."""
    opset: int | None = None
    """ONNX opset; None takes the exporter's default."""
    provider: Provider = Provider.AUTO
    """Execution provider for validation: auto (CUDA EP when usable, else CPU EP), cpu or cuda."""
    eval_data: str | None = None
    """Text for the perplexity checks (quantized and fp16 exports); None uses a built-in paragraph."""
    eval_seq_len: int = 256
    """Tokens per perplexity window."""
    eval_windows: int = 4
    """Perplexity windows scored."""
    generate_tokens: int = 32
    """Greedy tokens compared with PyTorch."""
    decode_steps: int = 4
    """Decode steps through the KV cache compared with PyTorch, on a left-padded batch."""

    def __post_init__(self) -> None:
        self.engine = parse_choice(OnnxEngine, self.engine, "--engine")
        self.dtype = parse_choice(OnnxDType, self.dtype, "--dtype")
        self.quant = parse_choice(OnnxQuant, self.quant, "--quant")
        self.provider = parse_choice(Provider, self.provider, "--provider")
        if (self.dtype, self.quant) not in TOLERANCES:
            raise UserInputError(
                f"--dtype {self.dtype.value} with --quant {self.quant.value} is not supported; "
                "quantize from fp32 (int8, int8-dynamic, int4) or use fp16 with int4 on the genai engine"
            )
        if self.engine is OnnxEngine.GENAI and self.quant in (OnnxQuant.INT8, OnnxQuant.INT8_DYNAMIC):
            raise UserInputError("the genai engine builds fp32, fp16 or int4 models; use --quant int4 or none")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise UserInputError(f"--block-size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.generate_tokens < 1 or self.decode_steps < 1 or self.eval_windows < 1 or self.eval_seq_len < 2:
            raise UserInputError("generate_tokens, decode_steps and eval_windows must be >= 1 (eval_seq_len >= 2)")

    @property
    def tolerance(self) -> Tolerance:
        return self.tolerance_on(Provider.CPU)

    def tolerance_on(self, provider: Provider | str) -> Tolerance:
        """The bound for this export validated on `provider` (the CUDA EP computes fp32 in TF32)."""
        fp32 = (self.dtype, self.quant) == (OnnxDType.FP32, OnnxQuant.NONE)
        if fp32 and Provider(provider) is Provider.CUDA:
            return CUDA_FP32_TOLERANCE
        if self.engine is OnnxEngine.GENAI and fp32:
            return GENAI_FP32_TOLERANCE
        return TOLERANCES[(self.dtype, self.quant)]

    @property
    def variant(self) -> str:
        """Short name of what this export is, e.g. `optimum-fp32` or `genai-int4`."""
        precision = self.dtype.value if self.quant is OnnxQuant.NONE else self.quant.value
        return f"{self.engine.value}-{precision}"


@dataclass
class OnnxExportResult:
    out_dir: Path
    variant: str
    model_file: Path
    files: dict[str, int]
    """File name -> size in bytes."""
    provider: str
    validation: dict[str, Any]
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["out_dir"] = str(self.out_dir)
        payload["model_file"] = str(self.model_file)
        return payload


def check_onnx_dependencies(settings: OnnxExportSettings) -> Provider:
    """Fail before any work when this export cannot run here: the engine's package, the provider, fp16 on CPU.

    Returns the execution provider the export will be validated on.
    """
    provider = resolve_provider(settings.provider)
    if settings.dtype is OnnxDType.FP16 and provider is not Provider.CUDA:
        raise UserInputError("--dtype fp16 needs a CUDA device (onnxruntime's CPU EP runs fp16 slowly); use fp32")
    if settings.engine is OnnxEngine.GENAI:
        import importlib.util

        if importlib.util.find_spec("onnxruntime_genai") is None:
            raise MissingDependencyError(
                "the genai engine needs onnxruntime-genai; install the `genai` extra (`pip install 'slimllm[genai]'`)"
            )
    return provider


def export_onnx(
    checkpoint_dir: Path,
    out_dir: Path,
    settings: OnnxExportSettings | None = None,
    force: bool = False,
) -> OnnxExportResult:
    """Export, quantize if asked, validate against PyTorch, then move the directory into place."""
    settings = settings or OnnxExportSettings()
    checkpoint = inspect_checkpoint(checkpoint_dir)
    attention_free = attention_free_layers(checkpoint.config)
    if attention_free and settings.engine is OnnxEngine.GENAI:
        raise UserInputError(
            f"blocks {attention_free} of this model have no attention, and onnxruntime-genai's builder assumes "
            "identical blocks; use --engine optimum (slimllm then exports the module itself)"
        )
    provider = check_onnx_dependencies(settings)
    notes: list[str] = []
    seconds: dict[str, float] = {}
    with atomic_directory(Path(out_dir), force=force, keep_failed=True, protected=[checkpoint.path]) as tmp:
        started = time.perf_counter()
        if settings.engine is OnnxEngine.OPTIMUM:
            if attention_free:
                _export_attention_free(checkpoint, tmp, settings)
                notes.append(f"exported from the module (blocks {attention_free} have no attention; optimum "
                             "assumes identical blocks): past key/values only for the blocks with attention")
            else:
                _export_with_optimum(checkpoint, tmp, settings, provider)
            _normalize_layout(tmp / MODEL_FILE, _is_large(checkpoint), checkpoint.tied_embeddings)
            seconds["export"] = time.perf_counter() - started
            if settings.quant is not OnnxQuant.NONE:
                started = time.perf_counter()
                notes.extend(_quantize(tmp / MODEL_FILE, settings, provider))
                seconds["quantize"] = time.perf_counter() - started
        else:
            _build_with_genai(checkpoint, tmp, settings, provider)
            seconds["export"] = time.perf_counter() - started
            if settings.quant is OnnxQuant.INT4:
                notes.append(
                    f"genai int4 (block {settings.block_size}) with an 8-bit LM head; the embedding is kept in float "
                    "and not shared with the head"
                )
        started = time.perf_counter()
        report = validate_onnx(tmp, checkpoint.path, settings)
        report.warnings.extend(notes)
        seconds["validate"] = time.perf_counter() - started
        atomic_write_json(tmp / VALIDATION_FILE, report.to_dict())
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(
            tmp / EXPORT_RECORD_FILE,
            {
                "format": "onnx",
                "variant": settings.variant,
                "settings": plain(settings),
                "source_checkpoint": str(checkpoint.path),
                "source_sha256": checkpoint.sha256,
                "pruning": checkpoint.pruning_summary,
                "files": files,
                "provider": report.context.get("provider"),
                "validation_passed": report.passed,
                "seconds": seconds,
                "notes": notes,
                "versions": library_versions(),
            },
        )
        report.raise_if_failed(f"ONNX parity check ({settings.variant})")
    return OnnxExportResult(
        out_dir=Path(out_dir),
        variant=settings.variant,
        model_file=Path(out_dir) / MODEL_FILE,
        files=files,
        provider=str(report.context.get("provider")),
        validation=report.to_dict(),
        seconds=seconds,
        notes=notes,
    )


@contextlib.contextmanager
def _quiet_export():
    """optimum and torch.onnx print tracer warnings for every traced branch; they are noise for our users."""
    with warnings.catch_warnings(), quiet_loggers("optimum", "torch.onnx", "transformers"):
        warnings.simplefilter("ignore")
        yield


def _export_with_optimum(checkpoint: CheckpointInfo, out: Path, settings: OnnxExportSettings, provider: Provider):
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise MissingDependencyError("optimum-onnx is not installed; run `pip install optimum-onnx`") from exc
    fp16 = settings.dtype is OnnxDType.FP16
    try:
        with _quiet_export(), contextlib.redirect_stdout(io.StringIO()):
            main_export(
                str(checkpoint.path),
                output=str(out),
                task="text-generation-with-past",
                opset=settings.opset,
                device="cuda" if fp16 else "cpu",
                dtype="fp16" if fp16 else None,
                do_validation=False,  # optimum only warns on a mismatch; our own check below fails the command
                # Its post-processing (sharing a tied LM head with the embedding) sizes the graph with ByteSize(),
                # which protobuf refuses above 2 GB; for large models `_normalize_layout` does that work instead.
                no_post_process=_is_large(checkpoint),
                local_files_only=True,
            )
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ExportError(f"optimum could not export {checkpoint.path}: {exc}") from exc
    if not (out / MODEL_FILE).is_file():
        raise ExportError(f"optimum wrote no {MODEL_FILE} for {checkpoint.path}")


def _is_large(checkpoint: CheckpointInfo) -> bool:
    """The checkpoint's weights pass the external-data threshold (its ONNX graph will too)."""
    return sum(f.stat().st_size for f in checkpoint.path.glob("*.safetensors")) > EXTERNAL_DATA_BYTES


def _graph_tensors(model) -> list:
    from onnx import AttributeProto

    tensors = list(model.graph.initializer)
    return tensors + [a.t for node in model.graph.node for a in node.attribute if a.type == AttributeProto.TENSOR]


def _tensor_payload(tensor, base_dir: Path) -> bytes | None:
    """A tensor's raw bytes wherever they are (a side file, or inline when 1 KiB or more); None to leave it inline."""
    from onnx import numpy_helper

    if tensor.data_location == tensor.EXTERNAL:
        return _external_bytes(tensor, base_dir)
    payload = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
    return payload if len(payload) >= 1024 and tensor.data_type != tensor.STRING else None


def _external_bytes(tensor, base_dir: Path) -> bytes:
    """The raw bytes of a tensor stored outside the graph."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    with open(base_dir / info["location"], "rb") as handle:
        handle.seek(int(info.get("offset", 0)))
        return handle.read(int(info["length"])) if "length" in info else handle.read()


def _gather_external_data(graph, model_path: Path) -> None:
    """Write every external tensor of `graph` (read from wherever it points now) into `<model>_data`, then the graph
    that points there, then remove the files it no longer uses. One tensor is held in memory at a time."""
    import onnx

    base_dir = model_path.parent
    data_name = model_path.name + "_data"
    tensors = _graph_tensors(graph)
    old_files = {entry.value for t in tensors for entry in t.external_data if entry.key == "location"}
    staged = base_dir / (data_name + ".tmp")
    with open(staged, "wb") as out:
        for tensor in tensors:
            payload = _tensor_payload(tensor, base_dir)
            if payload is None:
                continue
            offset = out.tell()
            out.write(payload)
            out.write(b"\0" * (-out.tell() % 64))  # aligned starts for memory-mapped loading
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            del tensor.external_data[:]
            tensor.data_location = tensor.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    os.replace(staged, base_dir / data_name)
    tmp = model_path.with_name(model_path.name + ".tmp")
    onnx.save_model(graph, str(tmp))
    os.replace(tmp, model_path)
    for name in old_files - {data_name, model_path.name}:
        stale = base_dir / name
        if stale.parent == base_dir and stale.is_file():
            stale.unlink()


def _share_tied_head(model, base_dir: Path) -> bool:
    """Replace an LM head weight that is the embedding transposed by a Transpose of the embedding (what optimum's
    post-processing does below 2 GB), so that the file holds the matrix once. Returns True if it did."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in initializers]
    heads = [n for n in model.graph.node if n.name in _lm_head_nodes(model) and n.input[1] in initializers]
    if len(gathers) != 1 or len(heads) != 1:
        return False
    embedding, head = initializers[gathers[0].input[0]], initializers[heads[0].input[1]]
    if list(head.dims) != list(reversed(embedding.dims)) or head.data_type != embedding.data_type:
        return False

    def values(tensor) -> np.ndarray:
        if tensor.data_location != tensor.EXTERNAL:
            return numpy_helper.to_array(tensor)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.frombuffer(_external_bytes(tensor, base_dir), dtype=dtype).reshape(tuple(tensor.dims))

    if not np.array_equal(values(head), values(embedding).T):
        return False
    shared = head.name + "_shared"
    model.graph.node.insert(0, helper.make_node("Transpose", [embedding.name], [shared], perm=[1, 0],
                                                name="slimllm_tied_lm_head"))
    heads[0].input[1] = shared
    model.graph.initializer.remove(head)
    return True


def _export_attention_free(checkpoint: CheckpointInfo, out: Path, settings: OnnxExportSettings) -> None:
    """Blocks without attention: trace the decoder ourselves, then copy what optimum would (config, tokenizer)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from slimllm.exporters.onnx_direct import export_decoder_directly

    fp16 = settings.dtype is OnnxDType.FP16
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint.path), dtype=torch.float16 if fp16 else torch.float32)
    model = model.to("cuda" if fp16 else "cpu").eval()
    try:
        with _quiet_export():
            export_decoder_directly(model, out / MODEL_FILE, settings.opset)
    except (RuntimeError, ValueError) as exc:
        raise ExportError(f"could not export {checkpoint.path} to ONNX: {exc}") from exc
    for file in checkpoint.path.iterdir():
        if file.is_file() and file.suffix not in (".safetensors", ".bin") and not file.name.startswith("slimllm_"):
            shutil.copy2(file, out / file.name)


def _build_with_genai(checkpoint: CheckpointInfo, out: Path, settings: OnnxExportSettings, provider: Provider):
    """Run onnxruntime-genai's model builder in a child process (it loads its own copy of the model)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "the genai engine needs onnxruntime-genai; install the `genai` extra (`pip install 'slimllm[genai]'`)"
        ) from exc
    precision = "int4" if settings.quant is OnnxQuant.INT4 else settings.dtype.value
    cache = out.parent / f".{out.name}.genai-cache"
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        str(checkpoint.path),
        "-o",
        str(out),
        "-p",
        precision,
        "-e",
        provider.value,
        "-c",
        str(cache),
    ]
    if settings.quant is OnnxQuant.INT4:
        # An 8-bit LM head, as in our own int4 exports. The builder's shared (tied) embedding cannot take a
        # different bit width than the layers (0.15.2 writes a dangling initializer), so the tie is not shared.
        command += [
            "--extra_options",
            f"int4_block_size={settings.block_size}",
            "matmul_mixed_precision=last_matmul:int8",
            "shared_embeddings=false",
        ]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if completed.returncode != 0 or not (out / MODEL_FILE).is_file():
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        raise ExportError(f"onnxruntime-genai's builder failed for {checkpoint.path}: {' | '.join(tail)}")
    # The builder copies tokenizer files; keep the config beside them so the directory documents itself.
    shutil.copy2(checkpoint.path / "config.json", out / "config.json")


def materialize_transposed_weights(model) -> list[str]:
    """Replace Transpose(initializer) feeding a MatMul by a transposed initializer; returns the new names.

    optimum shares a tied LM head with the embedding through a Transpose node. Weight quantizers only see MatMuls
    whose weight is an initializer, so without this the LM head, the largest matrix of small models, would stay
    in fp32.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    matmul_weights = {node.input[1] for node in model.graph.node if node.op_type == "MatMul"}
    created: list[str] = []
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in initializers or node.output[0] not in matmul_weights:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        values = numpy_helper.to_array(initializers[node.input[0]])
        transposed = np.ascontiguousarray(values.transpose(perm) if perm else values.T)
        model.graph.initializer.append(numpy_helper.from_array(transposed, name=node.output[0]))
        model.graph.node.remove(node)
        created.append(node.output[0])
    return created


EXTERNAL_DATA_BYTES = 1_800_000_000
"""Tensors above this many bytes in all go to a side file `<model>_data`: protobuf cannot serialize a message over
2 GB, which an fp32 model reaches at about 0.5B parameters. Kept below 2 GB for the graph itself and the headroom
quantizers add while they rewrite it."""


def tensor_bytes(model) -> int:
    """Bytes of every initializer of an in-memory ModelProto, without serializing it (which fails above 2 GB)."""
    return sum(len(tensor.raw_data) or tensor.ByteSize() for tensor in _graph_tensors(model))


def needs_external_data(model) -> bool:
    return tensor_bytes(model) > EXTERNAL_DATA_BYTES


def _save_onnx(model, path: Path) -> None:
    """Write `model` to `path` atomically, its tensors in `<name>_data` beside it when they are large."""
    import onnx

    tmp = path.with_name(path.name + ".tmp")
    data = path.with_name(path.name + "_data")
    if needs_external_data(model):
        # The side file's name is recorded inside the graph, so it is written under its final name; the graph file
        # that points at it is moved into place last.
        data.unlink(missing_ok=True)
        onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save_model(model, str(tmp))
        data.unlink(missing_ok=True)
    os.replace(tmp, path)


def _normalize_layout(model_path: Path, large: bool, tied: bool) -> None:
    """One layout whoever exported the file (optimum, or our own trace for blocks without attention), one tensor in
    memory at a time: above the threshold, the tensors torch wrote one file each (or inline) gathered into
    `model.onnx_data`, and a tied LM head stored once (what optimum's post-processing does below 2 GB)."""
    import onnx

    if not large and model_path.stat().st_size <= EXTERNAL_DATA_BYTES:
        return
    graph = onnx.load(str(model_path), load_external_data=False)
    if tied:
        _share_tied_head(graph, model_path.parent)
    _gather_external_data(graph, model_path)


def _lm_head_nodes(model) -> list[str]:
    """Names of the MatMul nodes that compute the logits (the LM head)."""
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and ("logits" in node.output or "lm_head" in node.name)
    ]


def _weight_only(
    model, bits: int, block_size: int, exclude: list[str], op_types: tuple[str, ...], accuracy_level: int | None
):
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise MissingDependencyError(
            f"onnxruntime's MatMulNBits quantizer could not be imported ({exc}); run `pip install onnx-ir`"
        ) from exc
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=True,
        nodes_to_exclude=exclude,
        op_types_to_quantize=op_types,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
        accuracy_level=accuracy_level,
    )
    quantizer.process()
    return quantizer.model.model


# The quantizer logs every node at INFO, and warns that it raises the opset for int4 (the parity check covers that).
@quiet_loggers("onnxruntime.quantization")
def _quantize(model_path: Path, settings: OnnxExportSettings, provider: Provider) -> list[str]:
    """Quantize `model_path` in place; returns notes for the report."""
    import onnx

    notes: list[str] = []
    model = onnx.load(str(model_path))
    materialized = materialize_transposed_weights(model)
    if materialized:
        notes.append(
            f"tied LM head stored as its own initializer ({', '.join(materialized)}) so that it is quantized too"
        )
    for stale in model_path.parent.glob(model_path.name + "_data"):
        stale.unlink()
    head = _lm_head_nodes(model)
    # On the CPU EP, accuracy level 4 lets MatMulNBits multiply with int8 activations: 8x faster decoding of
    # SmolLM2-135M at the same perplexity. The CUDA EP has its own kernels and ignores it.
    accuracy = 4 if provider is Provider.CPU else None
    if settings.quant is OnnxQuant.INT8_DYNAMIC:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        staged = model_path.with_name("model.fp32.onnx")
        quantized = model_path.with_name("model.int8.onnx")
        large = needs_external_data(model)
        _save_onnx(model, staged)
        del model
        # quantize_dynamic logs every tensor it skips through the root logger.
        try:
            with quiet_loggers("", level=logging.WARNING):
                quantize_dynamic(
                    str(staged),
                    str(quantized),
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                    # Only weight MatMuls: quantizing the attention score MatMuls (two activations) costs accuracy.
                    extra_options={"MatMulConstBOnly": True},
                    use_external_data_format=large,
                )
            # It names its side file `model.int8.onnx.data`; optimum (and our other exports) expect `model.onnx_data`.
            _save_onnx(onnx.load(str(quantized)), model_path)
        finally:
            for path in [*model_path.parent.glob("model.fp32.onnx*"), *model_path.parent.glob("model.int8.onnx*")]:
                path.unlink()
        notes.append(
            "int8 dynamic quantization: int8 weights (per channel) and int8 activations quantized per tensor at run "
            "time; LLMs with outlier activations lose much accuracy this way (use int8 weight-only instead)"
        )
    elif settings.quant is OnnxQuant.INT8:
        model = _weight_only(model, 8, settings.block_size, [], ("MatMul",), accuracy)
        _save_onnx(model, model_path)
        notes.append(
            f"int8 weight-only quantization of every MatMul, LM head included (MatMulNBits, block "
            f"{settings.block_size}); activations and the embedding stay in float"
        )
    else:
        # 4-bit layers and embedding, 8-bit LM head: the head is the most quantization-sensitive matrix (llama.cpp
        # keeps it at Q8_0/Q6_K for the same reason); at 4 bits it alone costs SmolLM2-135M ~15 % perplexity.
        model = _weight_only(model, 4, settings.block_size, head, ("MatMul", "Gather"), accuracy)
        if head:
            model = _weight_only(model, 8, settings.block_size, [], ("MatMul",), accuracy)
        _save_onnx(model, model_path)
        notes.append(
            f"int4 weight-only quantization of the layers' MatMuls (MatMulNBits) and the embedding "
            f"(GatherBlockQuantized), symmetric, block {settings.block_size}; LM head ({', '.join(head) or 'none'}) "
            f"at 8 bits; accuracy level {accuracy or 'default'}"
        )
    return notes


def validate_onnx(onnx_dir: Path, checkpoint_dir: Path, settings: OnnxExportSettings) -> ParityReport:
    """Every check for one export, against transformers on the checkpoint. Never raises on a failed figure."""
    onnx_dir = Path(onnx_dir)
    runner = OrtCausalLM(onnx_dir / MODEL_FILE, settings.provider)
    tolerance = settings.tolerance_on(runner.provider)
    reference = TorchReference.load(checkpoint_dir)
    tokenizer = reference.tokenizer
    report = ParityReport(
        artifact=str(onnx_dir / MODEL_FILE),
        context={
            "variant": settings.variant,
            "provider": runner.provider_used,
            "provider_requested": runner.provider.value,
            "provider_fallback": runner.fallback,
            "reference": "transformers, fp32, cpu",
            "tolerance": asdict(tolerance),
            "versions": library_versions(),
        },
    )
    if runner.fallback:
        report.warnings.append(f"onnxruntime fell back to {runner.provider_used}")
    pad_id = reference.pad_id

    if tolerance.max_abs_logits is not None:
        report.add(*_logits_checks(runner, reference, tokenizer, pad_id, settings, tolerance))
    if tolerance.max_ppl_ratio is not None:
        windows, source = eval_windows(tokenizer, settings.eval_data, settings.eval_seq_len, settings.eval_windows)
        reference_ppl = perplexity(reference.logits_fn(), windows)
        export_ppl = perplexity(runner.logits_fn(), windows)
        check = perplexity_check("perplexity", reference_ppl, export_ppl, tolerance.max_ppl_ratio)
        check.details.update({"data": source, "tokens": int(windows.numel()), "windows": int(windows.shape[0])})
        report.add(check)

    prompt_ids = hf_token_ids(tokenizer, PARITY_PROMPTS[0], True)
    expected = reference.greedy(prompt_ids, settings.generate_tokens)
    if settings.engine is OnnxEngine.GENAI:
        actual, runtime = _genai_greedy(onnx_dir, prompt_ids, settings.generate_tokens), "onnxruntime-genai"
    else:
        actual, runtime = runner.greedy(prompt_ids, settings.generate_tokens), "onnxruntime"
    greedy = tokens_check(
        f"greedy {settings.generate_tokens} tokens ({runtime})",
        expected,
        actual,
        text=tokenizer.decode(actual),
        reference_text=tokenizer.decode(expected),
    )
    if not tolerance.greedy_identical:
        greedy.passed = True
        greedy.metric = f"informational: {greedy.metric}"
    report.add(greedy)
    attention_free = attention_free_layers(reference.model.config)
    provider_used = runner.provider_used
    # optimum's session below is another copy of the export: free ours and the PyTorch reference first, so that
    # validation never holds more than two copies of the model (16.5 GiB instead of 12 for a 1B model in fp32).
    del runner, reference
    gc.collect()
    if settings.engine is OnnxEngine.OPTIMUM and not attention_free:
        report.add(_optimum_runtime_check(onnx_dir, prompt_ids, actual[:8], provider_used, pad_id))
    elif settings.engine is OnnxEngine.OPTIMUM:
        report.warnings.append("optimum's ORTModelForCausalLM assumes identical blocks; checked in onnxruntime only")
    return report


def _beyond_window_checks(runner, reference, tokenizer, settings, tolerance: Tolerance) -> list[CheckResult]:
    """For a model with a sliding attention window: logits on evaluation text well past it, where a graph that
    ignored the window (or applied it to the wrong layers) departs."""
    from slimllm.models.architectures import sliding_window

    window = sliding_window(reference.model.config)
    if window is None:
        return []
    windows, source = long_window(tokenizer, settings.eval_data, past_window_length(window))
    ids = windows.numpy().astype(np.int64)
    expected, _ = reference.forward(ids)
    actual, _ = runner.forward(ids)
    exact, _ = _exact(reference, tolerance, ids)
    check = _compare(f"logits at {ids.shape[1]} tokens (past the {window}-token window)", expected, actual,
                     tolerance, exact)
    check.details.update({"data": source, "window": window})
    return [check]


def _exact(reference, tolerance: Tolerance, *args, **kwargs) -> tuple[np.ndarray | None, Any]:
    """The reference computed in float64 on the same inputs, where the bound is derived from its fp32 error."""
    return reference.forward_exact(*args, **kwargs) if tolerance.noise_multiple else (None, None)


def _compare(name, expected, actual, tolerance: Tolerance, exact=None, mask=None) -> CheckResult:
    return compare_logits(name, expected, actual, tolerance.max_abs_logits, mask=mask,
                          relative=tolerance.relative_logits, exact=exact, noise_multiple=tolerance.noise_multiple)


def _logits_checks(runner, reference, tokenizer, pad_id, settings, tolerance: Tolerance) -> list[CheckResult]:
    checks: list[CheckResult] = []
    for index, prompt in enumerate(PARITY_PROMPTS):
        ids = np.array([hf_token_ids(tokenizer, prompt, True)], dtype=np.int64)
        expected, _ = reference.forward(ids)
        actual, _ = runner.forward(ids)
        exact, _ = _exact(reference, tolerance, ids)
        checks.append(_compare(f"prefill prompt {index}", expected, actual, tolerance, exact))

    checks.extend(_beyond_window_checks(runner, reference, tokenizer, settings, tolerance))
    padded = settings.engine is OnnxEngine.OPTIMUM
    if padded:
        ids, mask = left_padded_batch(tokenizer, PARITY_PROMPTS, pad_id)
    else:
        # genai graphs derive positions from the sequence length inside GroupQueryAttention and expect
        # onnxruntime-genai to manage padding, so a left-padded batch fed directly is not the same computation.
        ids = np.array([hf_token_ids(tokenizer, PARITY_PROMPTS[0], True)], dtype=np.int64)
        mask = np.ones_like(ids)
    expected, ref_past = reference.forward(ids, mask)
    actual, ort_past = runner.forward(ids, mask)
    exact, exact_past = _exact(reference, tolerance, ids, mask)
    if padded:
        checks.append(_compare(f"prefill padded batch of {len(PARITY_PROMPTS)}", expected, actual, tolerance, exact,
                               mask=mask))

    decode_deltas: list[CheckResult] = []
    for step in range(settings.decode_steps):
        next_tokens = expected[:, -1].argmax(-1)[:, None].astype(np.int64)  # both sides follow the reference
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=np.int64)], axis=1)
        expected, ref_past = reference.forward(next_tokens, mask, ref_past, past_length=mask.shape[1] - 1)
        actual, ort_past = runner.forward(next_tokens, mask, ort_past)
        exact, exact_past = _exact(reference, tolerance, next_tokens, mask, exact_past, past_length=mask.shape[1] - 1)
        decode_deltas.append(_compare(f"decode step {step + 1}", expected, actual, tolerance, exact))
    worst_decode = max(decode_deltas, key=lambda c: c.value if c.value is not None else float("inf"))
    checks.append(
        CheckResult(
            f"decode {settings.decode_steps} steps with KV cache ({'padded batch' if padded else 'one sequence'})",
            all(c.passed for c in decode_deltas),
            "max_abs_logits",
            worst_decode.value,
            worst_decode.bound,
            {"per_step": [c.value for c in decode_deltas], **worst_decode.details},
        )
    )
    return checks


def _genai_greedy(onnx_dir: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(model)
    total = len(prompt_ids) + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt_ids])
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(prompt_ids) :]]


def load_ort_causal_lm(onnx_dir: Path, provider: str = "CPUExecutionProvider"):
    """optimum's `ORTModelForCausalLM` for an export directory, with its KV-cache head size corrected.

    optimum-onnx sizes the empty KV cache from hidden_size / num_attention_heads for most architectures, which
    is wrong for configs with an explicit, different `head_dim` (Qwen3-0.6B and -4B): generation then fails on the
    first step (huggingface/optimum#2379). Loading through here sets the head size the graph actually has.
    """
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(str(onnx_dir), provider=provider)
    head_dim = getattr(model.config, "head_dim", None)
    if head_dim and getattr(model, "embed_size_per_head", head_dim) != head_dim:
        model.embed_size_per_head = int(head_dim)
    return model


def _optimum_runtime_check(
    onnx_dir: Path, prompt_ids: list[int], expected: list[int], provider: str, pad_id: int
) -> CheckResult:
    """The directory loads in optimum's ORTModelForCausalLM and generates what our own session generated."""
    import torch

    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise MissingDependencyError("optimum-onnx is not installed; run `pip install optimum-onnx`") from exc
    try:
        with _quiet_export():
            model = load_ort_causal_lm(onnx_dir, provider)
            input_ids = torch.tensor([prompt_ids])
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=len(expected),
                min_new_tokens=len(expected),
                pad_token_id=pad_id,
            )
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        return CheckResult("ORTModelForCausalLM load + generate", False, f"failed: {exc}", None, None)
    actual = output[0, len(prompt_ids) :].tolist()
    return tokens_check("ORTModelForCausalLM load + generate", expected, actual)
