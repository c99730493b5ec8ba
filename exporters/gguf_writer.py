"""Write one GGUF file from a Hugging Face checkpoint with gguf-py, the way stock llama.cpp expects it.

    >>> write_gguf(inspect_checkpoint(Path("out/pruned")), Path("out/model-F16.gguf"), GgufType.F16)

Tensors are read one at a time from the safetensors files and spooled to disk by the writer, so memory stays
around one tensor even for large models. Architecture facts (GGUF arch name, whether Q/K need llama.cpp's rope
permutation) come from the registry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from slimllm.core.errors import ExportError
from slimllm.core.logs import quiet_loggers
from slimllm.exporters.checkpoint import CheckpointInfo
from slimllm.exporters.gguf_vocab import read_vocab


class GgufType(str, Enum):
    """Output types. The first five are written by gguf-py; K-quants are made by llama.cpp from an F32 file."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"
    Q6_K = "q6_k"
    Q5_K_M = "q5_k_m"
    Q5_K_S = "q5_k_s"
    Q4_K_M = "q4_k_m"
    Q4_K_S = "q4_k_s"
    Q3_K_M = "q3_k_m"
    Q2_K = "q2_k"

    @property
    def written_by_gguf_py(self) -> bool:
        return self in _DIRECT_TYPES

    @property
    def label(self) -> str:
        """How llama.cpp users spell the type in file names (Q4_K_M, F16)."""
        return self.value.upper()


DECI_ARCH = "deci"
"""llama.cpp's architecture for decoders whose blocks differ (per-layer head counts; 0 heads: no attention)."""

_DIRECT_TYPES = (GgufType.F32, GgufType.F16, GgufType.BF16, GgufType.Q8_0, GgufType.Q4_0)


def llama_file_type(outtype: GgufType) -> int:
    """`general.file_type` / llama.cpp's `llama_ftype` value of an output type."""
    import gguf

    names = {
        GgufType.F32: "ALL_F32",
        GgufType.F16: "MOSTLY_F16",
        GgufType.BF16: "MOSTLY_BF16",
        GgufType.Q8_0: "MOSTLY_Q8_0",
        GgufType.Q4_0: "MOSTLY_Q4_0",
        GgufType.Q6_K: "MOSTLY_Q6_K",
        GgufType.Q5_K_M: "MOSTLY_Q5_K_M",
        GgufType.Q5_K_S: "MOSTLY_Q5_K_S",
        GgufType.Q4_K_M: "MOSTLY_Q4_K_M",
        GgufType.Q4_K_S: "MOSTLY_Q4_K_S",
        GgufType.Q3_K_M: "MOSTLY_Q3_K_M",
        GgufType.Q2_K: "MOSTLY_Q2_K",
    }
    return int(gguf.LlamaFileType[names[outtype]])


def permute_for_llama_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder Q/K projection rows from transformers' rotate-half layout to llama.cpp's interleaved pairs.

    transformers rotates dimension i with i + d/2 inside each head; llama.cpp's llama graph rotates 2i with 2i+1.
    Without this, the file loads and runs but attention is scrambled (argmax agreement drops to ~13 %).
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    if head_dim * n_heads != rows or head_dim % 2:
        raise ExportError(f"cannot split {rows} Q/K rows into {n_heads} heads of even size")
    half = head_dim // 2
    within_head = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
    order = (np.arange(n_heads)[:, None] * head_dim + within_head[None, :]).reshape(-1)
    return weight[order]


