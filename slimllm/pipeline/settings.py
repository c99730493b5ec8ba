"""The settings of one `slimllm compile` run: compile's own, and each stage's, resolved from defaults, the recipe and
the flags actually given.

    >>> settings = resolve_settings(recipe_sections, flag_sections, {"target": "onnx"}, "shortgpt", 8, None, None)
    >>> settings["prune"].remove, settings["compile"].target
    (8, <Target.ONNX: 'onnx'>)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from slimllm.core.errors import UserInputError, parse_choice
from slimllm.core.settings import build_settings


class Target(str, Enum):
    ONNX = "onnx"
    GGUF = "gguf"
    ALL = "all"


NO_PRUNING = "none"
"""`--method none`: compile the dense model as it is."""

COMPILE_GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
"""The GGUF types `compile` writes unless told otherwise (`export --target gguf` writes F16 alone)."""


@dataclass
class CompileSettings:
    """Settings of `slimllm compile` itself; each stage's own settings live in its settings class."""

    target: Target = Target.ALL
    """onnx, gguf or all."""
    eval_data: str | None = None
    """Evaluation text for perplexities and the exporters' checks; None uses a built-in paragraph."""
    eval_seq_len: int = 512
    """Tokens per evaluation window."""
    eval_windows: int = 8
    """Evaluation windows (the same windows for PyTorch, ONNX and every GGUF type)."""
    eval_task: str | None = "hellaswag"
    """Multiple-choice task scored for the dense model, the pruned one and every export; none skips it. Runs when
    its file is found (--eval-task-file, or the shared copy)."""
    eval_task_file: str | None = None
    """The task's file (default: ../shared/data/hellaswag/hellaswag_val_full.txt, when present)."""
    eval_tasks: int = 200
    """How many tasks to score (the first N of the file)."""
    profile: str | None = "cpu-x86"
    """Target profile for the latency stage (a built-in name or a path); None skips profiling."""
    heal: bool = True
    """Heal the pruned model before exporting (the [heal] settings); --no-heal skips it."""
    memory_check: bool = True
    """Refuse up front a run whose estimated peak memory (`slimllm plan`) exceeds the machine's."""
    frontier: bool = False
    """Measure the deployment frontier after profiling: the dense model's quantization ladder against this run's
    model (and the [frontier] pruned variants) through the same ladder, on the profile (`slimllm frontier`)."""

    def __post_init__(self) -> None:
        self.target = parse_choice(Target, self.target, "--target")
        if self.eval_seq_len < 16 or self.eval_windows < 1:
            raise UserInputError("--eval-seq-len must be >= 16 and --eval-windows >= 1")
        if self.profile in ("", "none"):
            self.profile = None
        if self.eval_task in ("", "none"):
            self.eval_task = None
        if self.eval_tasks < 1:
            raise UserInputError(f"--eval-tasks must be at least 1, got {self.eval_tasks}")
        if self.eval_task is not None:
            from slimllm.evaluation.tasks import task_formats

            if self.eval_task not in task_formats():
                raise UserInputError(
                    f"unknown --eval-task {self.eval_task!r}; use one of {', '.join(task_formats())} or none"
                )
            if self.eval_task_file is not None and not Path(self.eval_task_file).expanduser().is_file():
                raise UserInputError(f"--eval-task-file {self.eval_task_file} does not exist; pass the task's file")


def method_choices() -> type[Enum]:
    """The registered pruning methods plus `none` (compile the dense model), as one closed set for `--method`."""
    from slimllm.pruning.choices import PruneMethod

    return Enum("MethodChoice", {m.name: m.value for m in PruneMethod} | {"NONE": NO_PRUNING}, type=str)


