"""`slimllm heal`: train a pruned checkpoint back towards its dense model (CE + W·KL), on a token budget.

Its flags are generated from `HealSettings`.
"""

from __future__ import annotations

from typing import Any

from slimllm.cli.app import ProgressBar, app, emit, pick_model, run_command, run_options
from slimllm.cli.options import common_parameters, flag_names, settings_command, settings_flags
from slimllm.core.errors import UserInputError
from slimllm.recovery.healing import HealSettings

FLAGS = settings_flags(HealSettings, "heal")

FIXED = common_parameters(
    out_help="Output directory for the healed checkpoint.",
    recipe_help="TOML recipe ([heal] table); flags override it.",
    force_help="Replace output slimllm wrote earlier.",
    resume_help="Continue an interrupted healing run from its last checkpoint.",
    dtype=True,
    model_name="checkpoint",
    placement=True,
)

RESUME_HINT = "rerun the same command with --resume to continue from the last saved step"


def heal_settings(recipe, given: dict[str, dict[str, Any]]) -> HealSettings:
    """Class defaults < the recipe's [heal] table < flags given."""
    from slimllm.core.settings import build_settings
    from slimllm.pipeline.recipes import load_recipe

    sections = load_recipe(recipe) if recipe is not None else {}
    return build_settings(HealSettings, sections.get("heal"), given.get("heal", {}), "[heal]",
                          flag_names(FLAGS, "heal"))


def _heal(fixed: dict[str, Any], given: dict[str, dict[str, Any]]) -> None:
    def action() -> None:
        from slimllm.recovery.healing import run_heal

        if fixed["out"] is None:
            raise UserInputError("--out is required: the directory to write the healed checkpoint to")
        if fixed["checkpoint"] is None and fixed["model_option"] is None:
            raise UserInputError("pass the checkpoint to heal (the directory `slimllm prune` wrote)")
        settings = heal_settings(fixed["recipe"], given)
        bar = ProgressBar("heal")
        try:
            result = run_heal(
                pick_model(fixed["checkpoint"], fixed["model_option"]),
                settings,
                fixed["out"],
                progress=bar,
                **run_options(fixed),
            )
        finally:
            bar.close()
        lines = [
            f"healed ({result.scope}) with {result.tokens:,} tokens in {result.steps} steps, "
            f"{result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s)",
            f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}"
            + (f", KL to teacher {result.kl[0]:.4f} -> {result.kl[-1]:.4f}" if result.kl else ""),
            f"wrote {result.out_dir}",
        ]
        emit(result.to_dict(), fixed["as_json"], lines)

    run_command(fixed["debug"], action, resume_hint=RESUME_HINT)


heal_command = settings_command(
    app,
    "heal",
    FIXED,
    FLAGS,
    _heal,
    "Heal a pruned checkpoint by training it towards the dense model (CE + W x KL) on a token budget; "
    "saves a plain checkpoint (LoRA adapters merged).",
)
