"""Llama, Mistral, Qwen2, Qwen3 and Gemma 3 decoders in which some blocks have no attention (written by slimllm's 2SSP).

A block listed in `config.attention_free_layers` keeps only its FFN: x + mlp(post_attention_layernorm(x)) (Gemma 3:
x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))); it has no attention weights and no attention
norms, and never touches the KV cache (which keeps one slot per block, used only by the blocks with attention). The
first block always keeps its attention: caches read the sequence length there.

This file is self-contained (torch and transformers only): slimllm copies it into every checkpoint it writes with
such blocks, and `config.json`'s `auto_map` points at it, so plain transformers loads the checkpoint with

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


class AttentionFreeBlock(nn.Module):
    """A decoder block without attention: the residual stream passes through, then the block's FFN adds to it."""

    ffn_norms: tuple[str, ...] = ("post_attention_layernorm",)
    """The base layer's modules kept with the FFN: its input norm (and, for Gemma, its output norm)."""
    returns_tuple = False
    """The base architecture's model reads `layer(...)[0]`."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        layer_types = getattr(config, "layer_types", None)
        self.attention_type = layer_types[layer_idx] if layer_types else "full_attention"
        # The FFN and its norms are built by the base architecture's own decoder layer, then taken from it.
        self.mlp = None
        for name in self.ffn_norms:
            setattr(self, name, None)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return (hidden_states,) if self.returns_tuple else hidden_states


class GemmaAttentionFreeBlock(AttentionFreeBlock):
    """Gemma 3's block without attention: its FFN keeps both of its norms (before and after)."""

    ffn_norms = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    returns_tuple = True

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor]:
        update = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden_states)))
        return (hidden_states + update,)


def _check_attention_free_layers(layers, num_layers: int) -> list[int]:
    layers = sorted({int(i) for i in layers or ()})
    if any(not 0 < i < num_layers for i in layers):
        raise ValueError(f"attention_free_layers must lie in [1, {num_layers}) (block 0 keeps attention), got {layers}")
    return layers


def _drop_attention(model: nn.Module, config) -> None:
    """Replace the listed decoder layers by attention-free blocks that keep their FFN and its norms."""
    layers = model.model.layers
    for index in config.attention_free_layers:
        block = model.attention_free_block(config, index)
        block.mlp = layers[index].mlp
        for name in block.ffn_norms:
            setattr(block, name, getattr(layers[index], name))
        layers[index] = block


class _AttentionFreeConfig:
    """Adds `attention_free_layers` (block indices) to a base architecture's config."""

    def __init__(self, attention_free_layers=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.attention_free_layers = _check_attention_free_layers(attention_free_layers, self.num_hidden_layers)


class _AttentionFreeModel:
    """Builds the base architecture, then replaces the listed blocks by attention-free ones."""

    attention_free_block = AttentionFreeBlock

    def __init__(self, config) -> None:
        super().__init__(config)
        _drop_attention(self, config)


class SlimLlamaConfig(_AttentionFreeConfig, LlamaConfig):
    model_type = "slimllm_llama"


class SlimLlamaForCausalLM(_AttentionFreeModel, LlamaForCausalLM):
    config_class = SlimLlamaConfig


class SlimMistralConfig(_AttentionFreeConfig, MistralConfig):
    model_type = "slimllm_mistral"


class SlimMistralForCausalLM(_AttentionFreeModel, MistralForCausalLM):
    config_class = SlimMistralConfig


class SlimQwen2Config(_AttentionFreeConfig, Qwen2Config):
    model_type = "slimllm_qwen2"


class SlimQwen2ForCausalLM(_AttentionFreeModel, Qwen2ForCausalLM):
    config_class = SlimQwen2Config


class SlimQwen3Config(_AttentionFreeConfig, Qwen3Config):
    model_type = "slimllm_qwen3"


class SlimQwen3ForCausalLM(_AttentionFreeModel, Qwen3ForCausalLM):
    config_class = SlimQwen3Config


class SlimGemma3TextConfig(_AttentionFreeConfig, Gemma3TextConfig):
    model_type = "slimllm_gemma3_text"


class SlimGemma3ForCausalLM(_AttentionFreeModel, Gemma3ForCausalLM):
    config_class = SlimGemma3TextConfig
    attention_free_block = GemmaAttentionFreeBlock


ATTENTION_FREE_CLASSES = {
    "llama": (SlimLlamaConfig, SlimLlamaForCausalLM),
    "mistral": (SlimMistralConfig, SlimMistralForCausalLM),
    "qwen2": (SlimQwen2Config, SlimQwen2ForCausalLM),
    "qwen3": (SlimQwen3Config, SlimQwen3ForCausalLM),
    "gemma3_text": (SlimGemma3TextConfig, SlimGemma3ForCausalLM),
}
"""Base `model_type` -> (config class, model class) whose blocks may lack attention."""
