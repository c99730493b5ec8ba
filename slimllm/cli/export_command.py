"""`slimllm export`: ONNX or GGUF, validated against PyTorch.

Its flags are generated from `OnnxExportSettings` and `GgufExportSettings`; a flag both share (`--eval-data`, ...)
sets it for either target, a flag of only one is refused with the other target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from slimllm.cli.app import app, emit, pick_model, run_command
from slimllm.cli.options import common_parameters, fixed_option, flag_names, settings_command, settings_flags
from slimllm.core.errors import UserInputError
from slimllm.exporters.gguf import GgufExportSettings
from slimllm.exporters.onnx import OnnxExportSettings


def _shared_defaults() -> dict[str, str]:
    """Shown defaults of the flags both targets take, where the two classes' defaults differ."""
    from slimllm.core.settings import field_default

    shown = {}
    for field in ("eval_seq_len", "eval_windows", "generate_tokens"):
        onnx, gguf = field_default(OnnxExportSettings, field), field_default(GgufExportSettings, field)
        if onnx != gguf:
            shown[field] = f"{onnx} (ONNX), {gguf} (GGUF)"
    return shown


ONNX_FLAGS = settings_flags(OnnxExportSettings, "onnx", rename={"quant": "--quant"}, defaults=_shared_defaults())
GGUF_FLAGS = [
    flag
    for flag in settings_flags(GgufExportSettings, "gguf", rename={"outtypes": "--outtype"})
    if flag.flag not in {f.flag for f in ONNX_FLAGS}
]
SHARED = {flag.field for flag in ONNX_FLAGS} & {flag.field for flag in settings_flags(GgufExportSettings, "gguf")}
"""Fields both targets have: given once, they go to whichever target is exported."""

FIXED = common_parameters(
    out_help="Output directory.",
    recipe_help="TOML recipe: [onnx], [gguf] tables.",
    force_help="Replace an export slimllm wrote earlier.",
    device=False,
    model_name="checkpoint",
)
FIXED.insert(2, fixed_option("target", Annotated[str | None, typer.Option("--target", "-t", help="onnx or gguf.")]))


def export_settings(target: str, recipe: Path | None, given: dict[str, dict[str, Any]]):
    """The settings of one export: class defaults < recipe section < flags given for that target."""
    from slimllm.core.settings import build_settings
    from slimllm.pipeline.recipes import load_recipe

    other = "gguf" if target == "onnx" else "onnx"
    own = dict(given.get(target, {}))
    for field, value in given.get(other, {}).items():
        if field not in SHARED:
            names = flag_names(ONNX_FLAGS + GGUF_FLAGS, other)
            raise UserInputError(
                f"{names.get(field, field)} is a{'n ONNX' if other == 'onnx' else ' GGUF'} option; "
                f"it does nothing for --target {target}"
            )
        own.setdefault(field, value)
    sections = load_recipe(recipe) if recipe is not None else {}
    cls = OnnxExportSettings if target == "onnx" else GgufExportSettings
    return build_settings(cls, sections.get(target), own, f"[{target}]", flag_names(ONNX_FLAGS + GGUF_FLAGS, target))


def _export(fixed: dict[str, Any], given: dict[str, dict[str, Any]]) -> None:
    def action() -> None:
        from slimllm.models.loading import checkpoint_directory

        target = fixed["target"]
        if target not in ("onnx", "gguf"):
            raise UserInputError(f"--target must be onnx or gguf, got {target!r}")
        if fixed["out"] is None:
            raise UserInputError("--out is required: the directory to write the export to")
        settings = export_settings(target, fixed["recipe"], given)
        source = checkpoint_directory(pick_model(fixed["checkpoint"], fixed["model_option"]))
        payload, lines = (_onnx if target == "onnx" else _gguf)(source, fixed, settings)
        emit(payload, fixed["as_json"], lines)

    run_command(fixed["debug"], action)


def _onnx(source: Path, fixed: dict[str, Any], settings) -> tuple[dict, list[str]]:
    from slimllm.exporters.onnx import export_onnx

    result = export_onnx(source, fixed["out"], settings, force=fixed["force"])
    lines = [f"exported {result.variant} to {result.out_dir} (validated on {result.provider})"]
    return result.to_dict(), lines + _check_lines(result.validation["checks"])


def _gguf(source: Path, fixed: dict[str, Any], settings) -> tuple[dict, list[str]]:
    from slimllm.exporters.gguf import export_gguf

    result = export_gguf(source, fixed["out"], settings, force=fixed["force"])
    lines = [f"exported {len(result.files)} GGUF file(s) to {result.out_dir}"]
    for name, info in result.files.items():
        lines.append(
            f"  {name}: {info['bytes'] / 2**20:.1f} MiB, PPL {info['ppl']:.3f} "
            f"(PyTorch {info['reference_ppl']:.3f}, ratio {info['ppl_ratio']:.4f})"
        )
    lines += [f"  greedy [{label}]: {text[:120]!r}" for label, text in result.greedy_samples.items()]
    checks = [c for report in result.validation["files"].values() for c in report["checks"]]
    return result.to_dict(), lines + _check_lines(checks)


def _check_lines(checks: list[dict]) -> list[str]:
    from slimllm.exporters.parity import CheckResult

    return [f"  check {CheckResult(**c).describe()}" for c in checks]


export_command = settings_command(
    app,
    "export",
    FIXED,
    ONNX_FLAGS + GGUF_FLAGS,
    _export,
    "Export a checkpoint to ONNX or GGUF; the command fails if the export does not match PyTorch.",
)
