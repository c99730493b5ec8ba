"""Command-line flags generated from settings classes: a field's name, type, default, choices and description become
its flag, so adding a field adds its flag, its recipe key and its help at once.

    >>> flags = settings_flags(TrspSettings, "trsp")            # --lambda1, --stage2, ... (one per field)
    >>> command = settings_command(app, "prune", fixed_parameters, flags, body)

Every generated flag defaults to None, meaning "not given": the value then comes from the recipe or the class
default (shown in the help), so a recipe value is never overridden by a flag's default.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from slimllm.core.settings import field_default, field_docs


@dataclass(frozen=True)
class SettingsFlag:
    """One generated flag: which settings field of which section it sets."""

    section: str
    """The recipe section / settings group (`prune`, `trsp`, `onnx` ...)."""
    field: str
    flag: str
    """The flag as typed, e.g. `--lambda1`."""
    cls: type
    parameter: str
    """The Python parameter name the command receives it under (unique within the command)."""
    short: str | None = None
    """A one-letter alias, e.g. `-k` for `--remove`."""
    extra_help: str = ""
    """Said after the field's own description (what this command adds to it)."""
    shown_default: str | None = None
    """The default this command uses where it is not the class default (e.g. compile's GGUF types)."""

    @property
    def hint(self) -> Any:
        return typing.get_type_hints(self.cls)[self.field]


def settings_flags(
    cls: type,
    section: str,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    rename: dict[str, str] | None = None,
    taken: Iterable[str] = (),
    short: dict[str, str] | None = None,
    extra_help: dict[str, str] | None = None,
    defaults: dict[str, str] | None = None,
) -> list[SettingsFlag]:
    """One flag per field of `cls` (or of `include`, in that order), named `--field-name` unless `rename`d.

    A flag whose name is already `taken` (by another section of the same command) gets the section as a prefix.
    """
    names = list(include) if include is not None else [f.name for f in dataclasses.fields(cls)]
    rename, taken = rename or {}, set(taken)
    flags = []
    for name in names:
        if name in exclude:
            continue
        flag = rename.get(name) or "--" + name.replace("_", "-")
        if flag in taken:
            flag = f"--{section}-{flag[2:]}"
        parameter = f"{section}__{name}"
        if not parameter.isidentifier():  # a section named like a number (`2ssp`)
            parameter = "_" + parameter
        flags.append(
            SettingsFlag(
                section,
                name,
                flag,
                cls,
                parameter,
                (short or {}).get(name),
                (extra_help or {}).get(name, ""),
                (defaults or {}).get(name),
            )
        )
        taken.add(flag)
    return flags


def _flag_type(hint: Any) -> tuple[Any, str | None]:
    """The type typer parses the flag as, and the choices to list in its help (for enums)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if typing.get_origin(hint) in (list, tuple):
        item, choices = _flag_type((typing.get_args(hint) or (str,))[0])
        return list[str], choices
    if isinstance(hint, type) and issubclass(hint, Enum):
        return str, ", ".join(str(m.value) for m in hint)
    if hint in (int, float, bool, str, Path):
        return hint, None
    return str, None


def _help(flag: SettingsFlag) -> str:
    text = " ".join(part for part in (field_docs(flag.cls).get(flag.field, ""), flag.extra_help) if part)
    _, choices = _flag_type(flag.hint)
    words = set(re.findall(r"[\w-]+", text))
    if choices and not all(choice in words for choice in choices.split(", ")):
        text = f"{text} One of: {choices}.".strip()
    default = flag.shown_default if flag.shown_default is not None else field_default(flag.cls, flag.field)
    if default is not None and default != [] and not isinstance(default, bool):
        shown = ",".join(str(getattr(v, "value", v)) for v in default) if isinstance(default, list) else (
            getattr(default, "value", default)
        )
        text = f"{text} [default: {shown}]"
    return text


def flag_parameter(flag: SettingsFlag) -> inspect.Parameter:
    """The typer parameter of a generated flag (default None: not given)."""
    kind, _ = _flag_type(flag.hint)
    declarations = [flag.flag] + ([flag.short] if flag.short else [])
    if kind is bool:
        declarations = [f"{flag.flag}/--no-{flag.flag[2:]}"]
    option = typer.Option(*declarations, help=_help(flag), show_default=False)
    return inspect.Parameter(
        flag.parameter, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
    )


def shared_flag_parameters(flags: Iterable[SettingsFlag]) -> list[inspect.Parameter]:
    """One typer parameter per distinct parameter name; a flag several sections share lists each one's meaning."""
    groups: dict[str, list[SettingsFlag]] = {}
    for flag in flags:
        groups.setdefault(flag.parameter, []).append(flag)
    parameters = []
    for group in groups.values():
        parameter = flag_parameter(group[0])
        if len(group) > 1:
            text = " ".join(f"[{flag.section}] {_help(flag)}" for flag in group)
            option = typing.get_args(parameter.annotation)[1]
            option.help = text
        parameters.append(parameter)
    return parameters


