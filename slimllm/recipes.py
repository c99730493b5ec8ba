"""TOML recipes: one section per stage settings class; defaults < recipe < command-line flags.

    >>> recipe = load_recipe(Path("examples/recipes/smollm2-135m-cpu.toml"))
    >>> settings = build_settings(TrspSettings, recipe.get("trsp", {}), {"lambda1": 1e-2})

Unknown sections and keys are an error that lists every bad key at once.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TypeVar

from slimllm.errors import UserInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def recipe_sections() -> dict[str, type]:
    from exporters.gguf import GgufExportSettings
    from exporters.onnx import OnnxExportSettings
    from slimllm.pipeline import CompileSettings
    from slimllm.pruning.stage import PruneSettings
    from slimllm.pruning.trsp import TrspSettings

    return {
        "compile": CompileSettings,
        "prune": PruneSettings,
        "trsp": TrspSettings,
        "onnx": OnnxExportSettings,
        "gguf": GgufExportSettings,
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


def build_settings(cls: type[T], recipe_values: dict[str, Any] | None, flags: dict[str, Any]) -> T:
    """Instantiate a settings class: its defaults, overridden by the recipe, overridden by flags that were given."""
    values = dict(recipe_values or {})
    values.update({key: value for key, value in flags.items() if value is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserInputError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"invalid {cls.__name__}: {exc}") from exc
