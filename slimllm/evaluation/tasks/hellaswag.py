"""HellaSwag in llama.cpp's plain-text layout (what `llama-perplexity --hellaswag` reads), 6 lines a task:

    <activity_label>: <ctx>
    <label, 0-3>
    <ending 0> ... <ending 3>
"""

from __future__ import annotations

from pathlib import Path

from slimllm.core.errors import UserInputError
from slimllm.evaluation.tasks import MultipleChoiceTask, TaskFormat, register_task

LINES_PER_TASK = 6


def read_hellaswag(path: Path) -> list[MultipleChoiceTask]:
    """Every task of the file; a malformed file is one error naming the line to fix."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise UserInputError(f"{path} holds no tasks")
    if len(lines) % LINES_PER_TASK:
        complete = len(lines) // LINES_PER_TASK * LINES_PER_TASK
        raise UserInputError(
            f"{path}: {len(lines)} lines is not a whole number of {LINES_PER_TASK}-line tasks; the task starting at "
            f"line {complete + 1} is incomplete (each task: context, label 0-3, four endings)"
        )
    tasks = []
    for start in range(0, len(lines), LINES_PER_TASK):
        context, label, *endings = lines[start : start + LINES_PER_TASK]
        if label.strip() not in ("0", "1", "2", "3"):
            raise UserInputError(f"{path}: line {start + 2} should be the label 0-3 of the task at line "
                                 f"{start + 1}, got {label.strip()!r}")
        tasks.append(MultipleChoiceTask(context.strip(), tuple(e.strip() for e in endings), int(label)))
    return tasks


HELLASWAG = register_task(
    TaskFormat(
        name="hellaswag",
        description="HellaSwag (Zellers et al. 2019): pick the plausible ending of an activity description.",
        reader=read_hellaswag,
        default_file="hellaswag/hellaswag_val_full.txt",
    )
)
