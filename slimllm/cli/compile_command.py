"""`slimllm compile`: the whole pipeline, from a Hugging Face model to validated ONNX/GGUF and a report.

Its flags are generated from `CompileSettings`, the prune stage's choice of method and k, and the export settings a
compile user changes most; every other setting of every stage is a recipe key.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

from slimllm.cli.app import (
    RESUME_HINT,
    ProgressBar,
    app,
    emit,
    pick_model,
    run_command,
    run_options,
)
from slimllm.cli.options import common_parameters, settings_command, settings_flags
from slimllm.core.errors import UserInputError
from slimllm.exporters.gguf import GgufExportSettings
from slimllm.exporters.onnx import OnnxExportSettings
from slimllm.pipeline.settings import COMPILE_GGUF_TYPES, CompileSettings
from slimllm.pruning.stage import PruneSettings
from slimllm.recovery.healing import HealSettings

HEAL_FLAGS = ("tokens", "scope", "lr", "distill", "calib")
"""The [heal] settings compile takes as flags, each as --heal-<name>."""

FLAGS = [
    *settings_flags(CompileSettings, "compile", short={"target": "-t", "profile": "-p"}),
    *settings_flags(
        PruneSettings,
        "prune",
        include=["method", "remove", "ratio", "calib", "repair"],
        short={"remove": "-k"},
        extra_help={"method": "`none` skips pruning and compiles the dense model."},
    ),
    *settings_flags(HealSettings, "heal", include=HEAL_FLAGS,
                    rename={name: f"--heal-{name}" for name in HEAL_FLAGS}),
    *settings_flags(OnnxExportSettings, "onnx", include=["quant", "engine"],
                    rename={"quant": "--onnx-quant", "engine": "--onnx-engine"}),
    *settings_flags(GgufExportSettings, "gguf", include=["outtypes", "allow_full_attention"],
                    rename={"outtypes": "--outtype"}, defaults={"outtypes": ",".join(COMPILE_GGUF_TYPES)}),
]

FIXED = common_parameters(
    out_help="Output directory.",
    recipe_help="TOML recipe: [compile], [prune], method, [onnx], [gguf] tables; flags override it.",
    force_help="Replace another run slimllm wrote in --out.",
    resume_help="Continue a killed run (TRSP, DReSS and healing from their last checkpoints).",
    dtype=True,
    placement=True,
)


def split_compile_flags(given: dict[str, dict[str, Any]]) -> tuple[dict, dict, dict[str, dict[str, Any]]]:
    """The flags given, as compile() takes them: [compile] and [prune] flags that are compile()'s own arguments, and
    every other flag as an override of its recipe section."""
    from inspect import signature

    from slimllm.pipeline.compiler import compile as compile_pipeline

    arguments = set(signature(compile_pipeline).parameters)
    own = {section: {k: v for k, v in given.get(section, {}).items() if k in arguments}
           for section in ("compile", "prune")}
    overrides = {section: {k: v for k, v in values.items() if k not in own.get(section, {})}
                 for section, values in given.items()}
    return own["compile"], own["prune"], overrides


def _compile(fixed: dict[str, Any], given: dict[str, dict[str, Any]]) -> None:
    def action() -> None:
        from slimllm.pipeline.compiler import compile as compile_pipeline

        if fixed["out"] is None:
            raise UserInputError("--out is required: the directory of the compile run")
        compile_flags, prune_flags, overrides = split_compile_flags(given)
        bar = ProgressBar("compile")
        try:
            result = compile_pipeline(
                pick_model(fixed["model"], fixed["model_option"]),
                out=fixed["out"],
                target=compile_flags.get("target"),
                method=prune_flags.get("method"),
                remove=prune_flags.get("remove"),
                ratio=prune_flags.get("ratio"),
                calib=prune_flags.get("calib"),
                eval_data=compile_flags.get("eval_data"),
                profile=compile_flags.get("profile", "default"),
                recipe=fixed["recipe"],
                overrides=overrides,
                progress=bar,
                **run_options(fixed),
                command=shlex.join(["slimllm", *sys.argv[1:]]) if sys.argv[1:2] == ["compile"] else None,
            )
        finally:
            bar.close()
        emit(result.to_dict(), fixed["as_json"], _summary(result))

    run_command(fixed["debug"], action, resume_hint=RESUME_HINT)


def _summary(result) -> list[str]:
    stages = {name: result.manifest["stages"][name] for name in result.manifest["run_stages"]}
    lines = []
    prune = stages["prune"].get("result", {})
    if prune.get("removed_layers") is not None:
        removed, total = prune["removed_layers"], prune["original_num_layers"]
        lines.append(f"removed layers {removed} of {total} ({prune['method']})")
    heal = stages.get("heal", {}).get("result", {})
    if heal.get("steps"):
        lines.append(f"healed ({heal['scope']}) with {heal['tokens']:,} tokens: loss {heal['losses'][0]:.3f} -> "
                     f"{heal['losses'][-1]:.3f}")
    for name, value in stages.get("evaluate", {}).get("result", {}).get("perplexity", {}).items():
        lines.append(f"  PPL {name}: {value:.3f}")
    accuracy = stages.get("accuracy", {}).get("result", {})
    for name, row in accuracy.get("models", {}).items():
        lines.append(f"  {accuracy['task']} acc_norm {name}: {100 * row['acc_norm']:.2f} ({row['tasks']} tasks)")
    for label, entry in stages.get("profile", {}).get("result", {}).get("summary", {}).items():
        decode = next(v for k, v in entry["speedups"].items() if k.startswith("tg"))
        lines.append(f"  {label}: decode x{decode['measured']:.3f} (ideal x{decode['ideal']:.3f})")
    if result.reused_stages:
        lines.append(f"reused finished stages: {', '.join(result.reused_stages)}")
    lines.append(f"done in {result.seconds:.0f} s; report: {result.report_path}")
    return lines


compile_command = settings_command(
    app,
    "compile",
    FIXED,
    FLAGS,
    _compile,
    "The whole pipeline: prune, repair and heal, export to ONNX and GGUF with parity checks, evaluate (perplexity, "
    "divergence, HellaSwag), profile; writes DIR/report.md, report.html and manifest.json.",
)
