"""Access to the raw residual stream at every decoder layer, without editing transformers' source.

    >>> trace = trace_decoder(model, input_ids)            # inputs of every layer + raw final output
    >>> logits = run_from_layer(model, trace, start=12, skip={12, 13})
    >>> stream_layers(model, blocks, batch_size=4, visit=lambda i, batch, x_in, x_out: ...)   # one block at a time

`output_hidden_states` is not enough for pruning scores: its last entry is taken after the final norm. Forward
hooks see the raw stream, and the keyword arguments each layer received (rotary embeddings, masks) so that a suffix
of the network can be re-run from any layer, which makes SLEB's greedy search about twice as cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from slimllm.core.device import autocast, autocast_dtype
from slimllm.core.placement import execution_device, input_device, weights_held
from slimllm.models.architectures import architecture_for, decoder_layers, get_submodule, set_decoder_layers


def layer_output_tensor(output) -> torch.Tensor:
    """Decoder layers return a tensor (transformers >= 4.56) or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, tuple) else output


def layer_input_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def decoder_base(model: nn.Module) -> nn.Module:
    """The module holding the decoder layers (`model.model` for Llama): it runs embeddings and layers but not the
    LM head, which scoring from hidden states does not need."""
    base_path = architecture_for(model.config).layers_path.rpartition(".")[0]
    return get_submodule(model, base_path) if base_path else model


@dataclass
class DecoderTrace:
    """One forward pass seen at every decoder layer."""

    layer_inputs: list[torch.Tensor]
    """x_i, the residual stream entering layer i (index by position in the current layer list)."""
    final_output: torch.Tensor
    """The raw residual stream after the last layer, before the final norm."""
    layer_kwargs: list[dict]
    """Keyword arguments each layer was called with (position embeddings, attention mask, ...)."""

    def stream(self, i: int) -> torch.Tensor:
        """x_i for i in 0..L, where x_L is the final output."""
        return self.final_output if i == len(self.layer_inputs) else self.layer_inputs[i]


@torch.no_grad()
def trace_decoder(model: nn.Module, input_ids: torch.Tensor, keep_kwargs: bool = False) -> DecoderTrace:
    """Run the model once and record the residual stream entering every layer and leaving the last one."""
    layers = decoder_layers(model)
    inputs: list[torch.Tensor | None] = [None] * len(layers)
    kwargs_seen: list[dict] = [{} for _ in layers]
    final: list[torch.Tensor] = []
    handles = []

    def make_pre_hook(i: int):
        def hook(module, args, kwargs):
            inputs[i] = layer_input_tensor(args, kwargs).detach()
            if keep_kwargs:
                kwargs_seen[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(make_pre_hook(i), with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(lambda m, a, out: final.append(layer_output_tensor(out).detach())))
    base = decoder_base(model)
    try:
        base(input_ids=input_ids, use_cache=False)  # the base model stops before the LM head, which we do not need
    finally:
        for handle in handles:
            handle.remove()
    assert all(x is not None for x in inputs) and final, "a decoder layer was not called"
    return DecoderTrace([x for x in inputs if x is not None], final[0], kwargs_seen)


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head on a raw residual stream."""
    arch = architecture_for(model.config)
    norm = get_submodule(model, arch.final_norm_path)
    head = get_submodule(model, arch.lm_head_path)
    return head(norm(hidden))


@torch.no_grad()
def run_from_layer(model: nn.Module, trace: DecoderTrace, start: int, skip: Iterable[int] = ()) -> torch.Tensor:
    """Logits when layers `start..L-1` minus `skip` run from x_start (as recorded in `trace`)."""
    layers = decoder_layers(model)
    skipped = set(skip)
    hidden = trace.layer_inputs[start] if start < len(layers) else trace.final_output
    for i in range(start, len(layers)):
        if i in skipped:
            continue
        hidden = layer_output_tensor(layers[i](hidden, **trace.layer_kwargs[i]))
    return lm_logits(model, hidden)


@contextlib.contextmanager
def layers_skipped(model: nn.Module, skipped: Iterable[int]) -> Iterator[list[int]]:
    """Temporarily run the model without some layers (no cache renumbering: only for use_cache=False passes).

    Yields the original indices of the layers that stay, in order.
    """
    layers = decoder_layers(model)
    skipped = set(skipped)
    kept = [i for i in range(len(layers)) if i not in skipped]
    set_decoder_layers(model, nn.ModuleList([layers[i] for i in kept]))
    try:
        yield kept
    finally:
        set_decoder_layers(model, layers)


@contextlib.contextmanager
def attention_skipped(model: nn.Module, layers: Iterable[int]) -> Iterator[None]:
    """Temporarily add nothing from the attention of some layers (the residual passes through), by position in the
    current layer list: what removing those attention modules computes."""

    def zero_output(_module, _args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    all_layers = decoder_layers(model)
    handles = [all_layers[i].self_attn.register_forward_hook(zero_output) for i in set(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _StopAtFirstLayer(Exception):
    """Ends the embedding pass once the first decoder layer's inputs are captured."""


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to_device(v, device) for v in value)
    return value


