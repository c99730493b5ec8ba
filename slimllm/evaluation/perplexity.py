"""Perplexity with the standard protocol.

    >>> from slimllm.evaluation.perplexity import evaluate_model, EvalSettings
    >>> result = evaluate_model(loaded, EvalSettings(data="wiki.test.raw", seq_len=1024, max_windows=24))

Protocol: join the documents with blank lines, tokenize once, cut non-overlapping windows of `seq_len` tokens and
score every predicted token (seq_len - 1 per window). The windows are independent (no context carried over).
The same pass also scores each window's second half alone (the predictions from position seq_len // 2 on), which is
llama-perplexity's protocol: its figures compare with `perplexity_second_half`, not with `perplexity`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from slimllm.core.data import DataPurpose, bos_prefix_id, load_corpus, token_rows, tokenize_corpus
from slimllm.core.device import model_autocast
from slimllm.core.errors import UserInputError
from slimllm.core.placement import input_device
from slimllm.core.progress import Progress


@dataclass(frozen=True)
class EvalSettings:
    """Settings of `slimllm eval`."""

    data: str = "wikitext2"
    """Evaluation text: a hub dataset name (its test split) or a local file."""
    seq_len: int = 2048
    """Tokens per window."""
    max_windows: int | None = None
    """Score only the first N windows (None: all)."""
    batch_size: int = 1
    """Windows per forward pass."""
    task: str | None = None
    """A multiple-choice task to score instead of perplexity: hellaswag (zero-shot accuracy)."""
    task_file: str | None = None
    """The task's file (default: the shared copy, ../shared/data/hellaswag/hellaswag_val_full.txt)."""
    limit: int | None = None
    """Score only N tasks (None: all)."""
    offset: int = 0
    """Skip the first M tasks."""
    kl_reference: str | None = None
    """A reference model (e.g. the dense one): adds KL-divergence statistics on the same windows, as
    llama-perplexity --kl-divergence reports them."""
    kl_second_half: bool = False
    """Score only the second half of each window for the KL statistics, as llama-perplexity does (every scored token
    then has at least half a window of context)."""
    backend: str = "auto"
    """auto (an ONNX export directory runs in onnxruntime, anything else in PyTorch), torch, onnxruntime or llama.cpp
    (a .gguf file, or the GGUF export of a checkpoint)."""

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "torch", "onnxruntime", "llama.cpp"):
            raise UserInputError(f"unknown --backend {self.backend!r}; use one of auto, torch, onnxruntime, llama.cpp")
        if (self.limit is not None and self.limit < 1) or self.offset < 0:
            raise UserInputError("--limit must be at least 1 and --offset at least 0")
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.seq_len < 2 or (self.max_windows is not None and self.max_windows < 1):
            raise UserInputError("--seq-len must be at least 2 and --max-windows at least 1")


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens_scored: int
    windows: int
    seq_len: int
    model: str = ""
    data: str = ""
    data_sha256: str = ""
    seconds: float = 0.0
    perplexity_second_half: float | None = None
    """Over each window's second half only (llama-perplexity's protocol: every scored token has at least half a
    window of context)."""
    tokens_scored_second_half: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def split_windows(
    token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None, bos_id: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows of `seq_len` tokens, shape [n, seq_len]. A trailing partial window is dropped. With
    `bos_id` (`slimllm.core.data.bos_prefix_id`), every window is BOS and the next `seq_len - 1` tokens of the text."""
    if seq_len < 2:
        raise UserInputError(f"--seq-len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise UserInputError(f"--max-windows must be at least 1, got {max_windows}")
    windows = token_rows(token_ids, seq_len, bos_id)
    if windows.shape[0] == 0:
        raise UserInputError(
            f"the evaluation text has {token_ids.numel()} tokens, fewer than one window of {seq_len}; "
            "use a smaller --seq-len or more text"
        )
    return windows if max_windows is None else windows[:max_windows]


"""Called with (windows done, windows total) after every batch."""

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""Maps input ids [b, t] to logits [b, t, vocab]; lets other backends (ONNX, llama.cpp) reuse the protocol."""


def torch_logits_fn(model) -> LogitsFn:
    device = input_device(model)

    def logits(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), model_autocast(model):
            return model(input_ids=input_ids.to(device), use_cache=False).logits

    return logits


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL (fp32) of every predicted token, shape [b, t - 1]: entry j is predicted by the logit at j."""
    targets = input_ids[:, 1:].to(logits.device)
    predicted = logits[:, :-1].float()
    # log Z - logit of the target: one read of the logits, no log-softmax copy (the greedy searches call this often)
    return torch.logsumexp(predicted, dim=-1) - predicted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def causal_lm_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy (in fp32) and the number of predicted tokens."""
    nll = token_nll(logits, input_ids)
    return float(nll.sum(dtype=torch.float64)), nll.numel()


@dataclass
class NllSums:
    """Summed NLL and token counts over whole windows and over each window's second half."""

    whole: float = 0.0
    whole_tokens: int = 0
    second_half: float = 0.0
    second_half_tokens: int = 0


def nll_sums_of_windows(
    logits_fn: LogitsFn, windows: torch.Tensor, batch_size: int = 1, progress: Progress | None = None
) -> NllSums:
    """Token NLLs summed over all windows, whole and from each window's middle on (both protocols in one pass)."""
    sums = NllSums()
    half = windows.shape[1] // 2
    if progress:
        progress(0, windows.shape[0])
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size]
        nll = token_nll(logits_fn(batch), batch)
        sums.whole += float(nll.sum(dtype=torch.float64))
        sums.whole_tokens += nll.numel()
        sums.second_half += float(nll[:, half:].sum(dtype=torch.float64))
        sums.second_half_tokens += nll[:, half:].numel()
        if progress:
            progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    return sums