def resolve_settings(
    recipe_sections: dict[str, dict[str, Any]],
    flag_sections: dict[str, dict[str, Any]],
    compile_flags: dict[str, Any],
    method: str | None,
    remove: int | None,
    ratio: float | None,
    calib: str | None,
) -> dict[str, Any]:
    """Every stage's settings: class defaults < recipe < flags actually given (None is "not given").

    Returns compile, method (the chosen `MethodChoice`), method_source (argument, recipe or default), prune (None for
    `--method none`), method_settings (the method's own, or None), method_section (its recipe section), heal (None
    when not healing), onnx and gguf.
    """
    compile_settings = build_settings(CompileSettings, recipe_sections.get("compile"), compile_flags, "[compile]")
    merged = {
        section: {**recipe_sections.get(section, {}), **flag_sections.get(section, {})}
        for section in set(recipe_sections) | set(flag_sections)
    }
    from slimllm.pruning.settings import PruneSettings

    choices = method_choices()
    # argument > recipe > the settings class's default: the one default every entry point shares
    recipe_method = merged.get("prune", {}).get("method")
    chosen = method or recipe_method or PruneSettings.method.value
    method_source = "argument" if method else "recipe" if recipe_method else "default"
    method_value = parse_choice(choices, str(chosen), "--method")
    prune_settings, method_settings, method_section = _prune_settings(merged, method_value, remove, ratio, calib)
    # The exports' own evaluation settings: compile's (from its recipe section or flags) unless the [onnx]/[gguf]
    # section sets them; a compile flag that was actually given wins over both.
    given = {key: compile_flags.get(key) for key in ("eval_data", "eval_seq_len", "eval_windows")}
    onnx_settings, gguf_settings = _export_settings(recipe_sections, flag_sections, compile_settings, given)
    heal_settings = _heal_settings(merged, flag_sections, compile_settings, prune_settings)
    resolved = {
        "compile": compile_settings,
        "method": method_value,
        "method_source": method_source,
        "prune": prune_settings,
        "method_settings": method_settings,
        "method_section": method_section,
        "heal": heal_settings,
        "onnx": onnx_settings,
        "gguf": gguf_settings,
    }
    from slimllm.pipeline.stages import stage_sections

    for section, settings_class in stage_sections().items():  # a stage's own section that nothing above resolves
        if section not in resolved:
            resolved[section] = build_settings(settings_class, recipe_sections.get(section),
                                               flag_sections.get(section, {}), f"[{section}]")
    return resolved


def _prune_settings(sections, method, remove, ratio, calib):
    from slimllm.pruning.registry import get_method
    from slimllm.pruning.settings import PruneSettings

    if method.value == NO_PRUNING:
        if remove is not None or ratio is not None:
            raise UserInputError("--method none compiles the dense model; drop --remove/--ratio")
        return None, None, None
    flags = {"method": method.value, "remove": remove, "ratio": ratio, "calib": calib}
    prune = dict(sections.get("prune", {}))
    if remove is not None or ratio is not None:  # an explicit k replaces the recipe's, whichever form it took
        prune.pop("remove", None)
        prune.pop("ratio", None)
    spec = get_method(method.value)
    if not spec.removes_layers:  # the method sets its own target in its section ([2ssp] sparsity)
        prune.pop("remove", None)
        prune.pop("ratio", None)
    elif prune.get("remove") is None and prune.get("ratio") is None and remove is None and ratio is None:
        raise UserInputError("pass --remove K or --ratio R (how many layers to remove), or --method none")
    prune_settings = build_settings(PruneSettings, prune, flags, "[prune]")
    if spec.settings_class is None:
        return prune_settings, None, None
    own = build_settings(spec.settings_class, sections.get(spec.name), {}, f"[{spec.name}]")
    return prune_settings, own, spec.name


def _heal_settings(sections, flag_sections, compile_settings: CompileSettings, prune_settings):
    """The [heal] settings when healing is on (`heal = true`, or any heal flag given) and there is a pruned model;
    the training text defaults to the pruning calibration."""
    from slimllm.recovery.healing import HealSettings

    heal_flags = flag_sections.get("heal") or {}
    if flag_sections.get("compile", {}).get("heal") is False and heal_flags:
        given = ", ".join(f"--heal-{name.replace('_', '-')}" for name in sorted(heal_flags))
        raise UserInputError(f"--no-heal conflicts with {given}; drop --no-heal to heal with them, or drop them")
    if not (compile_settings.heal or heal_flags):
        return None
    if prune_settings is None:
        raise UserInputError(
            "--method none compiles the dense model, which has nothing to heal; drop the heal settings"
        )
    values = dict(sections.get("heal", {}))
    values.setdefault("calib", prune_settings.calib)
    return build_settings(HealSettings, values, {}, "[heal]", {f: f"--heal-{f.replace('_', '-')}" for f in values})


def _export_settings(recipe_sections, flag_sections, compile_settings: CompileSettings, given: dict[str, Any]):
    from slimllm.exporters.gguf import GgufExportSettings
    from slimllm.exporters.onnx import OnnxExportSettings

    evaluation = {
        "eval_data": compile_settings.eval_data,
        "eval_seq_len": compile_settings.eval_seq_len,
        "eval_windows": compile_settings.eval_windows,
    }

    def build(cls, section: str, defaults: dict[str, Any]):
        values = {**defaults, **evaluation, **recipe_sections.get(section, {})}
        return build_settings(cls, values, {**given, **flag_sections.get(section, {})}, f"[{section}]")

    onnx = build(OnnxExportSettings, "onnx", {})
    gguf = build(GgufExportSettings, "gguf", {"outtypes": list(COMPILE_GGUF_TYPES)})
    return onnx, gguf