def llama3_rope_factors(config) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1-style rope scaling, stored as llama.cpp's `rope_freqs` tensor."""
    scaling = config.rope_scaling
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    base = float(config.rope_theta)
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (i / head_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1.0 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@dataclass(frozen=True)
class RopeSettings:
    scaling_type: str
    factor: float | None = None
    original_context: int | None = None


def rope_settings(config) -> RopeSettings:
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return RopeSettings("none")
    if kind == "linear":
        return RopeSettings("linear", float(scaling["factor"]))
    if kind == "llama3":
        return RopeSettings("llama3", float(scaling["factor"]), int(scaling.get("original_max_position_embeddings", 0)))
    raise ExportError(
        f"rope scaling {kind!r} is not supported by the GGUF writer (supported: none, linear, llama3); "
        "export to ONNX instead"
    )


def _iter_checkpoint_tensors(checkpoint_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, fp32 array) for every tensor of the checkpoint, one file and one tensor at a time."""
    from safetensors import safe_open

    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise ExportError(f"{checkpoint_dir} has no safetensors files; save the checkpoint with safe_serialization")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).float().numpy()


def _tensor_type(gguf, name: str, array: np.ndarray, outtype: GgufType, tied: bool):
    """GGML type of one tensor in a file of `outtype` (None: keep fp32)."""
    q = gguf.GGMLQuantizationType
    if array.ndim < 2 or name.endswith(".bias") or outtype is GgufType.F32:
        return q.F32
    if outtype is GgufType.F16:
        return q.F16
    if outtype is GgufType.BF16:
        return q.BF16
    wanted = q.Q8_0 if outtype is GgufType.Q8_0 else q.Q4_0
    # The output projection (the tied embedding too) is the most quantization-sensitive matrix; llama.cpp's own
    # quantizer keeps it at 6 bits in Q4_0 files. We keep it at Q8_0.
    if wanted is q.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        wanted = q.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if array.shape[-1] % block == 0 else q.F16  # rows that do not split into blocks stay F16


def _add_hyperparameters(writer, checkpoint: CheckpointInfo, outtype: GgufType, head_dim: int, n_kv_heads: int,
                         rope, attention_free: list[int]) -> None:
    """The model's shape, rope, norm and file-type keys, and slimllm's pruning record. With `attention_free`
    blocks (the `deci` architecture) the head counts and FFN widths are per-layer arrays, 0 heads marking a block
    without attention."""
    import gguf

    config = checkpoint.config
    n_layers = int(config.num_hidden_layers)
    writer.add_name(checkpoint.path.name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(n_layers)
    if attention_free:
        free = set(attention_free)
        writer.add_feed_forward_length([int(config.intermediate_size)] * n_layers)
        writer.add_head_count([0 if i in free else int(config.num_attention_heads) for i in range(n_layers)])
        writer.add_head_count_kv([0 if i in free else n_kv_heads for i in range(n_layers)])
    else:
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(config.num_attention_heads))
        writer.add_head_count_kv(n_kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(llama_file_type(outtype))
    if rope.scaling_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)
    if checkpoint.architecture.gguf_extra_keys is not None and not attention_free:
        _add_architecture_keys(writer, checkpoint.architecture.gguf_extra_keys(config))
    _add_pruning_metadata(writer, checkpoint)


def _add_architecture_keys(writer, keys: dict) -> None:
    """`<arch>.<key>` entries, typed as llama.cpp reads them: uint32, float32 or an array (of bools)."""
    for key, value in keys.items():
        name = f"{writer.arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(name, value)
        elif isinstance(value, int):
            writer.add_uint32(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
        else:
            writer.add_array(name, list(value))


@quiet_loggers("gguf", level=logging.WARNING)  # gguf-py logs every file it writes at INFO
def write_gguf(
    checkpoint: CheckpointInfo,
    path: Path,
    outtype: GgufType,
    *,
    permute_qk: bool | None = None,
) -> dict:
    """Write `checkpoint` as one GGUF file of `outtype` (a type gguf-py writes). Returns a small summary.

    `permute_qk` overrides the registry's rope permutation; only tests turn it off, to show that the parity check
    catches a file written without it.
    """
    import gguf

    from slimllm.models.attention_free import attention_free_layers

    if not outtype.written_by_gguf_py:
        raise ValueError(f"{outtype.value} is made by llama.cpp's quantizer, not written directly")
    config = checkpoint.config
    arch = checkpoint.architecture
    attention_free = attention_free_layers(config)
    # Blocks without attention exist only in llama.cpp's `deci` graph (llama's rope layout, per-layer head counts).
    gguf_arch = DECI_ARCH if attention_free else arch.gguf_arch
    model_arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == gguf_arch), None)
    if model_arch is None:
        raise ExportError(f"gguf-py does not know the {gguf_arch!r} architecture; upgrade the gguf package")
    n_layers = int(config.num_hidden_layers)
    n_heads = int(config.num_attention_heads)
    n_kv_heads = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    n_vocab = int(config.vocab_size)
    permute = (arch.gguf_permute_qk or bool(attention_free)) if permute_qk is None else permute_qk
    rope = rope_settings(config)
    tied = checkpoint.tied_embeddings

    writer = gguf.GGUFWriter(str(path), gguf_arch, use_temp_file=True)
    _add_hyperparameters(writer, checkpoint, outtype, head_dim, n_kv_heads, rope, attention_free)
    vocab = read_vocab(checkpoint.path, n_vocab)
    vocab.add_to(writer)

    name_map = gguf.get_tensor_name_map(model_arch, n_layers)
    written: dict[str, str] = {}
    if rope.scaling_type == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
        written["rope_freqs.weight"] = "F32"
    for hf_name, array in _iter_checkpoint_tensors(checkpoint.path):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from the rope keys
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd.weight when output.weight is absent
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name!r} of the {gguf_arch} architecture")
        if arch.gguf_norm_offset and hf_name.endswith("norm.weight"):
            array = array + np.float32(arch.gguf_norm_offset)
        if permute and (".attn_q." in name or ".attn_k." in name):
            array = permute_for_llama_rope(array, n_heads if ".attn_q." in name else n_kv_heads)
        ggml_type = _tensor_type(gguf, name, array, outtype, tied)
        if ggml_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        elif ggml_type == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), ggml_type)
            writer.add_tensor(name, data, raw_dtype=ggml_type)
        written[name] = ggml_type.name
    expected_blocks = {f"blk.{i}." for i in range(n_layers)}
    missing = sorted(b for b in expected_blocks if not any(n.startswith(b) for n in written))
    if missing or "token_embd.weight" not in written:
        raise ExportError(f"checkpoint {checkpoint.path} is missing tensors for {missing or ['token_embd']}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": len(written), "types": sorted(set(written.values())), "rope_permuted": permute,
            "architecture": gguf_arch}


def _add_pruning_metadata(writer, checkpoint: CheckpointInfo) -> None:
    """`general.*` keys saying the model was pruned by slimllm, with the original layer count and removed layers."""
    pruning = checkpoint.pruning_summary
    if not pruning:
        writer.add_description("Exported by slimllm (no layers removed).")
        return
    removed = [int(i) for i in pruning.get("removed_layers") or []]
    original = int(pruning.get("original_num_layers") or checkpoint.num_layers + len(removed))
    what = pruning.get("summary") or (
        f"{len(removed)} of {original} transformer layers removed (original indices {removed})"
    )
    writer.add_description(f"Pruned by slimllm ({pruning.get('method')}): {what}.")
    writer.add_string("general.slimllm.method", str(pruning.get("method")))
    writer.add_uint32("general.slimllm.original_block_count", original)
    writer.add_array("general.slimllm.removed_layers", removed)
    if pruning.get("source_model"):
        writer.add_string("general.slimllm.source_model", str(pruning["source_model"]))


def quantize_with_llama_cpp(source: Path, target: Path, outtype: GgufType, threads: int | None = None) -> None:
    """Make a K-quant file from an F32/F16 GGUF with llama.cpp's own quantizer (`llama_model_quantize`)."""
    import ctypes
    import os

    from slimllm.exporters.llama_cpp_runner import _quiet_native_stderr, import_llama_cpp

    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_file_type(outtype)
    params.nthread = threads or os.cpu_count() or 1
    with _quiet_native_stderr():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.is_file():
        raise ExportError(f"llama.cpp could not quantize {source.name} to {outtype.label} (status {status})")