def perplexity_of_windows(
    logits_fn: LogitsFn, windows: torch.Tensor, batch_size: int = 1, progress: Progress | None = None
) -> tuple[float, int]:
    """Sum of token NLLs over all windows and the count of scored tokens."""
    sums = nll_sums_of_windows(logits_fn, windows, batch_size, progress)
    return sums.whole, sums.whole_tokens


def evaluate_model(loaded, settings: EvalSettings, progress: Progress | None = None) -> PerplexityResult:
    """Perplexity of a loaded model (see `slimllm.models.loading.load_model`) on the settings' text."""
    result = perplexity_on_text(torch_logits_fn(loaded.model), loaded.tokenizer, settings, progress)
    result.model = loaded.source.spec
    return result


def text_windows(tokenizer, settings: EvalSettings):
    """The evaluation windows of the settings' text, and the corpus they were cut from (for its hash)."""
    corpus = load_corpus(settings.data, DataPurpose.EVALUATION)
    ids = tokenize_corpus(corpus, tokenizer)
    return split_windows(ids, settings.seq_len, settings.max_windows, bos_prefix_id(tokenizer)), corpus


def perplexity_on_text(
    logits_fn: LogitsFn, tokenizer, settings: EvalSettings, progress: Progress | None = None
) -> PerplexityResult:
    """Perplexity of any backend's logits on the settings' text (the same windows for every backend)."""
    started = time.perf_counter()
    windows, corpus = text_windows(tokenizer, settings)
    sums = nll_sums_of_windows(logits_fn, windows, settings.batch_size, progress)
    mean_nll = sums.whole / sums.whole_tokens
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        mean_nll=mean_nll,
        tokens_scored=sums.whole_tokens,
        perplexity_second_half=math.exp(sums.second_half / sums.second_half_tokens),
        tokens_scored_second_half=sums.second_half_tokens,
        windows=windows.shape[0],
        seq_len=settings.seq_len,
        data=settings.data,
        data_sha256=corpus.sha256,
        seconds=time.perf_counter() - started,
    )


@dataclass
class ComparisonResult:
    """Quality of one model against a reference on the same windows."""

    perplexity: float
    mean_nll: float
    kl_to_reference: float
    """Mean over tokens of KL(reference || model), in nats."""
    top1_agreement: float
    """Fraction of positions where the model's argmax equals the reference's."""
    tokens_scored: int

    def to_dict(self) -> dict:
        return asdict(self)


def compare_with_reference(
    reference: LogitsFn,
    candidates: dict[str, LogitsFn],
    windows: torch.Tensor,
    progress: Progress | None = None,
) -> tuple[ComparisonResult, dict[str, ComparisonResult]]:
    """Perplexity of the reference and of every candidate, plus each candidate's KL and top-1 agreement.

    One pass over the windows (`slimllm.evaluation.divergence.per_token_divergences`): the reference logits of a
    window are computed once and compared with every candidate's, so no logits are stored across windows.
    """
    from slimllm.evaluation.divergence import per_token_divergences

    if progress:
        progress(0, windows.shape[0])
    reference_nll, per_candidate = per_token_divergences(candidates, reference, windows, progress)

    def result(nll: np.ndarray, kld: float, agreement: float) -> ComparisonResult:
        mean = float(nll.mean(dtype=np.float64))
        return ComparisonResult(math.exp(mean), mean, kld, agreement, int(nll.size))

    return result(reference_nll, 0.0, 1.0), {
        name: result(
            values["nll"],
            float(values["kld"].mean(dtype=np.float64)),
            float(values["same_top1"].mean(dtype=np.float64)),
        )
        for name, values in per_candidate.items()
    }