@torch.no_grad()
def first_layer_inputs(
    model: nn.Module, blocks: torch.Tensor, batch_size: int
) -> tuple[list[torch.Tensor], list[dict]]:
    """Per minibatch of `blocks`, the residual stream entering layer 0 (on the host) and the keyword arguments the
    layers are called with (rotary embeddings, mask): the embedding pass alone, no decoder layer runs."""
    layers = decoder_layers(model)
    base = decoder_base(model)
    embed_device = input_device(model)
    inputs: list[torch.Tensor] = []
    kwargs_seen: list[dict] = []

    def capture(_module, args, kwargs):
        inputs.append(layer_input_tensor(args, kwargs).detach().cpu())
        kwargs_seen.append(_to_device({k: v for k, v in kwargs.items() if k != "hidden_states"}, torch.device("cpu")))
        raise _StopAtFirstLayer

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for start in range(0, blocks.shape[0], batch_size):
            try:
                base(input_ids=blocks[start : start + batch_size].to(embed_device), use_cache=False)
            except _StopAtFirstLayer:
                pass
    finally:
        handle.remove()
    return inputs, kwargs_seen


LayerVisit = Callable[[int, int, torch.Tensor, torch.Tensor], None]
"""visit(layer index, minibatch index, x_in, x_out): one layer's input and raw output on one minibatch."""


@torch.no_grad()
def stream_layers(
    model: nn.Module,
    blocks: torch.Tensor,
    batch_size: int,
    visit: LayerVisit,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Run the calibration blocks through the decoder one layer at a time (the SparseGPT/Wanda pattern).

    Every minibatch goes through layer i before any goes through layer i+1, so only one layer's inputs and outputs
    exist at a time: the stream is kept on the host between layers and moved to each layer's own device when it
    runs (models spread by `device_map` work unchanged). Results equal a whole-model pass up to float summation
    order. Layers run in the model's compute dtype.
    """
    layers = decoder_layers(model)
    stream, layer_kwargs = first_layer_inputs(model, blocks, batch_size)
    dtype = autocast_dtype(model)
    for index, layer in enumerate(layers):
        device = execution_device(layer)
        with weights_held(layer):  # an offloaded layer is read once, not once per minibatch
            for batch, (hidden, kwargs) in enumerate(zip(stream, layer_kwargs, strict=True)):
                x_in = hidden.to(device)
                with autocast(device, dtype):
                    x_out = layer_output_tensor(layer(x_in, **_to_device(kwargs, device)))
                visit(index, batch, x_in, x_out)
                stream[batch] = x_out.detach().cpu()
        if progress:
            progress(index + 1, len(layers))
