"""Divergence of a model from a reference on the same text windows, as `llama-perplexity --kl-divergence` reports it.

    >>> stats = divergence_statistics(model_logits_fn, reference_logits_fn, windows)
    >>> stats["kld"]["mean"], stats["same_top1"]

Per predicted token: KL(reference || model) of the next-token distributions, whether both pick the same top token,
and Δp, the model's probability of the actual next token minus the reference's. Reported: both perplexities and
their ratio, mean KLD with its standard error and percentiles (max, 99.9, 99, 95, 90, median, 10, 5, 1, min), the
"same top" percentage with its standard error, and Δp's mean, RMS and percentiles. By default every prediction of
each window is scored; `first=seq_len // 2` scores the second half only, as llama-perplexity does (each scored token
then has at least half a window of context; see docs/design-notes.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
PERCENTILES = {"max": 100.0, "99.9%": 99.9, "99%": 99.0, "95%": 95.0, "90%": 90.0, "median": 50.0, "10%": 10.0,
               "5%": 5.0, "1%": 1.0, "min": 0.0}


@torch.no_grad()
def per_token_divergence(
    logits_fn: LogitsFn,
    reference_fn: LogitsFn,
    windows: torch.Tensor,
    progress: Callable | None = None,
    first: int = 0,
) -> dict[str, np.ndarray]:
    """Per predicted token of every window (the predictions at positions `first`.. of each window): KLD, same-top-1
    flag, Δp, and both models' log-prob of the target."""
    parts: dict[str, list[np.ndarray]] = {"kld": [], "same_top1": [], "delta_p": [], "nll": [], "reference_nll": []}
    for index in range(windows.shape[0]):
        window = windows[index : index + 1]
        targets = window[0, first + 1 :]
        model = torch.log_softmax(logits_fn(window).float()[0, first:-1], dim=-1)
        reference = torch.log_softmax(reference_fn(window).float()[0, first:-1], dim=-1)
        kld = token_kld(reference, model)
        model_target = model.gather(-1, targets[:, None])[:, 0]
        reference_target = reference.gather(-1, targets[:, None])[:, 0]
        parts["kld"].append(kld.numpy())
        parts["same_top1"].append((model.argmax(-1) == reference.argmax(-1)).numpy())
        parts["delta_p"].append((model_target.exp() - reference_target.exp()).numpy())
        parts["nll"].append((-model_target).numpy())
        parts["reference_nll"].append((-reference_target).numpy())
        if progress:
            progress(index + 1, windows.shape[0])
    return {key: np.concatenate(values) for key, values in parts.items()}


def token_kld(reference_log_probs: torch.Tensor, model_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) per position, from log-probabilities [..., vocab]."""
    return (reference_log_probs.exp() * (reference_log_probs - model_log_probs)).sum(-1).clamp_min(0.0)


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def _percentiles(values: np.ndarray) -> dict[str, float]:
    return {name: float(np.percentile(values, q)) for name, q in PERCENTILES.items()}


def summarize(per_token: dict[str, np.ndarray]) -> dict[str, Any]:
    """The statistics llama-perplexity prints, from per-token values."""
    kld, same, delta_p = per_token["kld"], per_token["same_top1"].astype(np.float64), per_token["delta_p"]
    ppl = math.exp(float(per_token["nll"].mean()))
    reference_ppl = math.exp(float(per_token["reference_nll"].mean()))
    return {
        "tokens": int(len(kld)),
        "ppl": ppl,
        "reference_ppl": reference_ppl,
        "ppl_ratio": ppl / reference_ppl,
        "kld": {"mean": float(kld.mean()), "stderr": _stderr(kld), **_percentiles(kld)},
        "same_top1": {"mean": float(same.mean()), "stderr": _stderr(same)},
        "delta_p": {
            "mean": float(delta_p.mean()),
            "stderr": _stderr(delta_p),
            "rms": float(np.sqrt((delta_p**2).mean())),
            **_percentiles(delta_p),
        },
    }


def divergence_statistics(
    logits_fn: LogitsFn,
    reference_fn: LogitsFn,
    windows: torch.Tensor,
    progress: Callable | None = None,
    first: int = 0,
) -> dict[str, Any]:
    return summarize(per_token_divergence(logits_fn, reference_fn, windows, progress, first)) | {"first_scored": first}
