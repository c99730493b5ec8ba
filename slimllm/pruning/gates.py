"""Learnable per-layer gates, attached by wrapping decoder layers (transformers' source is left alone).

    >>> gates = attach_gates(model, GateMode.DELTA)     # one fp32 scalar per layer, initialised to 1.0
    >>> gates.switch_off(12)                           # layer 12 now passes its input through untouched
    >>> detach_gates(model)                            # original modules back, e.g. before save_pretrained

`delta` gate: x_{i+1} = x_i + g_i * (y_i - x_i); g_i = 0 is exactly "layer removed" (and the layer is not run).
`output` gate (the paper's form): x_{i+1} = g_i * y_i.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from slimllm.core.placement import execution_device
from slimllm.models.architectures import architecture_for, decoder_layers, set_decoder_layers
from slimllm.models.layer_io import layer_input_tensor, layer_output_tensor


class GateMode(str, Enum):
    DELTA = "delta"
    """x + g*(y - x): g = 0 removes the layer exactly."""
    OUTPUT = "output"
    """g*y, the paper's form: scales the whole block output, residual included."""


class GatedLayer(nn.Module):
    """A decoder layer with a scalar gate. Attribute lookups fall through to the wrapped layer."""

    def __init__(self, layer: nn.Module, mode: GateMode, returns_tuple: bool = False) -> None:
        super().__init__()
        self.layer = layer
        self.mode = mode
        self.returns_tuple = returns_tuple
        """The wrapped layer answers `(hidden_states, ...)`; a switched-off layer answers `(x,)` then."""
        # fp32 master value even when the model runs in bf16/fp16: small gate updates must not round away.
        self.gate = nn.Parameter(torch.ones((), dtype=torch.float32, device=execution_device(layer)))
        self.switched_off = False
        self.record_delta = False
        self.delta_norm = "l2"
        self.last_delta: torch.Tensor | None = None
        """Per-token ||y - x|| / ||x|| of the last forward when `record_delta` (the stage-2 regularizer)."""
        self.fixed_gate: float | None = None
        """When set, this value replaces the learned gate (used by the fade schedule)."""

    def forward(self, *args, **kwargs):
        x = layer_input_tensor(args, kwargs)
        if self.switched_off:
            return (x,) if self.returns_tuple else x
        output = self.layer(*args, **kwargs)
        y = layer_output_tensor(output)
        if self.record_delta:
            order = 1 if str(getattr(self.delta_norm, "value", self.delta_norm)) == "l1" else 2
            delta = (y - x).float().norm(p=order, dim=-1)
            self.last_delta = delta / x.float().norm(p=order, dim=-1).clamp_min(1e-6)
        if self.fixed_gate is None and not self.gate.requires_grad and bool(self.gate == 1.0):
            return output  # a frozen gate of 1 is the plain layer, bit for bit (x + (y - x) rounds)
        gate = self.gate if self.fixed_gate is None else torch.tensor(self.fixed_gate, device=y.device)
        gate = gate.to(y.dtype)
        gated = x + gate * (y - x) if self.mode is GateMode.DELTA else gate * y
        return (gated, *output[1:]) if isinstance(output, tuple) else gated

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # e.g. Qwen2's `attention_type`, read by the model's forward for every layer
            return getattr(self._modules["layer"], name)


@dataclass
class GateSet:
    """The gates attached to one model, indexed by original layer index."""

    layers: list[GatedLayer]
    mode: GateMode
    candidates: list[int] = field(default_factory=list)

    def parameters(self, indices: list[int] | None = None) -> list[nn.Parameter]:
        chosen = range(len(self.layers)) if indices is None else indices
        return [self.layers[i].gate for i in chosen]

    def values(self) -> list[float]:
        return [0.0 if g.switched_off else float(g.gate.detach()) for g in self.layers]

    def switch_off(self, index: int) -> None:
        layer = self.layers[index]
        layer.switched_off = True
        with torch.no_grad():
            layer.gate.zero_()
        layer.gate.requires_grad_(False)

    def switch_on(self, index: int, value: float = 1.0) -> None:
        layer = self.layers[index]
        layer.switched_off = False
        with torch.no_grad():
            layer.gate.fill_(value)

    def reset(self) -> None:
        """All layers on, every gate back to 1 and frozen, no fixed values, no delta recording."""
        for index, layer in enumerate(self.layers):
            self.switch_on(index)
            layer.gate.requires_grad_(False)
            layer.fixed_gate = None
            layer.record_delta = False
            layer.last_delta = None

    def set_gates(self, values: list[float]) -> None:
        with torch.no_grad():
            for layer, value in zip(self.layers, values, strict=True):
                layer.gate.fill_(value)


def attach_gates(model: nn.Module, mode: GateMode = GateMode.DELTA) -> GateSet:
    """Wrap every decoder layer of `model` in a `GatedLayer` (gates at 1.0: the model's function is unchanged)."""
    arch = architecture_for(model.config)
    layers = decoder_layers(model, arch)
    if any(isinstance(layer, GatedLayer) for layer in layers):
        raise RuntimeError("gates are already attached to this model")
    wrapped = [GatedLayer(layer, GateMode(mode), arch.layer_returns_tuple) for layer in layers]
    set_decoder_layers(model, nn.ModuleList(wrapped))
    return GateSet(wrapped, GateMode(mode))


def detach_gates(model: nn.Module) -> None:
    """Put the original decoder layers back (gate values are dropped; the model's state dict keys are restored)."""
    layers = decoder_layers(model)
    set_decoder_layers(
        model, nn.ModuleList([layer.layer if isinstance(layer, GatedLayer) else layer for layer in layers])
    )
