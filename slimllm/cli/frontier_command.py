"""`slimllm frontier`: the dense model through the quantization ladder and pruned variants through the same ladder,
measured alike on a target profile; the Pareto set per backend, and the best artifact for the given constraints.

Its flags are generated from `FrontierSettings`; `[frontier]`, `[prune]` and `[heal]` in a recipe configure it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from slimllm.cli.app import ProgressBar, app, emit, pick_model, run_command
from slimllm.cli.options import common_parameters, fixed_option, flag_names, settings_command, settings_flags
from slimllm.core.errors import UserInputError
from slimllm.frontier.settings import FrontierSettings

FLAGS = settings_flags(FrontierSettings, "frontier")

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help="Built-in profile (cpu-x86, cuda...) or a TOML path.")]
CheckpointOpt = Annotated[
    list[str] | None,
    typer.Option("--checkpoint", help="LABEL=DIR: a checkpoint of yours to measure as one more model (e.g. a "
                 "compile run's healed/ directory); repeatable.", show_default=False),
]

FIXED = [
    *common_parameters(
        out_help="Output directory: frontier.md/.html/.json, the charts, best/ and the work directory.",
        recipe_help="TOML recipe ([frontier], and [prune]/[heal] for the pruned variants); flags override it.",
        force_help="Write into a non-empty directory slimllm wrote earlier for something else.",
        dtype=False,
    ),
    fixed_option("profile", ProfileOpt, "cpu-x86"),
    fixed_option("checkpoint", CheckpointOpt),
]


def _extra(values: list[str] | None) -> dict[str, Path]:
    extra = {}
    for value in values or []:
        label, sep, path = value.partition("=")
        if not sep or not label or not Path(path).is_dir():
            raise UserInputError(f"--checkpoint {value!r}: give LABEL=DIR with DIR a checkpoint directory")
        extra[label] = Path(path)
    return extra


def _frontier(fixed: dict[str, Any], given: dict[str, dict[str, Any]]) -> None:
    def action() -> None:
        from slimllm.core.settings import build_settings
        from slimllm.frontier.run import run_frontier
        from slimllm.pipeline.recipes import load_recipe

        if fixed["out"] is None:
            raise UserInputError("--out is required: the directory to write the frontier to")
        sections = load_recipe(fixed["recipe"]) if fixed["recipe"] is not None else {}
        settings = build_settings(FrontierSettings, sections.get("frontier"), given.get("frontier", {}),
                                  "[frontier]", flag_names(FLAGS, "frontier"))
        bar = ProgressBar("frontier")
        try:
            result = run_frontier(pick_model(fixed["model"], fixed["model_option"]), settings, fixed["profile"],
                                  fixed["out"], sections, fixed["device"], fixed["force"], bar,
                                  _extra(fixed["checkpoint"]))
        finally:
            bar.close()
        lines = [result.choice.summary, f"frontier: {fixed['out']}/frontier.md, .html, .json and the charts"]
        for backend, axes in result.verdicts.items():
            on = [name for name, by in axes["decode"].items() if by is None]
            lines.append(f"  {backend}, decode speed against KLD: {', '.join(on)}")
        payload = {"choice": result.choice.to_dict(), "frontier": result.verdicts, "seconds": result.seconds,
                   "candidates": [r.to_dict() for r in result.results]}
        emit(payload, fixed["as_json"], lines)
        if settings.constraints() and result.choice.winner is None:
            from slimllm.frontier.run import NothingFitsError

            raise NothingFitsError(result.choice.summary + f" The frontier is in {fixed['out']}/frontier.md.")

    run_command(fixed["debug"], action)


frontier_command = settings_command(
    app,
    "frontier",
    FIXED,
    FLAGS,
    _frontier,
    "Which artifact to ship: the dense model through each quantization type and pruned variants through the same "
    "ladder, measured alike (KLD, perplexity, task accuracy, size, speed, memory) on a target profile; writes the "
    "Pareto set per backend, charts, and best/ for the constraints given.",
)
