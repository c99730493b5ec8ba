"""`slimllm prune`: remove layers chosen by TRSP or a baseline and save the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from slimllm.cli.app import (
    DebugOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    ModelOpt,
    ProgressBar,
    app,
    emit,
    pick_model,
    run_command,
)
from slimllm.errors import UserInputError


@app.command("prune")
def prune_command(
    model: ModelArg = None,
    model_option: ModelOpt = None,
    method: Annotated[
        str | None, typer.Option("--method", help="trsp (default), shortgpt, angular, sleb, last or random.")
    ] = None,
    remove: Annotated[
        int | None, typer.Option("--remove", "-k", help="Number of layers to remove.", show_default=False)
    ] = None,
    ratio: Annotated[
        float | None, typer.Option("--ratio", help="Fraction of layers to remove (0-1).", show_default=False)
    ] = None,
    calib: Annotated[
        str | None,
        typer.Option("--calib", help="Calibration text: self (offline default), wikitext2, c4 or a file."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory.", show_default=False)] = None,
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="TOML recipe ([prune] and [trsp] tables); flags override it.")
    ] = None,
    protect_first: Annotated[
        int | None, typer.Option("--protect-first", help="Never remove the first N layers (0).")
    ] = None,
    protect_last: Annotated[
        int | None, typer.Option("--protect-last", help="Never remove the last M layers (1).")
    ] = None,
    calib_blocks: Annotated[
        int | None, typer.Option("--calib-blocks", help="Number of calibration blocks (16).")
    ] = None,
    block_len: Annotated[int | None, typer.Option("--block-len", help="Tokens per calibration block (512).")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Blocks per forward/training step (2).")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for data order, sampling and random (0).")] = None,
    gate_mode: Annotated[str | None, typer.Option("--gate-mode", help="TRSP gate: delta (default) or output.")] = None,
    train_scope: Annotated[
        str | None, typer.Option("--train-scope", help="TRSP stage 1 trains: gates (default) or full.")
    ] = None,
    lambda1: Annotated[float | None, typer.Option("--lambda1", help="TRSP stage-1 L1 weight on gates (5e-3).")] = None,
    gate_lr: Annotated[float | None, typer.Option("--gate-lr", help="TRSP gate learning rate (1e-2).")] = None,
    gate_optimizer: Annotated[
        str | None, typer.Option("--gate-optimizer", help="TRSP gate optimizer: adam (default) or sgd.")
    ] = None,
    weight_lr: Annotated[
        float | None, typer.Option("--weight-lr", help="TRSP stage-1 weight LR, full scope (2e-5).")
    ] = None,
    steps_per_round: Annotated[
        int | None, typer.Option("--steps-per-round", help="TRSP stage-1 steps per greedy round (6).")
    ] = None,
    stage2: Annotated[
        str | None, typer.Option("--stage2", help="TRSP knowledge transfer: fade (default), regularize or none.")
    ] = None,
    lambda2: Annotated[float | None, typer.Option("--lambda2", help="TRSP stage-2 regularizer weight (1e-3).")] = None,
    reg_norm: Annotated[str | None, typer.Option("--reg-norm", help="TRSP stage-2 norm: l2 (default) or l1.")] = None,
    stage2_steps: Annotated[int | None, typer.Option("--stage2-steps", help="TRSP stage-2 steps (64).")] = None,
    stage2_lr: Annotated[float | None, typer.Option("--stage2-lr", help="TRSP stage-2 weight LR (1e-4).")] = None,
    fade_fraction: Annotated[
        float | None, typer.Option("--fade-fraction", help="TRSP fade: share of stage 2 spent fading (0.5).")
    ] = None,
    distill: Annotated[
        float | None,
        typer.Option("--distill", help="TRSP stage-2 weight of KL to the unpruned model's predictions (0: CE only)."),
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted TRSP run from its last round checkpoint.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace output slimllm wrote earlier.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Remove transformer layers chosen by a pruning method and save a checkpoint plain transformers loads."""

    def action() -> None:
        from slimllm.pruning.methods import PruneMethod
        from slimllm.pruning.stage import PruneSettings, run_prune
        from slimllm.pruning.trsp import TrspSettings
        from slimllm.recipes import build_settings, load_recipe

        if out is None:
            raise UserInputError("--out is required: the directory to write the pruned checkpoint to")
        if method is not None and method not in {m.value for m in PruneMethod}:
            raise UserInputError(f"unknown --method {method!r}; use one of {', '.join(m.value for m in PruneMethod)}")
        sections = load_recipe(recipe) if recipe is not None else {}
        settings = build_settings(
            PruneSettings,
            sections.get("prune"),
            dict(
                method=method,
                remove=remove,
                ratio=ratio,
                protect_first=protect_first,
                protect_last=protect_last,
                calib=calib,
                calib_blocks=calib_blocks,
                block_len=block_len,
                batch_size=batch_size,
                seed=seed,
            ),
        )
        trsp = build_settings(
            TrspSettings,
            sections.get("trsp"),
            dict(
                gate_mode=gate_mode,
                train_scope=train_scope,
                lambda1=lambda1,
                gate_lr=gate_lr,
                gate_optimizer=gate_optimizer,
                weight_lr=weight_lr,
                steps_per_round=steps_per_round,
                stage2=stage2,
                lambda2=lambda2,
                reg_norm=reg_norm,
                stage2_steps=stage2_steps,
                stage2_lr=stage2_lr,
                fade_fraction=fade_fraction,
                distill=distill,
                gradient_checkpointing=gradient_checkpointing,
            ),
        )
        bar = ProgressBar(settings.method.value)
        try:
            result = run_prune(
                pick_model(model, model_option),
                settings,
                out,
                force=force,
                device=device,
                dtype=dtype,
                progress=bar,
                trsp=trsp,
                resume=resume,
            )
        finally:
            bar.close()
        emit(
            result.to_dict(),
            as_json,
            [
                f"removed {len(result.removed_layers)} of {result.original_num_layers} layers with {result.method}: "
                f"{result.removed_layers}",
                f"parameters {result.params_before / 1e6:.1f}M -> {result.params_after / 1e6:.1f}M "
                f"({100 * (1 - result.params_after / result.params_before):.1f}% fewer)",
                f"time {result.seconds:.1f} s (selection {result.selection_seconds:.1f} s)",
                f"wrote {result.out_dir}",
            ],
        )

    run_command(
        debug,
        action,
        resume_hint="rerun the same command with --resume to continue (TRSP continues from its last round checkpoint)",
    )
