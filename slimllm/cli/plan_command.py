"""`slimllm plan`: the estimated peak memory and time class of every compile stage, before any work.

It takes the same flags and recipe as `slimllm compile` and reads only the model's configuration (a hub model's
config.json, not its weights).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from slimllm.cli.app import app, emit, pick_model, placement_of, run_command
from slimllm.cli.compile_command import FLAGS, split_compile_flags
from slimllm.cli.options import fixed_option, placement_parameters, settings_command


def _fixed() -> list[inspect.Parameter]:
    from slimllm.cli.app import (
        DebugOpt,
        DeviceMapOpt,
        DeviceOpt,
        JsonOpt,
        MaxMemoryOpt,
        ModelArg,
        ModelOpt,
        OffloadFolderOpt,
    )

    return [
        fixed_option("model", ModelArg),
        fixed_option("model_option", ModelOpt),
        fixed_option("recipe", Annotated[Path | None, typer.Option("--recipe", help="The compile recipe to plan.")]),
        fixed_option("device", DeviceOpt, "auto"),
        *placement_parameters(DeviceMapOpt, MaxMemoryOpt, OffloadFolderOpt),
        fixed_option("as_json", JsonOpt, False),
        fixed_option("debug", DebugOpt, False),
    ]


def _plan(fixed: dict[str, Any], given: dict[str, dict[str, Any]]) -> None:
    def action() -> None:
        from slimllm.core.device import resolve_device
        from slimllm.models.loading import model_config
        from slimllm.pipeline.compiler import resolve_compile_settings
        from slimllm.pipeline.plan import GIB, plan_compile

        compile_flags, prune_flags, overrides = split_compile_flags(given)
        settings = resolve_compile_settings(
            fixed["recipe"], overrides, compile_flags.get("target"), compile_flags.get("eval_data"),
            compile_flags.get("profile", "default"), prune_flags.get("method"), prune_flags.get("remove"),
            prune_flags.get("ratio"), prune_flags.get("calib"),
        )
        model = pick_model(fixed["model"], fixed["model_option"])
        placement = placement_of(fixed)
        device = str(resolve_device(fixed["device"]))
        plan = plan_compile(model_config(model), settings, device, placement=placement)
        plans, machine, work = plan.stages, plan.machine, plan.work
        payload = {
            "model": model,
            "device": device,
            "machine": {"host_bytes": machine.host_bytes, "device_bytes": machine.device_bytes,
                        "cores": machine.cores, "gpu_bytes": list(machine.gpu_bytes), "spread": machine.spread,
                        "host_weights_cap": machine.host_weights_cap},
            "removed_layers": work.removed_layers,
            "stages": [stage.to_dict() for stage in plans],
        }
        assumed = _assumptions(settings, plans)
        payload["assumed"] = assumed
        lines = [f"{model} on {device} ({machine.host_bytes / GIB:.1f} GiB host"
                 + (f", {machine.device_bytes / GIB:.1f} GiB device" if machine.device_bytes else "")
                 + f", {machine.cores} cores); {work.removed_layers} layers removed"
                 + (f"; spread models hold {machine.host_weights_cap / GIB:.1f} GiB of weights in host memory, the "
                    "rest on disk" if machine.host_weights_cap else ""),
                 f"method {assumed['method']} ({assumed['method_from']}), budget {assumed['budget']}; "
                 f"stages: {', '.join(assumed['stages'])}",
                 f"{'stage':<12} {'host GiB':>9} {'private GiB':>12} {'device GiB':>11}  time"]
        for stage in plans:
            lines.append(f"{stage.stage:<12} {stage.host_bytes / GIB:>9.1f} {stage.private_bytes / GIB:>12.1f} "
                         f"{stage.device_bytes / GIB:>11.1f}  {stage.time_class}")
        lines.append("host: resident memory, pages of fp32 checkpoints read in place included; private: the part "
                     "that must fit (the kernel can drop and re-read mapped pages)")
        emit(payload, fixed["as_json"], lines)
        plan.check()

    run_command(fixed["debug"], action)


def _assumptions(settings: dict[str, Any], plans) -> dict[str, Any]:
    """What the plan assumed where the user said nothing: the method (and where it came from), its budget and the
    stages that run."""
    prune = settings["prune"]
    if prune is None:
        budget = "none (the dense model)"
    elif not prune.method.spec.removes_layers:
        budget = f"set in [{settings['method_section']}]"
    else:
        budget = f"--remove {prune.remove}" if prune.remove is not None else f"--ratio {prune.ratio}"
    return {"method": settings["method"].value, "method_from": settings["method_source"], "budget": budget,
            "stages": [stage.stage for stage in plans]}


plan_command = settings_command(
    app,
    "plan",
    _fixed(),
    FLAGS,
    _plan,
    "Estimate every compile stage's peak memory and time on this machine before any work; takes compile's flags.",
)
