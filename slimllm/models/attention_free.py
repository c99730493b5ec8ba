"""Models whose listed blocks have no attention: build them from a standard model, and load them in slimllm.

    >>> model = remove_attention(model, [5, 17])        # a SlimLlamaForCausalLM (or Mistral/Qwen2/Qwen3)
    >>> attention_free_layers(model.config)
    [5, 17]

The model classes live in `slimllm.models.modeling_slimllm`, a self-contained file that `save_pretrained` copies into
the checkpoint with an `auto_map`, so plain transformers loads it with `trust_remote_code=True`. Importing this module
registers the classes with transformers' Auto classes, so slimllm loads such checkpoints without that flag.
"""

from __future__ import annotations

import torch
from torch import nn

from slimllm.core.errors import UserInputError
from slimllm.models.modeling_slimllm import ATTENTION_FREE_CLASSES

MODEL_TYPE_PREFIX = "slimllm_"


def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    for config_class, model_class in ATTENTION_FREE_CLASSES.values():
        try:
            AutoConfig.register(config_class.model_type, config_class)
            AutoModelForCausalLM.register(config_class, model_class)
        except ValueError:  # already registered (a second import of this module under another name)
            pass
        config_class.register_for_auto_class()
        model_class.register_for_auto_class("AutoModelForCausalLM")


_register()


def read_config(location: str, **kwargs):
    """`AutoConfig.from_pretrained` with slimllm's attention-free model types known (every config read goes here)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(location, **kwargs)


def base_model_type(model_type: str) -> str:
    """`slimllm_llama` -> `llama`; any other model type is returned as is."""
    return model_type.removeprefix(MODEL_TYPE_PREFIX) if model_type.startswith(MODEL_TYPE_PREFIX) else model_type


def attention_free_layers(config) -> list[int]:
    """Indices of the blocks without attention (empty for a standard model)."""
    return list(getattr(config, "attention_free_layers", None) or [])


def remove_attention(model: nn.Module, layers: list[int]) -> nn.Module:
    """A model of the attention-free class for the model's architecture, without the attention (and input norm) of
    `layers` (with any it already lacked); every other weight is the model's own tensor, not a copy."""
    base = base_model_type(model.config.model_type)
    if base not in ATTENTION_FREE_CLASSES:
        raise UserInputError(f"blocks without attention are not supported for model type {model.config.model_type!r}")
    config_class, model_class = ATTENTION_FREE_CLASSES[base]
    num_layers = model.config.num_hidden_layers
    wanted = sorted(set(attention_free_layers(model.config)) | {int(i) for i in layers})
    if 0 in wanted:
        raise UserInputError("the first block's attention cannot be removed (caches and llama.cpp read it)")
    if any(not 0 < i < num_layers for i in wanted):
        raise UserInputError(f"attention indices {wanted} are out of range for {num_layers} blocks")
    values = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "attention_free_layers", "transformers_version"):
        values.pop(key, None)
    config = config_class(**values, attention_free_layers=wanted)
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        new = model_class(config)
    state = {k: v for k, v in model.state_dict(keep_vars=True).items() if k in new.state_dict()}
    new.load_state_dict(state, strict=True, assign=True)
    persistent = set(new.state_dict())
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary frequencies) are not in the state
        if name not in persistent and _has(new, name):
            owner, _, attr = name.rpartition(".")
            new.get_submodule(owner).register_buffer(attr, buffer, persistent=False)
    for module_name, module in model.named_modules():  # plain tensor attributes (rotary `original_inv_freq`)
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and _has(new, f"{module_name}.{attr}".lstrip(".")):
                target = new.get_submodule(module_name)
                if getattr(target, attr).is_meta:
                    setattr(target, attr, value)
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    new.generation_config = model.generation_config
    return new.train(model.training)


def _has(model: nn.Module, dotted: str) -> bool:
    owner, _, attr = dotted.rpartition(".")
    try:
        return hasattr(model.get_submodule(owner), attr)
    except AttributeError:
        return False

