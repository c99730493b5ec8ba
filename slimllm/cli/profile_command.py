"""`slimllm profile`: latency of the pruned model against the dense one on a target profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimllm.cli.app import DebugOpt, JsonOpt, ProgressBar, app, emit, run_command
from slimllm.core.errors import UserInputError


@app.command("profile")
def profile_command(
    dense: Annotated[
        str | None, typer.Option("--dense", help="Dense model (directory, .gguf or smollm2-135m).")
    ] = None,
    pruned: Annotated[str | None, typer.Option("--pruned", help="Pruned checkpoint directory.")] = None,
    profile: Annotated[
        str, typer.Option("--profile", "-p", help="Built-in profile (cpu-x86, cuda...) or a TOML path.")
    ] = "cpu-x86",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory.", show_default=False)] = None,
    eval_data: Annotated[
        str | None,
        typer.Option("--eval-data", help="Text for the parity checks of the exports made for profiling."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace output slimllm wrote earlier.")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure TTFT, prefill and decode tokens/s and peak memory, dense vs pruned, on every backend of a profile."""

    def action() -> None:
        from slimllm.latency.profiler import ModelArtifacts, run_profile
        from slimllm.latency.profiles import load_profile
        from slimllm.models.loading import checkpoint_directory

        if dense is None or pruned is None:
            raise UserInputError("pass both --dense and --pruned (checkpoint directories or model names)")
        if out is None:
            raise UserInputError("--out is required: the directory to write latency.json/.md/.png to")
        target = load_profile(profile)
        bar = ProgressBar("profile")
        try:
            result = run_profile(
                ModelArtifacts(checkpoint_directory(dense)),
                ModelArtifacts(checkpoint_directory(pruned)),
                target,
                out,
                eval_data=eval_data,
                progress=bar,
                force=force,
            )
        finally:
            bar.close()
        lines = [f"latency report ({target.name}) in {out}/latency.md, .json and .png"]
        for label, entry in result.summary.items():
            speedups = entry["speedups"]
            decode = speedups[f"tg{target.generate_tokens}"]
            lines.append(
                f"  {label}: decode x{decode['measured']:.3f} (ideal x{decode['ideal']:.3f}, "
                f"{100 * decode['efficiency']:.0f} %), TTFT x{speedups['ttft']['measured']:.3f}"
            )
        emit(result.payload, as_json, lines)

    run_command(debug, action)
