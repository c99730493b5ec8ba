"""ONNX export of a decoder whose blocks differ (blocks without attention), straight from the module.

    >>> export_decoder_directly(model, Path("out/onnx/model.onnx"), opset=17)

optimum and onnxruntime-genai assume identical blocks, so this writes the decoder out itself: the graph has
optimum's inputs and outputs (`input_ids`, `attention_mask`, `position_ids`, `past_key_values.{j}.key|value` →
`logits`, `present.{j}.key|value`), with one cache entry per block that *has* attention, numbered consecutively. The
same session code, parity checks and profiler that run optimum exports run these.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from slimllm.models.architectures import sliding_window
from slimllm.models.attention_free import attention_free_layers


class _DecoderForExport(nn.Module):
    """The model's forward with an explicit KV cache for the blocks with attention (eager attention, fp32 softmax)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.free = set(attention_free_layers(config))
        self.num_layers = int(config.num_hidden_layers)
        self.attention_layers = [i for i in range(self.num_layers) if i not in self.free]
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.window = sliding_window(config)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * self.num_layers
        self.sliding = [t == "sliding_attention" for t in layer_types]
        if self.window is not None and not any(self.sliding):  # Mistral: every layer uses the window
            self.sliding = [True] * self.num_layers

    def _bias(self, attention_mask: torch.Tensor, length: int, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        total = attention_mask.shape[1]
        key_positions = torch.arange(total, device=attention_mask.device)
        query_positions = key_positions[-length:]
        allowed = key_positions[None, :] <= query_positions[:, None]
        if window is not None:
            allowed = allowed & (key_positions[None, :] > query_positions[:, None] - window)
        allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
        return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))

    def _attention(self, layer: nn.Module, hidden: torch.Tensor, cos, sin, past_key, past_value, bias):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

        attention = layer.self_attn
        batch, length, _ = hidden.shape
        shape = (batch, length, -1, self.head_dim)
        query = attention.q_proj(hidden).view(shape)
        key = attention.k_proj(hidden).view(shape)
        value = attention.v_proj(hidden).view(shape).transpose(1, 2)
        if hasattr(attention, "q_norm"):  # Qwen3, Gemma 3: RMSNorm per head before the rotation
            query, key = attention.q_norm(query), attention.k_norm(key)
        query, key = apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        key = torch.cat([past_key, key], dim=2)
        value = torch.cat([past_value, value], dim=2)
        groups = self.heads // self.kv_heads
        scores = torch.matmul(query, repeat_kv(key, groups).transpose(2, 3)) * attention.scaling + bias
        weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        output = torch.matmul(weights, repeat_kv(value, groups)).transpose(1, 2).reshape(batch, length, -1)
        return attention.o_proj(output), key, value

    @staticmethod
    def _ffn(block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The block's FFN update: Llama-style (one norm before) or Gemma's sandwich (norms before and after)."""
        if hasattr(block, "pre_feedforward_layernorm"):
            return block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(hidden)))
        return block.mlp(block.post_attention_layernorm(hidden))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        decoder = self.model.model
        hidden = decoder.embed_tokens(input_ids)  # Gemma's embedding scales itself
        rotary = decoder.rotary_emb(hidden, position_ids)
        # Gemma 3: the local (sliding-window) layers rotate with their own base frequency.
        local = getattr(decoder, "rotary_emb_local", None)
        rotary_local = local(hidden, position_ids) if local is not None else rotary
        length = input_ids.shape[1]
        biases = {
            window: self._bias(attention_mask, length, window, hidden.dtype)
            for window in {self.window if s else None for s in self.sliding}
        }
        presents: list[torch.Tensor] = []
        slot = 0
        for index, layer in enumerate(decoder.layers):
            if index not in self.free:
                bias = biases[self.window if self.sliding[index] else None]
                cos, sin = rotary_local if self.sliding[index] else rotary
                out, key, value = self._attention(layer, layer.input_layernorm(hidden), cos, sin, past[2 * slot],
                                                  past[2 * slot + 1], bias)
                if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma normalizes the attention output too
                    out = layer.post_attention_layernorm(out)
                hidden = hidden + out
                presents += [key, value]
                slot += 1
            hidden = hidden + self._ffn(layer, hidden)
        logits = self.model.lm_head(decoder.norm(hidden))
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return (logits, *presents)


def export_decoder_directly(model: nn.Module, path: Path, opset: int | None = None) -> None:
    """Trace the decoder with a two-token cache and a three-token input; batch, sequence and cache lengths are
    dynamic, heads and head size static."""
    wrapper = _DecoderForExport(model).eval()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    batch, length, cached = 2, 3, 2
    input_ids = torch.ones((batch, length), dtype=torch.long, device=device)
    attention_mask = torch.ones((batch, cached + length), dtype=torch.long, device=device)
    position_ids = torch.arange(cached, cached + length, device=device).expand(batch, length)
    past = [torch.zeros((batch, wrapper.kv_heads, cached, wrapper.head_dim), dtype=dtype, device=device)
            for _ in range(2 * len(wrapper.attention_layers))]
    past_names = [f"past_key_values.{j}.{kind}" for j in range(len(wrapper.attention_layers))
                  for kind in ("key", "value")]
    present_names = [name.replace("past_key_values.", "present.") for name in past_names]
    dynamic_axes = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "logits": {0: "batch_size", 1: "sequence_length"},
        **{name: {0: "batch_size", 2: "past_sequence_length"} for name in past_names},
        **{name: {0: "batch_size", 2: "total_sequence_length"} for name in present_names},
    }
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (input_ids, attention_mask, position_ids, *past),
            str(path),
            input_names=["input_ids", "attention_mask", "position_ids", *past_names],
            output_names=["logits", *present_names],
            dynamic_axes=dynamic_axes,
            opset_version=opset or 17,
            do_constant_folding=True,
            dynamo=False,
        )
