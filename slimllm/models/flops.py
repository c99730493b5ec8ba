"""Forward FLOPs per token of a decoder-only model, and the ideal speedup of a pruned model over its dense one.

    >>> ideal_speedup(dense_config, pruned_config, phase="decode", context=64)
    1.27

Counts multiply-adds as 2 FLOPs. Per layer: the Q/K/V/O and MLP projections (2 x parameters) plus attention scores
and the weighted sum (4 x heads x head_dim x context). Outside the layers: the LM head (2 x vocab x hidden) for every
position whose logits are computed; the embedding lookup and the norms are negligible. A block without attention
(2SSP) costs only its MLP, and `intermediate` is the (pruned) FFN width every block shares. The LM head caps the
ideal speedup of any pruning below the ratio of the blocks' FLOPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    mlp_matrices: int = 3
    """Gated MLPs (SwiGLU: gate, up, down) have three matrices."""
    attention_free: int = 0
    """Blocks that have no attention (only their MLP)."""

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        heads = int(get("num_attention_heads"))
        return cls(
            layers=int(get("num_hidden_layers")),
            hidden=int(get("hidden_size")),
            intermediate=int(get("intermediate_size")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or int(get("hidden_size")) // heads),
            vocab=int(get("vocab_size")),
            attention_free=len(get("attention_free_layers") or []),
        )

    @property
    def attention_params(self) -> int:
        return self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o and k, v

    @property
    def mlp_params(self) -> int:
        return self.mlp_matrices * self.hidden * self.intermediate

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's projections with attention (norms and biases are negligible)."""
        return self.attention_params + self.mlp_params

    @property
    def attention_layers(self) -> int:
        return self.layers - self.attention_free

    def layer_flops(self, context: float) -> float:
        """One token through one layer with attention, attending to `context` positions (itself included)."""
        return 2 * self.layer_params + 4 * self.heads * self.head_dim * context

    def blocks_flops(self, context: float) -> float:
        """One token through every block: attention where a block has it, the MLP everywhere."""
        attention = 2 * self.attention_params + 4 * self.heads * self.head_dim * context
        return self.attention_layers * attention + self.layers * 2 * self.mlp_params

    @property
    def lm_head_flops(self) -> float:
        return 2 * self.vocab * self.hidden

    def decode_flops(self, context: float) -> float:
        """One generated token at a given context length."""
        return self.blocks_flops(context) + self.lm_head_flops

    def prefill_flops(self, prompt: int, logits_for_every_position: bool = False) -> float:
        """A prompt of `prompt` tokens in one pass (position t attends to t + 1 positions)."""
        attention_context = prompt * (prompt + 1) / 2  # sum over positions of the positions each one attends to
        attention = 2 * self.attention_params * prompt + 4 * self.heads * self.head_dim * attention_context
        layers = self.attention_layers * attention + self.layers * 2 * self.mlp_params * prompt
        heads = prompt if logits_for_every_position else 1
        return layers + heads * self.lm_head_flops

    def generation_flops(self, tokens: int, start_context: int = 0) -> float:
        """`tokens` single-token steps starting after `start_context` cached tokens (llama-bench's tg starts at 0)."""
        return sum(self.decode_flops(start_context + i + 1) for i in range(tokens))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"layer_params": self.layer_params, "attention_params": self.attention_params,
                               "mlp_params": self.mlp_params}


def ideal_speedup(
    dense: ModelShape,
    pruned: ModelShape,
    phase: str,
    length: int,
    logits_for_every_position: bool = False,
) -> float:
    """FLOPs(dense) / FLOPs(pruned) for a prefill of `length` tokens or a generation of `length` tokens."""
    if phase == "prefill":
        return dense.prefill_flops(length, logits_for_every_position) / pruned.prefill_flops(
            length, logits_for_every_position
        )
    if phase == "decode":
        return dense.generation_flops(length) / pruned.generation_flops(length)
    raise ValueError(f"unknown phase {phase!r}")
