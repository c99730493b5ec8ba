"""Stage `accuracy`: zero-shot multiple-choice accuracy (HellaSwag by default) of the dense model, the pruned
checkpoint and every export, on the same tasks, scored as lm-evaluation-harness scores them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimllm.core.artifacts import atomic_write_json
from slimllm.core.report import Block, heading, paragraph, table
from slimllm.pipeline.stages import CompileContext, StageSpec, register_stage, source_hash
from slimllm.pipeline.stages.evaluate import DENSE_LABEL, EvaluatedModel, evaluated_models, onnx_device

TASK_CONTEXT = 1024
"""llama.cpp's window for task scoring: a multiple-choice question and its longest ending fit many times over."""


def task_file(ctx: CompileContext) -> Path | None:
    """The task's file: the one given, else the shared copy where it exists; None when there is none to read."""
    from slimllm.evaluation.tasks import default_task_file

    if ctx.compile.eval_task is None:
        return None
    if ctx.compile.eval_task_file is not None:
        return Path(ctx.compile.eval_task_file).expanduser()
    default = default_task_file(ctx.compile.eval_task)
    return default if default.is_file() else None


def _keyed_by(ctx: CompileContext) -> dict[str, Any]:
    path = task_file(ctx)
    return {
        "dense_sha256": ctx.dense_sha,
        "task": ctx.compile.eval_task,
        "file": source_hash(str(path)) if path else None,
        "tasks": ctx.compile.eval_tasks,
    }


def _run(ctx: CompileContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from slimllm.evaluation.accuracy import evaluate_tasks
    from slimllm.evaluation.tasks import read_task
    from slimllm.exporters.scorers import open_backend

    path = task_file(ctx)
    if path is None:
        from slimllm.evaluation.tasks import default_task_file

        reason = f"no {ctx.compile.eval_task} file at {default_task_file(ctx.compile.eval_task)}"
        return {}, {"task": ctx.compile.eval_task, "skipped": f"{reason}; pass --eval-task-file PATH"}
    tasks = read_task(ctx.compile.eval_task, path)
    models = [EvaluatedModel(DENSE_LABEL, str(ctx.dense_dir), "torch"), *evaluated_models(ctx)]
    rows: dict[str, Any] = {}
    correct: dict[str, dict[str, list[int]]] = {}
    for index, model in enumerate(models):
        device = onnx_device(ctx) if model.backend == "onnxruntime" else ctx.device
        placement = ctx.placement if model.backend == "torch" else None
        with open_backend(model.spec, model.backend, device, "fp32", context=TASK_CONTEXT,
                          placement=placement) as scorer:
            progress = _progress(ctx, index, len(models))
            result = evaluate_tasks(
                scorer.sequence_log_probs, scorer.tokenizer, tasks, ctx.compile.eval_task,
                limit=ctx.compile.eval_tasks, progress=progress,
            )
        row = result.to_dict() | {"backend": scorer.backend}
        correct[model.label] = row.pop("correct")
        if rows:  # paired with the dense model: the share of tasks both get right or both get wrong
            dense = correct[DENSE_LABEL]["acc_norm"]
            same = sum(a == b for a, b in zip(dense, correct[model.label]["acc_norm"], strict=True))
            row["agreement_with_dense"] = same / len(dense)
        rows[model.label] = row
    result_record = {"task": ctx.compile.eval_task, "file": str(path), "tasks": rows[DENSE_LABEL]["tasks"],
                     "models": rows}
    target = ctx.out_dir / "accuracy.json"
    atomic_write_json(target, result_record | {"correct": correct})
    return {"path": str(target)}, result_record


def _progress(ctx: CompileContext, index: int, models: int):
    """The stage's count over every model's tasks: model `index` of `models` is at `done` of its `total`."""
    if ctx.progress is None:
        return None
    return lambda done, total: ctx.progress(index * total + done, models * total, model=f"{index + 1}/{models}")


def _report(accuracy: dict[str, Any], _images: dict[str, bytes]) -> list[Block]:
    if not accuracy:
        return []
    blocks: list[dict[str, Any]] = [heading(f"Zero-shot accuracy: {accuracy['task']}")]
    if accuracy.get("skipped"):
        return blocks + [paragraph(f"Not measured: {accuracy['skipped']}.")]
    rows = [
        [
            label,
            f"{100 * row['acc_norm']:.2f} ± {100 * row['acc_norm_stderr']:.2f}",
            f"{100 * row['acc']:.2f} ± {100 * row['acc_stderr']:.2f}",
            f"{100 * row['acc_per_token']:.2f}",
            f"{100 * row['agreement_with_dense']:.1f} %" if "agreement_with_dense" in row else "",
            f"{row['seconds']:.0f}",
        ]
        for label, row in accuracy["models"].items()
    ]
    return blocks + [
        {"kind": "p", "text": (
            f"The first {accuracy['tasks']} tasks of `{accuracy['file']}`, scored as lm-evaluation-harness scores "
            "them (acc: log-likelihood of the ending; acc_norm: per character of the ending), plus llama.cpp's "
            "per-token rule; ± one standard error. Agreement: tasks on which the model's acc_norm pick is right "
            "exactly when the dense model's is."
        )},
        table(["model", "acc_norm", "acc", "per-token", "agreement", "seconds"], rows),
    ]


ACCURACY = register_stage(
    StageSpec(
        name="accuracy",
        run=_run,
        order=50,
        report=_report,
        reads=("prune", "heal", "export_onnx", "export_gguf"),
        keyed_by=_keyed_by,
        enabled=lambda ctx: ctx.compile.eval_task is not None,
        writes=("accuracy.json",),
    )
)
