"""TOML recipes: one section per stage settings class; defaults < recipe < command-line flags.

    >>> recipe = load_recipe(Path("examples/recipes/smollm2-135m-cpu.toml"))
    >>> settings = build_settings(TrspSettings, recipe.get("trsp", {}), {"lambda1": 1e-2})

Unknown sections and keys are an error that lists every bad key at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimllm.core.settings import build_settings, read_toml, refuse_unknown_keys, unknown_keys


def recipe_sections() -> dict[str, type]:
    """Section name -> settings class: [compile], each compile stage's own section (each pruning method's right after
    [prune]), and [eval] (`slimllm eval`)."""
    from slimllm.evaluation.perplexity import EvalSettings
    from slimllm.pipeline.settings import CompileSettings
    from slimllm.pipeline.stages import stage_sections
    from slimllm.pruning.registry import method_settings_sections

    sections: dict[str, type] = {"compile": CompileSettings}
    for section, settings_class in stage_sections().items():
        sections[section] = settings_class
        if section == "prune":
            sections.update(method_settings_sections())
    return {**sections, "eval": EvalSettings}


def load_recipe(path: Path) -> dict[str, dict[str, Any]]:
    """A recipe's sections, every section and key checked against `recipe_sections()`."""
    path = Path(path)
    data = read_toml(path, "recipe")
    sections = recipe_sections()
    problems: list[str] = []
    for section, values in data.items():
        if section not in sections:
            problems.append(f"[{section}] (known sections: {', '.join(sections)})")
        elif not isinstance(values, dict):
            problems.append(f"{section} (must be a [{section}] table)")
        else:
            problems.extend(unknown_keys(values, sections[section], section))
    refuse_unknown_keys(problems, "recipe", path)
    return data


__all__ = ["build_settings", "load_recipe", "recipe_sections"]
