"""`slimllm eval`: perplexity of a model on a text source. Its flags are generated from `EvalSettings`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

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
    ProgressBar,
    app,
    emit,
    pick_model,
    placement_of,
    run_command,
)
from slimllm.cli.options import fixed_option, flag_names, placement_parameters, settings_command, settings_flags
from slimllm.evaluation.perplexity import EvalSettings

FLAGS = settings_flags(EvalSettings, "eval")

FIXED = [
    fixed_option("model", ModelArg),
    fixed_option("model_option", ModelOpt),
    fixed_option(
        "out", Annotated[Path | None, typer.Option("--out", help="Also write the result to this JSON file.")]
    ),
    fixed_option(
        "recipe", Annotated[Path | None, typer.Option("--recipe", help="TOML recipe: an [eval] table.")]
    ),
    fixed_option("device", DeviceOpt, "auto"),
    *placement_parameters(DeviceMapOpt, MaxMemoryOpt, OffloadFolderOpt),
    fixed_option("dtype", DtypeOpt, "auto"),
    fixed_option("as_json", JsonOpt, False),
    fixed_option("debug", DebugOpt, False),
]


def _eval(fixed: dict[str, Any], given: dict[str, dict[str, Any]]) -> None:
    def action() -> None:
        from slimllm.core.artifacts import atomic_write_json
        from slimllm.core.settings import build_settings
        from slimllm.exporters.scorers import open_backend
        from slimllm.pipeline.recipes import load_recipe

        sections = load_recipe(fixed["recipe"]) if fixed["recipe"] is not None else {}
        settings = build_settings(
            EvalSettings, sections.get("eval"), given.get("eval", {}), "[eval]", flag_names(FLAGS, "eval")
        )
        model = pick_model(fixed["model"], fixed["model_option"])
        placement = placement_of(fixed)
        bar = ProgressBar(settings.task or "eval")
        try:
            with open_backend(model, settings.backend, fixed["device"], fixed["dtype"], placement=placement) as scorer:
                if settings.task:
                    payload, lines = _accuracy(scorer, settings, bar)
                elif settings.kl_reference:
                    payload, lines = _divergence(scorer, settings, fixed, bar)
                else:
                    payload, lines = _perplexity(scorer, settings, bar)
        finally:
            bar.close()
        payload |= {"model": scorer.model, "backend": scorer.backend}
        out = fixed["out"]
        if out is not None:
            atomic_write_json(out, payload)
        emit(payload, fixed["as_json"], [*lines, *([f"wrote {out}"] if out is not None else [])])

    run_command(fixed["debug"], action)


def _perplexity(scorer, settings: EvalSettings, bar) -> tuple[dict, list[str]]:
    from slimllm.evaluation.perplexity import perplexity_on_text

    result = perplexity_on_text(scorer.logits_fn, scorer.tokenizer, settings, progress=bar)
    line = (
        f"perplexity {result.perplexity:.3f}  ({result.tokens_scored} tokens in {result.windows} windows "
        f"of {result.seq_len}, {result.seconds:.1f} s on {scorer.backend}); over each window's second half "
        f"(llama-perplexity's protocol) {result.perplexity_second_half:.3f}"
    )
    return result.to_dict(), [line]


def _divergence(scorer, settings: EvalSettings, fixed: dict[str, Any], bar) -> tuple[dict, list[str]]:
    from slimllm.evaluation.divergence import divergence_statistics
    from slimllm.evaluation.perplexity import text_windows
    from slimllm.exporters.scorers import open_backend

    windows, corpus = text_windows(scorer.tokenizer, settings)
    with open_backend(settings.kl_reference, "auto", fixed["device"], fixed["dtype"],
                      placement=placement_of(fixed)) as reference:
        first = windows.shape[1] // 2 if settings.kl_second_half else 0
        stats = divergence_statistics(scorer.logits_fn, reference.logits_fn, windows, bar, first)
        stats |= {"reference": reference.model, "reference_backend": reference.backend}
    stats |= {"data": settings.data, "data_sha256": corpus.sha256, "windows": int(windows.shape[0]),
              "seq_len": settings.seq_len}
    kld, same, delta_p, half = stats["kld"], stats["same_top1"], stats["delta_p"], stats["second_half"]
    second_half = [] if half is None else [
        f"second halves (llama-perplexity's protocol): PPL {half['ppl']:.4f} vs reference {half['reference_ppl']:.4f} "
        f"(ratio {half['ppl_ratio']:.4f}) on {half['tokens']} tokens"
    ]
    return stats, [
        f"PPL {stats['ppl']:.4f} vs reference {stats['reference_ppl']:.4f} (ratio {stats['ppl_ratio']:.4f}) on "
        f"{stats['tokens']} tokens",
        *second_half,
        f"mean KLD {kld['mean']:.6f} ± {kld['stderr']:.6f}; max {kld['max']:.4f}, 99.9% {kld['99.9%']:.4f}, "
        f"99% {kld['99%']:.4f}, median {kld['median']:.6f}",
        f"same top-1 {100 * same['mean']:.3f} ± {100 * same['stderr']:.3f} %; Δp mean {100 * delta_p['mean']:.3f} %, "
        f"RMS {100 * delta_p['rms']:.3f} %",
    ]


def _accuracy(scorer, settings: EvalSettings, bar) -> tuple[dict, list[str]]:
    from slimllm.evaluation.accuracy import evaluate_tasks
    from slimllm.evaluation.tasks import read_task

    tasks = read_task(settings.task, settings.task_file)
    result = evaluate_tasks(
        scorer.sequence_log_probs, scorer.tokenizer, tasks, settings.task, settings.limit, settings.offset, progress=bar
    )
    payload = result.to_dict()
    payload.pop("correct")
    lines = [
        f"{settings.task}: acc_norm {100 * result.acc_norm:.2f} ± {100 * result.acc_norm_stderr:.2f}, "
        f"acc {100 * result.acc:.2f} ± {100 * result.acc_stderr:.2f}, per-token (llama.cpp's rule) "
        f"{100 * result.acc_per_token:.2f} on {result.tasks} tasks from {result.offset}",
        f"{result.seconds:.1f} s, {result.tokens_per_second:.0f} tokens/s on {scorer.backend}",
    ]
    return payload, lines


eval_command = settings_command(
    app,
    "eval",
    FIXED,
    FLAGS,
    _eval,
    "Perplexity (and with --task, multiple-choice accuracy such as HellaSwag) of a checkpoint, ONNX export or GGUF "
    "file.",
)
