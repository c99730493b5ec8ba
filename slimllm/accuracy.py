"""Zero-shot multiple-choice accuracy, scored as lm-evaluation-harness scores it, on any backend.

    >>> result = evaluate_tasks(torch_logits_fn(model), tokenizer, read_task("hellaswag"), limit=1000)
    >>> result.acc_norm, result.acc_norm_stderr

Each ending is scored by the log-likelihood of its tokens given the context: the pair is tokenized as a whole and
the context's tokens are split off the front (lm-evaluation-harness's `_encode_pair`), and the ending is the
continuation " <ending>". `acc` picks the ending with the highest sum of log-probabilities, `acc_norm` the highest
sum divided by the continuation's length in UTF-8 bytes, and `acc_per_token` the highest mean per token (the rule
of llama.cpp's `llama-perplexity --hellaswag`). The four endings of a task are scored in one batched forward pass
(right-padded, so padding never precedes a scored token). Standard errors are the sample standard deviation over
tasks divided by sqrt(n), as lm-evaluation-harness reports them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from slimllm.errors import UserInputError
from slimllm.tasks import MultipleChoiceTask

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[..., None]


@dataclass
class TaskScores:
    """Per-ending scores of one task."""

    sums: list[float]
    tokens: list[int]
    """Tokens of each ending."""
    byte_lengths: list[int]
    """UTF-8 bytes of each continuation (" " + ending)."""
    sequence_tokens: int = 0
    """Tokens run through the model for this task (context + ending, every ending)."""

    def pick(self, rule: str) -> int:
        if rule == "acc":
            values = self.sums
        elif rule == "acc_norm":
            values = [s / b for s, b in zip(self.sums, self.byte_lengths, strict=True)]
        else:
            values = [s / t for s, t in zip(self.sums, self.tokens, strict=True)]
        return max(range(len(values)), key=lambda i: (values[i], -i))


@dataclass
class AccuracyResult:
    task: str
    tasks: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    acc_per_token: float
    """llama.cpp's rule: the highest mean log-probability per ending token."""
    acc_per_token_stderr: float
    seconds: float
    tokens: int
    """Tokens run through the model (all four sequences of every task)."""
    offset: int = 0
    correct: dict[str, list[int]] = field(default_factory=dict)
    """Per rule, 1/0 for every task in order (for paired comparisons between models)."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"tokens_per_second": self.tokens_per_second}


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids such that context + continuation tokenizes as the whole text."""
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
    cut = len(context_ids)
    while cut > 0 and whole[:cut] != context_ids[:cut]:  # a merge across the boundary: split where they agree
        cut -= 1
    return whole[:cut], whole[cut:]


@torch.no_grad()
def score_task(logits_fn: LogitsFn, tokenizer, task: MultipleChoiceTask, pad_id: int) -> TaskScores:
    """Log-likelihood of each ending given the context, all endings in one right-padded batch."""
    pairs = [encode_pair(tokenizer, task.context, " " + ending) for ending in task.endings]
    sequences = [context + ending for context, ending in pairs]
    width = max(len(s) for s in sequences)
    batch = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = torch.tensor(sequence)
    log_probs = torch.log_softmax(logits_fn(batch).float(), dim=-1)
    sums = []
    for row, (context, ending) in enumerate(pairs):
        positions = torch.arange(len(context) - 1, len(context) + len(ending) - 1)
        targets = torch.tensor(ending)
        sums.append(float(log_probs[row, positions, targets].sum()))
    return TaskScores(
        sums,
        [len(ending) for _, ending in pairs],
        [len((" " + e).encode("utf-8")) for e in task.endings],
        sum(len(s) for s in sequences),
    )


def _mean_and_stderr(values: Sequence[int]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def evaluate_tasks(
    logits_fn: LogitsFn,
    tokenizer,
    tasks: Sequence[MultipleChoiceTask],
    task_name: str = "hellaswag",
    limit: int | None = None,
    offset: int = 0,
    progress: Progress | None = None,
) -> AccuracyResult:
    """acc, acc_norm and acc_per_token over `tasks[offset : offset + limit]`."""
    chosen = list(tasks[offset : offset + limit if limit is not None else None])
    if not chosen:
        raise UserInputError(f"no tasks left after --offset {offset} (the file has {len(tasks)}); lower --offset")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    correct: dict[str, list[int]] = {"acc": [], "acc_norm": [], "acc_per_token": []}
    started = time.perf_counter()
    tokens = 0
    for index, task in enumerate(chosen):
        scores = score_task(logits_fn, tokenizer, task, pad_id)
        tokens += scores.sequence_tokens
        for rule in correct:
            correct[rule].append(int(scores.pick(rule) == task.label))
        if progress:
            progress(index + 1, len(chosen))
    seconds = time.perf_counter() - started
    stats = {rule: _mean_and_stderr(values) for rule, values in correct.items()}
    return AccuracyResult(
        task=task_name,
        tasks=len(chosen),
        acc=stats["acc"][0],
        acc_stderr=stats["acc"][1],
        acc_norm=stats["acc_norm"][0],
        acc_norm_stderr=stats["acc_norm"][1],
        acc_per_token=stats["acc_per_token"][0],
        acc_per_token_stderr=stats["acc_per_token"][1],
        seconds=seconds,
        tokens=tokens,
        offset=offset,
        correct=correct,
    )
