"""The architecture registry: the one place that knows per-architecture facts.

    >>> from slimllm.models.architectures import architecture_for
    >>> architecture_for(model.config).gguf_arch
    'llama'

Nothing outside this module tests an architecture's name. Every other module asks the registry where the decoder
layers live, which config fields hold one entry per layer and how the model is written to GGUF.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce

from torch import nn

from slimllm.core.errors import UserInputError


def _qwen_layer_types(config) -> list[str]:
    """Qwen2/Qwen3 semantics of `max_window_layers`: layers at index >= it use sliding-window attention."""
    sliding = getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None)
    max_window_layers = getattr(config, "max_window_layers", config.num_hidden_layers)
    return [
        "sliding_attention" if sliding and i >= max_window_layers else "full_attention"
        for i in range(config.num_hidden_layers)
    ]


def _qwen_range_fields(layer_types: list[str]) -> dict[str, int]:
    """`max_window_layers` that agrees with an explicit list, where the list has the full-then-sliding form."""
    leading_full = next((i for i, t in enumerate(layer_types) if t != "full_attention"), len(layer_types))
    if all(t != "full_attention" for t in layer_types[leading_full:]):
        return {"max_window_layers": leading_full}
    return {}


@dataclass(frozen=True)
class Architecture:
    """Facts about one decoder-only architecture family."""

    name: str
    """Registry key, also the name shown to users."""
    model_types: tuple[str, ...]
    """`config.model_type` values this entry covers (`slimllm_<name>`: the same decoder with some blocks lacking
    attention, `slimllm.models.attention_free`)."""
    gguf_arch: str
    """`general.architecture` value in GGUF files (llama.cpp's LLM_ARCH name)."""
    gguf_permute_qk: bool
    """llama.cpp expects Q/K rows permuted for its interleaved rope layout (true for the llama arch only)."""
    gguf_sliding_window: bool = False
    """llama.cpp's graph for `gguf_arch` honours a sliding attention window (written to the GGUF when set)."""
    layers_path: str = "model.layers"
    embed_tokens_path: str = "model.embed_tokens"
    final_norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    per_layer_config_fields: tuple[str, ...] = ()
    """Config fields holding one entry per decoder layer; layer surgery cuts them to the kept layers."""
    layer_range_config_fields: tuple[str, ...] = ()
    """Config fields that describe layers by index range; surgery replaces them by explicit per-layer lists."""
    derive_layer_types: Callable | None = field(default=None, compare=False)
    """Builds `layer_types` from the range fields when a config lacks the explicit list."""
    range_fields_from_layer_types: Callable | None = field(default=None, compare=False)
    """Recomputes the range fields from a (cut) `layer_types` list, where they can express it."""
    has_qk_norm: bool = False
    """Attention normalizes queries and keys per head (llama.cpp's deci graph, for blocks without attention, cannot)."""
    layer_returns_tuple: bool = False
    """transformers' decoder layer returns `(hidden_states, ...)` and the model reads `[0]` (Gemma 3 in 4.57); a
    module standing in for a layer must answer in the same form."""
    mlp_output_is_linear: bool = True
    """The MLP's down projection reaches the residual stream directly; Gemma normalizes it first, so a training-free
    repair folded into `down_proj` (lsq, comp) cannot apply and is not the default there."""
    gguf_norm_offset: float = 0.0
    """Added to every RMSNorm weight in GGUF files: Gemma computes x * (1 + w), llama.cpp x * w."""
    gguf_extra_keys: Callable | None = field(default=None, compare=False)
    """`config -> {key: value}`: architecture keys beyond the common shape ones (without the `<arch>.` prefix)."""
    describe_layer: Callable | None = field(default=None, compare=False)
    """`(config, index) -> str`: what a report says of one decoder layer beyond its index (e.g. `global`)."""


def _gemma3_gguf_keys(config) -> dict[str, object]:
    """Gemma 3's attention layout for llama.cpp: the window, which layers use it (explicit, since removing layers
    breaks the 5 local : 1 global rhythm llama.cpp assumes otherwise) and the local layers' rope base."""
    keys: dict[str, object] = {}
    window = getattr(config, "sliding_window", None)
    layer_types = list(getattr(config, "layer_types", None) or [])
    if window and "sliding_attention" in layer_types:
        keys["attention.sliding_window"] = int(window)
        keys["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in layer_types]
        keys["rope.freq_base_swa"] = float(getattr(config, "rope_local_base_freq", 10000.0))
    if getattr(config, "final_logit_softcapping", None):
        keys["final_logit_softcapping"] = float(config.final_logit_softcapping)
    return keys


def _gemma3_layer(config, index: int) -> str:
    layer_types = getattr(config, "layer_types", None) or []
    return "global" if index < len(layer_types) and layer_types[index] == "full_attention" else "local"


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        name="llama",
        model_types=("llama", "slimllm_llama"),
        gguf_arch="llama",
        gguf_permute_qk=True,
        per_layer_config_fields=("layer_types",),
    ),
    Architecture(
        name="mistral",
        model_types=("mistral", "slimllm_mistral"),
        # llama.cpp runs Mistral (v0.1-v0.3 style) through its llama graph.
        gguf_arch="llama",
        gguf_permute_qk=True,
        per_layer_config_fields=("layer_types",),
    ),
    Architecture(
        name="qwen2",
        model_types=("qwen2", "slimllm_qwen2"),
        gguf_arch="qwen2",
        gguf_permute_qk=False,
        per_layer_config_fields=("layer_types",),
        layer_range_config_fields=("max_window_layers",),
        derive_layer_types=_qwen_layer_types,
        range_fields_from_layer_types=_qwen_range_fields,
    ),
    Architecture(
        name="qwen3",
        model_types=("qwen3", "slimllm_qwen3"),
        gguf_arch="qwen3",
        gguf_permute_qk=False,
        per_layer_config_fields=("layer_types",),
        layer_range_config_fields=("max_window_layers",),
        derive_layer_types=_qwen_layer_types,
        range_fields_from_layer_types=_qwen_range_fields,
        has_qk_norm=True,
    ),
    Architecture(
        name="gemma3",
        model_types=("gemma3_text", "slimllm_gemma3_text"),
        gguf_arch="gemma3",
        gguf_permute_qk=False,
        gguf_sliding_window=True,
        per_layer_config_fields=("layer_types",),
        has_qk_norm=True,
        layer_returns_tuple=True,
        mlp_output_is_linear=False,
        gguf_norm_offset=1.0,
        gguf_extra_keys=_gemma3_gguf_keys,
        describe_layer=_gemma3_layer,
    ),
)

