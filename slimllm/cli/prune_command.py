"""`slimllm prune`: remove layers chosen by a registered method and save the checkpoint.

Its flags are generated from `PruneSettings` and from the settings class of every registered method.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slimllm.cli.app import (
    RESUME_HINT,
    ProgressBar,
    app,
    emit,
    pick_model,
    run_command,
    run_options,
)
from slimllm.cli.options import common_parameters, settings_command, settings_flags
from slimllm.core.errors import UserInputError
from slimllm.pruning.registry import method_settings_sections
from slimllm.pruning.stage import PruneSettings
from slimllm.pruning.surgery import describe_removal


def _flags():
    """[prune]'s flags, then each method's. A method field named like another method's field of the same type shares
    its flag (`--sparsity` sets 2SSP's and DReSS's; only the chosen method's section is read); a name [prune] holds
    gets the method as a prefix (`--trsp-...`)."""
    flags = settings_flags(PruneSettings, "prune", short={"remove": "-k"})
    own = [flag.flag for flag in flags]
    for section, cls in method_settings_sections().items():
        for flag in settings_flags(cls, section, taken=own):
            earlier = next((f for f in flags if f.flag == flag.flag), None)
            if earlier is not None and earlier.hint != flag.hint:
                flag = settings_flags(cls, section, include=[flag.field], taken=[flag.flag])[0]
            elif earlier is not None:
                flag = dataclasses.replace(flag, parameter=earlier.parameter)
            flags.append(flag)
    return flags


FLAGS = _flags()

FIXED = common_parameters(
    out_help="Output directory.",
    recipe_help="TOML recipe ([prune] and method tables); flags override it.",
    force_help="Replace output slimllm wrote earlier.",
    resume_help="Continue an interrupted TRSP or DReSS run from its last checkpoint.",
    dtype=True,
    placement=True,
)


def _prune(fixed: dict[str, Any], given: dict[str, dict[str, Any]]) -> None:
    def action() -> None:
        from slimllm.pipeline.recipes import load_recipe
        from slimllm.pruning.stage import resolve_prune_settings, run_prune

        if fixed["out"] is None:
            raise UserInputError("--out is required: the directory to write the pruned checkpoint to")
        names = {flag.field: flag.flag for flag in FLAGS}
        recipe = load_recipe(fixed["recipe"]) if fixed["recipe"] is not None else None
        settings, method_settings = resolve_prune_settings(recipe, given, names)
        bar = ProgressBar(settings.method.value)
        try:
            result = run_prune(
                pick_model(fixed["model"], fixed["model_option"]),
                settings,
                fixed["out"],
                progress=bar,
                method_settings=method_settings,
                **run_options(fixed),
            )
        finally:
            bar.close()
        emit(result.to_dict(), fixed["as_json"], _summary(result))

    run_command(fixed["debug"], action, resume_hint=RESUME_HINT)


def _summary(result) -> list[str]:
    fewer = 100 * (1 - result.params_after / result.params_before)
    removed = (
        f"{result.method}: {result.summary}"
        if result.summary
        else f"removed {len(result.removed_layers)} of {result.original_num_layers} layers with {result.method}: "
        f"{describe_removal(result.removed_layers, result.removed_kinds, result.compute_removed)}"
    )
    return [
        removed,
        f"parameters {result.params_before / 1e6:.1f}M -> {result.params_after / 1e6:.1f}M ({fewer:.1f}% fewer)",
        f"time {result.seconds:.1f} s (selection {result.selection_seconds:.1f} s)",
        f"wrote {result.out_dir}",
    ]


prune_command = settings_command(
    app,
    "prune",
    FIXED,
    FLAGS,
    _prune,
    "Prune layers (ShortGPT, TRSP, baselines) or FFN neurons and attention (2SSP, DReSS), repair what was removed, "
    "and save a checkpoint plain transformers loads.",
)
