"""Zero-shot multiple-choice accuracy, scored as lm-evaluation-harness scores it, on any backend.

    >>> log_probs = torch_shared_prefix_log_probs(model, pad_token_id(tokenizer))  # slimllm.evaluation.sequence_scoring
    >>> result = evaluate_tasks(log_probs, tokenizer, read_task("hellaswag"), limit=1000)
    >>> result.acc_norm, result.acc_norm_stderr

Each ending is scored by the log-likelihood of its tokens given the context: the pair is tokenized as a whole and
the context's tokens are split off the front (lm-evaluation-harness's `_encode_pair`), and the ending is the
continuation " <ending>". `acc` picks the ending with the highest sum of log-probabilities, `acc_norm` the highest
sum divided by the ending's length in characters (`len(choice)`, the space before it not counted), and
`acc_per_token` the highest mean log-probability of the tokens after the prefix that the four tokenized sequences
share (the rule of llama.cpp's `llama-perplexity --hellaswag`, which also leaves shared leading words of the
endings unscored). The four sequences of a task are scored together, several tasks per forward pass
(`slimllm.evaluation.sequence_scoring`): in PyTorch the tasks are packed into one sequence, each shared prefix
once; other backends score the whole sequences (llama.cpp: each prefix once, the endings on its cache). Standard
errors are the sample standard deviation over tasks divided by sqrt(n), as lm-evaluation-harness reports them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from slimllm.core.errors import UserInputError
from slimllm.core.progress import Progress
from slimllm.evaluation.sequence_scoring import SequenceGroup, SequenceLogProbs, shared_prefix_length
from slimllm.evaluation.tasks import MultipleChoiceTask

RULES = ("acc", "acc_norm", "acc_per_token")


@dataclass
class TaskScores:
    """Per-ending scores of one task."""

    sums: list[float]
    """lm-evaluation-harness: log-likelihood of the continuation " <ending>" given the context."""
    tokens: list[int]
    """Tokens of each continuation."""
    ending_lengths: list[int]
    """Characters of each ending, without the space before it (lm-evaluation-harness's `len(choice)`)."""
    ending_means: list[float]
    """llama.cpp: mean log-probability of the tokens after the prefix the four sequences share."""
    sequence_tokens: int = 0
    """Tokens run through the model for this task (context + ending, every ending)."""

    def pick(self, rule: str) -> int:
        if rule == "acc":
            values = self.sums
        elif rule == "acc_norm":
            values = [s / n for s, n in zip(self.sums, self.ending_lengths, strict=True)]
        else:
            values = self.ending_means
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


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@dataclass(frozen=True)
class EncodedTask:
    """A task's four sequences context + " " + ending, and where each rule's scored tokens start."""

    group: SequenceGroup
    context_lengths: list[int]
    """lm-evaluation-harness: tokens of the context in each sequence (the continuation follows)."""
    ending_lengths: list[int]


def encode_task(tokenizer, task: MultipleChoiceTask) -> EncodedTask:
    pairs = [encode_pair(tokenizer, task.context, " " + ending) for ending in task.endings]
    sequences = [context + ending for context, ending in pairs]
    shared = shared_prefix_length(sequences)
    contexts = [len(context) for context, _ in pairs]
    score_from = max(1, min(min(contexts), shared))
    return EncodedTask(
        SequenceGroup(sequences, shared, score_from), contexts, [len(ending) for ending in task.endings]
    )


def task_scores(encoded: EncodedTask, values: list[torch.Tensor]) -> TaskScores:
    """Both rules' scores from the log-probs of tokens `score_from`.. of each sequence."""
    group = encoded.group
    sums, means = [], []
    for context, scores in zip(encoded.context_lengths, values, strict=True):
        sums.append(float(scores[max(context, 1) - group.score_from :].sum()))
        means.append(float(scores[max(group.shared, 1) - group.score_from :].mean()))
    return TaskScores(
        sums,
        [len(s) - c for s, c in zip(group.sequences, encoded.context_lengths, strict=True)],
        encoded.ending_lengths,
        means,
        sum(len(s) for s in group.sequences),
    )


def score_task(log_probs_fn: SequenceLogProbs, tokenizer, task: MultipleChoiceTask) -> TaskScores:
    """Both rules' scores of each ending of one task."""
    encoded = encode_task(tokenizer, task)
    return task_scores(encoded, log_probs_fn([encoded.group])[0])


def _longest_rest(encoded: EncodedTask) -> int:
    return max(len(s) for s in encoded.group.sequences) - encoded.group.shared


def _mean_and_stderr(values: Sequence[int]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def evaluate_tasks(
    log_probs_fn: SequenceLogProbs,
    tokenizer,
    tasks: Sequence[MultipleChoiceTask],
    task_name: str = "hellaswag",
    limit: int | None = None,
    offset: int = 0,
    progress: Progress | None = None,
    tasks_per_batch: int = 4,
) -> AccuracyResult:
    """acc, acc_norm and acc_per_token over `tasks[offset : offset + limit]`."""
    chosen = list(tasks[offset : offset + limit if limit is not None else None])
    if not chosen:
        raise UserInputError(f"no tasks left after --offset {offset} (the file has {len(tasks)}); lower --offset")
    correct: dict[str, list[int]] = {rule: [0] * len(chosen) for rule in RULES}
    started = time.perf_counter()
    tokens = 0
    encoded = [encode_task(tokenizer, task) for task in chosen]
    # Tasks of similar lengths share a forward pass, so that little of it is padding; results keep the file's order.
    order = sorted(range(len(chosen)), key=lambda i: (encoded[i].group.shared, _longest_rest(encoded[i])))
    for start in range(0, len(order), tasks_per_batch):
        batch = order[start : start + tasks_per_batch]
        for index, values in zip(batch, log_probs_fn([encoded[i].group for i in batch]), strict=True):
            scores = task_scores(encoded[index], values)
            tokens += scores.sequence_tokens
            for rule in correct:
                correct[rule][index] = int(scores.pick(rule) == chosen[index].label)
        if progress:
            progress(start + len(batch), len(chosen))
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
