"""TOML recipes: one section per stage settings class; defaults < recipe < command-line flags.

    >>> recipe = load_recipe(Path("examples/recipes/smollm2-135m-cpu.toml"))
    >>> settings = build_settings(TrspSettings, recipe.get("trsp", {}), {"lambda1": 1e-2})

Unknown sections and keys are an error that lists every bad key at once.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from slimllm.errors import UserInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def recipe_sections() -> dict[str, type]:
    """Section name -> settings class: compile's, the prune stage's, each registered method's own, the exporters'."""
    from slimllm.exporters.gguf import GgufExportSettings
    from slimllm.exporters.onnx import OnnxExportSettings
    from slimllm.pipeline import CompileSettings
    from slimllm.pruning.registry import method_settings_sections
    from slimllm.pruning.stage import PruneSettings

    return {
        "compile": CompileSettings,
        "prune": PruneSettings,
        **method_settings_sections(),
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
    hints = typing.get_type_hints(cls)
    wrong = [
        f"{key} must be {_describe(hints[key])}, got {value!r}"
        for key, value in values.items()
        if key in hints and not _accepts(hints[key], value)
    ]
    if wrong:
        raise UserInputError(f"invalid {_section_name(cls)} settings: {'; '.join(wrong)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"invalid {cls.__name__}: {exc}") from exc


def _section_name(cls: type) -> str:
    names = {settings: name for name, settings in recipe_sections().items()}
    return f"[{names[cls]}]" if cls in names else cls.__name__


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a recipe or flag value fits a settings field's annotation (enums also take their string values)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        if isinstance(value, (list, tuple)):
            return all(_accepts(item, v) for v in value)
        return isinstance(item, type) and issubclass(item, Enum) and _accepts(item, value)  # one value for a list
    if isinstance(hint, type) and issubclass(hint, Enum):
        return isinstance(value, (hint, str))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, (str, Path))
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "none"
    if origin in (list, tuple):
        return f"a list of {_describe((typing.get_args(hint) or (Any,))[0])}"
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(str(m.value) for m in hint)
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}.get(
        hint, str(hint)
    )
