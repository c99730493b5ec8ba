"""Settings classes: building them from defaults, recipe values and flags, with every value type-checked.

    >>> build_settings(TrspSettings, {"lambda1": 0.1}, {"stage2_steps": 32}, section="[trsp]")

Each stage and method has one dataclass of settings; a field's annotation is its type, its default the default, and
the string literal under it its one-line description (`field_help`). Recipes and the command line both go through
`build_settings`, so a value of the wrong type is one clear error wherever it comes from.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from slimllm.core.errors import UserInputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's tables; a missing or malformed file is one clear error naming it as `what` ("recipe")."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} {path} does not exist; pass a TOML file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{what} {path} is not valid TOML ({exc})") from exc


def unknown_keys(values: dict[str, Any], cls: type, where: str) -> list[str]:
    """`where.key` for every key of `values` that is not a field of the settings class `cls`."""
    known = {f.name for f in dataclasses.fields(cls)}
    return [f"{where}.{key}" for key in values if key not in known]


def refuse_unknown_keys(problems: list[str], what: str, path: Path) -> None:
    """Every unknown key of a file at once, in one line."""
    if problems:
        raise UserInputError(f"{what} {path} has unknown keys: {', '.join(problems)}; check their spelling")


def build_settings(
    cls: type[T],
    recipe_values: dict[str, Any] | None,
    flags: dict[str, Any],
    section: str | None = None,
    flag_names: dict[str, str] | None = None,
) -> T:
    """Instantiate a settings class: its defaults, overridden by the recipe, overridden by flags that were given.

    Every value is checked against the field's annotation first; `section` (e.g. "[trsp]") names it in errors and
    `flag_names` maps a field to the flag that sets it (default `--field-name`)."""
    values = dict(recipe_values or {})
    values.update({key: value for key, value in flags.items() if value is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserInputError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    wrong = [(key, value) for key, value in values.items() if key in hints and not _accepts(hints[key], value)]
    for key, value in wrong:
        choices = _enum_of(hints[key])
        items = value if isinstance(value, (list, tuple)) else [value]
        if choices is not None and all(isinstance(item, str) for item in items):  # a misspelt choice
            bad = next(part for item in items for part in item.split(",") if not _accepts(choices, part.strip()))
            flag = (flag_names or {}).get(key, "--" + key.replace("_", "-"))
            raise UserInputError(f"unknown {flag} {bad!r}; use one of {', '.join(str(m.value) for m in choices)}")
    if wrong:
        problems = "; ".join(f"{key} must be {_describe(hints[key])}, got {value!r}" for key, value in wrong)
        raise UserInputError(f"invalid {section or cls.__name__} settings: {problems}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"invalid {cls.__name__}: {exc}") from exc


def _enum_of(hint: Any) -> type[Enum] | None:
    """The Enum a field takes (through Optional and list), or None."""
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint
    for arg in typing.get_args(hint):
        found = _enum_of(arg)
        if found is not None:
            return found
    return None


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
        values = {str(member.value) for member in hint}
        if isinstance(value, hint):
            return True
        parts = [part.strip() for part in value.split(",")] if isinstance(value, str) else [None]
        return all(part is not None and (part in values or part.lower() in values) for part in parts)
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


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description: the string literal written under it in the class body, whitespace-normalised."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def field_default(cls: type, name: str) -> Any:
    """The default of a settings field (its factory's value for mutable defaults)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None