_BY_MODEL_TYPE = {model_type: arch for arch in ARCHITECTURES for model_type in arch.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def architecture_for(config) -> Architecture:
    """The registry entry for a transformers config; a clear user error for anything else."""
    model_type = getattr(config, "model_type", None)
    arch = _BY_MODEL_TYPE.get(model_type)
    if arch is None:
        raise UserInputError(
            f"model type {model_type!r} is not supported; slimllm handles decoder-only "
            f"{', '.join(supported_model_types())} models (Llama, Mistral, SmolLM, Qwen2, Qwen3, Gemma 3 text)"
        )
    return arch


def sliding_window(config) -> int | None:
    """The attention window of a config's sliding-window layers, or None where every layer sees the whole context.

    Mistral applies `sliding_window` whenever it is set; Qwen2/Qwen3 only with `use_sliding_window` (and then on the
    layers `layer_types` marks). A window at least as long as the model's context changes nothing.
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if "sliding_attention" not in layer_types:
            return None
    elif hasattr(config, "use_sliding_window") and not config.use_sliding_window:
        return None
    if window >= getattr(config, "max_position_embeddings", window + 1):
        return None
    return int(window)


def without_sliding_window(config):
    """A copy of `config` whose every layer attends to the whole context."""
    import copy

    config = copy.deepcopy(config)
    config.sliding_window = None
    if hasattr(config, "use_sliding_window"):
        config.use_sliding_window = False
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = ["full_attention"] * len(config.layer_types)
    return config


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return reduce(getattr, path.split("."), model)


def decoder_layers(model: nn.Module, arch: Architecture | None = None) -> nn.ModuleList:
    """The model's decoder layers, in order."""
    arch = arch or architecture_for(model.config)
    return get_submodule(model, arch.layers_path)


def set_decoder_layers(model: nn.Module, layers: nn.ModuleList, arch: Architecture | None = None) -> None:
    arch = arch or architecture_for(model.config)
    parent_path, _, attr = arch.layers_path.rpartition(".")
    parent = get_submodule(model, parent_path) if parent_path else model
    setattr(parent, attr, layers)
