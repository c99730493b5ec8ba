"""TOML recipes: one section per stage settings class; defaults < recipe < command-line flags.

    >>> recipe = load_recipe(Path("examples/recipes/smollm2-135m-cpu.toml"))
    >>> settings = build_settings(TrspSettings, recipe.get("trsp", {}), {"lambda1": 1e-2})

Unknown sections and keys are an error that lists every bad key at once.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from slimllm.errors import UserInputError
from slimllm.settings import build_settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

def recipe_sections() -> dict[str, type]:
    """Section name -> settings class: compile's, the prune stage's, each registered method's own, the exporters'."""
    from slimllm.compile_settings import CompileSettings
    from slimllm.evaluate import EvalSettings
    from slimllm.exporters.gguf import GgufExportSettings
    from slimllm.exporters.onnx import OnnxExportSettings
    from slimllm.healing import HealSettings
    from slimllm.pruning.registry import method_settings_sections
    from slimllm.pruning.settings import PruneSettings

    return {
        "compile": CompileSettings,
        "prune": PruneSettings,
        **method_settings_sections(),
        "heal": HealSettings,
        "onnx": OnnxExportSettings,
        "gguf": GgufExportSettings,
        "eval": EvalSettings,
    }


def load_recipe(path: Path) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"recipe {path} does not exist; pass a TOML file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"recipe {path} is not valid TOML ({exc})") from exc
    sections = recipe_sections()
    problems: list[str] = []
    for section, values in data.items():
        if section not in sections:
            problems.append(f"[{section}] (known sections: {', '.join(sections)})")
            continue
        if not isinstance(values, dict):
            problems.append(f"{section} (must be a [{section}] table)")
            continue
        known = {f.name for f in dataclasses.fields(sections[section])}
        problems.extend(f"{section}.{key}" for key in values if key not in known)
    if problems:
        raise UserInputError(f"recipe {path} has unknown keys: {', '.join(problems)}; check their spelling")
    return data


__all__ = ["build_settings", "load_recipe", "recipe_sections"]