def given_values(flags: Iterable[SettingsFlag], values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The flags actually given, as {section: {field: value}} (flags left out are absent, not None)."""
    sections: dict[str, dict[str, Any]] = {}
    for flag in flags:
        value = values.get(flag.parameter)
        if value is not None and value != []:
            sections.setdefault(flag.section, {})[flag.field] = value
    return sections


def flag_names(flags: Iterable[SettingsFlag], section: str) -> dict[str, str]:
    """Field -> flag for one section, so that settings errors name the flag the user typed."""
    return {flag.field: flag.flag for flag in flags if flag.section == section}


def settings_command(
    app: typer.Typer,
    name: str,
    fixed: list[inspect.Parameter],
    flags: list[SettingsFlag],
    body: Callable[[dict[str, Any], dict[str, dict[str, Any]]], None],
    help_text: str,
) -> Callable[..., None]:
    """Register command `name`: its fixed parameters, then one flag per settings field. `body` receives the fixed
    parameters' values and the settings flags actually given, grouped by section."""
    fixed_names = [p.name for p in fixed]

    def command(**values: Any) -> None:
        body({key: values[key] for key in fixed_names}, given_values(flags, values))

    command.__signature__ = inspect.Signature([*fixed, *shared_flag_parameters(flags)])
    command.__doc__ = help_text
    command.__name__ = f"{name.replace('-', '_')}_command"
    app.command(name)(command)
    return command


def fixed_option(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    """A hand-written parameter (model, --out, --json ...) in the form `settings_command` takes."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def common_parameters(
    out_help: str,
    recipe_help: str,
    force_help: str,
    resume_help: str | None = None,
    device: bool = True,
    dtype: bool = False,
    model_name: str = "model",
    placement: bool = False,
) -> list[inspect.Parameter]:
    """The hand-written parameters the settings commands share, in their usual order: the model (argument and
    --model), --out, --recipe, --resume (where the command can resume), --force, --device, --device-map,
    --max-memory, --offload-folder (where the command can spread a model), --dtype, --json, --debug."""
    from slimllm.cli.app import (
        DebugOpt,
        DeviceMapOpt,
        DeviceOpt,
        DtypeOpt,
        JsonOpt,
        MaxMemoryOpt,
        ModelArg,
        ModelOpt,
        OffloadFolderOpt,
    )

    parameters = [
        fixed_option(model_name, ModelArg),
        fixed_option("model_option", ModelOpt),
        fixed_option("out", Annotated[Path | None, typer.Option("--out", "-o", help=out_help)]),
        fixed_option("recipe", Annotated[Path | None, typer.Option("--recipe", help=recipe_help)]),
    ]
    if resume_help is not None:
        parameters.append(fixed_option("resume", Annotated[bool, typer.Option("--resume", help=resume_help)], False))
    parameters.append(fixed_option("force", Annotated[bool, typer.Option("--force", help=force_help)], False))
    if device:
        parameters.append(fixed_option("device", DeviceOpt, "auto"))
    if placement:
        parameters += placement_parameters(DeviceMapOpt, MaxMemoryOpt, OffloadFolderOpt)
    if dtype:
        parameters.append(fixed_option("dtype", DtypeOpt, "auto"))
    return parameters + [fixed_option("as_json", JsonOpt, False), fixed_option("debug", DebugOpt, False)]


def placement_parameters(device_map: Any, max_memory: Any, offload_folder: Any) -> list[inspect.Parameter]:
    """--device-map, --max-memory and --offload-folder (read back with `slimllm.cli.app.placement_of`)."""
    return [fixed_option("device_map", device_map), fixed_option("max_memory", max_memory),
            fixed_option("offload_folder", offload_folder)]
