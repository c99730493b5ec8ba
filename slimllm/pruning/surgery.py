"""Layer surgery: physically remove decoder layers and save a checkpoint that plain transformers loads.

    >>> pruned, report = remove_layers(model, [3, 12, 13])
    >>> save_pruned_checkpoint(pruned, tokenizer, Path("out/pruned"), record={"method": "shortgpt"})

After deleting layers the model must still generate with the KV cache and its config must still validate, so:
- `self_attn.layer_idx` is renumbered (the KV cache indexes layers by it; stale values raise IndexError);
- `config.num_hidden_layers` is set;
- every per-layer config list (`layer_types`, ...) is cut to the kept layers;
- index-range settings (`max_window_layers`) are replaced by an explicit per-layer list.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from slimllm.core.errors import UserInputError
from slimllm.models.architectures import architecture_for, decoder_layers, set_decoder_layers

log = logging.getLogger(__name__)

@dataclass
class SurgeryReport:
    original_num_layers: int
    kept_layers: list[int]
    removed_layers: list[int]
    notes: list[str] = field(default_factory=list)
    removed_kinds: dict[int, str] = field(default_factory=dict)
    """What each removed layer was, where the architecture distinguishes layers (Gemma 3: `local`, `global`)."""


def remove_layers(
    model: nn.Module, removed_layers: Iterable[int], inplace: bool = False
) -> tuple[nn.Module, SurgeryReport]:
    """Return the model without the given original layer indices. The input is left untouched unless `inplace`."""
    arch = architecture_for(model.config)
    num_layers = len(decoder_layers(model, arch))
    removed = sorted(set(int(i) for i in removed_layers))
    bad = [i for i in removed if not 0 <= i < num_layers]
    if bad:
        raise UserInputError(f"layer indices {bad} are out of range for a model with {num_layers} layers")
    if len(removed) >= num_layers:
        raise UserInputError(f"cannot remove all {num_layers} layers")
    if not inplace:
        model = copy.deepcopy(model)
    config = model.config
    kinds = {i: arch.describe_layer(config, i) for i in removed} if arch.describe_layer is not None else {}
    layers = decoder_layers(model, arch)
    kept = [i for i in range(num_layers) if i not in set(removed)]
    notes: list[str] = []

    if arch.derive_layer_types is not None and getattr(config, "layer_types", None) is None:
        config.layer_types = arch.derive_layer_types(config)
        notes.append("layer_types made explicit from the range settings before cutting")

    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(new_layers):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    set_decoder_layers(model, new_layers, arch)

    for name in arch.per_layer_config_fields:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == num_layers:
            setattr(config, name, [value[i] for i in kept])
    if arch.range_fields_from_layer_types is not None and getattr(config, "layer_types", None) is not None:
        for name, value in arch.range_fields_from_layer_types(config.layer_types).items():
            setattr(config, name, value)
    config.num_hidden_layers = len(kept)
    attention_free = getattr(config, "attention_free_layers", None)
    if attention_free:  # blocks without attention (2SSP) keep that property under their new index
        config.attention_free_layers = [kept.index(i) for i in attention_free if i in kept]
        if 0 in config.attention_free_layers:
            raise UserInputError(
                f"removing layers {removed} would leave a first block without attention (caches and llama.cpp read "
                "layer 0's); keep the first layer"
            )

    known = set(arch.per_layer_config_fields)
    for name, value in config.to_dict().items():
        if name not in known and isinstance(value, list) and len(value) == num_layers and num_layers > 1:
            notes.append(f"config field {name!r} has one entry per original layer but is not cut; check it")
            log.warning("config field %r looks per-layer but the registry does not list it", name)
    return model, SurgeryReport(num_layers, kept, removed, notes, kinds)


def describe_removal(removed: list[int], kinds: dict, compute: dict) -> str:
    """`layers [5, 11] (global, global); 11.1 % of the blocks' compute, 4.0 % with the LM head (per token at 512)`."""
    text = f"{removed}"
    if kinds:
        text += " (" + ", ".join(str(kinds.get(i, kinds.get(str(i), "?"))) for i in removed) + ")"
    if compute:
        text += (f"; {100 * compute['blocks']:.1f} % of the blocks' compute, {100 * compute['with_lm_head']:.1f} % "
                 f"with the LM head (per token at {compute['context']} context)")
    return text
