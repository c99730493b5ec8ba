"""Divergence of a model from a reference on the same text windows, as `llama-perplexity --kl-divergence` reports it.

    >>> stats = divergence_statistics(model_logits_fn, reference_logits_fn, windows)
    >>> stats["kld"]["mean"], stats["same_top1"]

Per predicted token: KL(reference || model) of the next-token distributions, whether both pick the same top token,
and Δp, the model's probability of the actual next token minus the reference's. Reported: both perplexities and
their ratio, mean KLD with its standard error and percentiles (max, 99.9, 99, 95, 90, median, 10, 5, 1, min), the
"same top" percentage with its standard error, and Δp's mean, RMS and percentiles. By default every prediction of
each window is scored; `first=seq_len // 2` scores the second half only, as llama-perplexity does (each scored token
then has at least half a window of context; see docs/design-notes.md). Scoring whole windows, the summary also gives
both perplexities over each window's second half (`second_half`), so that one pass reports both protocols.
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
def per_token_divergences(
    candidates: dict[str, LogitsFn],
    reference_fn: LogitsFn,
    windows: torch.Tensor,
    progress: Callable | None = None,
    first: int = 0,
) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """One pass over the windows, the reference's logits computed once per window for every candidate.

    Returns the reference's NLL of each predicted token (positions `first`.. of each window) and, per candidate,
    each token's KLD, same-top-1 flag, Δp, NLL, the reference's NLL and the position in its window of the logit that
    predicted it. Nothing is kept across windows but these.
    """
    reference_nll: list[np.ndarray] = []
    positions = np.tile(np.arange(first, windows.shape[1] - 1, dtype=np.int32), windows.shape[0])
    parts = {name: {"kld": [], "same_top1": [], "delta_p": [], "nll": []} for name in candidates}
    for index in range(windows.shape[0]):
        window = windows[index : index + 1]
        reference = torch.log_softmax(reference_fn(window).float()[0, first:-1], dim=-1)
        targets = window[0, first + 1 :].to(reference.device)[:, None]
        reference_target = reference.gather(-1, targets)[:, 0]
        reference_top1 = reference.argmax(-1)
        reference_nll.append((-reference_target).cpu().numpy())
        for name, logits_fn in candidates.items():
            model = torch.log_softmax(logits_fn(window).float()[0, first:-1], dim=-1).to(reference.device)
            model_target = model.gather(-1, targets)[:, 0]
            values = parts[name]
            values["kld"].append(token_kld(reference, model).cpu().numpy())
            values["same_top1"].append((model.argmax(-1) == reference_top1).cpu().numpy())
            values["delta_p"].append((model_target.exp() - reference_target.exp()).cpu().numpy())
            values["nll"].append((-model_target).cpu().numpy())
            del model
        if progress:
            progress(index + 1, windows.shape[0])
    reference_all = np.concatenate(reference_nll)
    per_candidate = {
        name: {key: np.concatenate(chunks) for key, chunks in values.items()}
        | {"reference_nll": reference_all, "position": positions}
        for name, values in parts.items()
    }
    return reference_all, per_candidate


def per_token_divergence(
    logits_fn: LogitsFn,
    reference_fn: LogitsFn,
    windows: torch.Tensor,
    progress: Callable | None = None,
    first: int = 0,
) -> dict[str, np.ndarray]:
    """Per predicted token of every window (the predictions at positions `first`.. of each window): KLD, same-top-1
    flag, Δp, and both models' log-prob of the target."""
    return per_token_divergences({"model": logits_fn}, reference_fn, windows, progress, first)[1]["model"]


def token_kld(reference_log_probs: torch.Tensor, model_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) per position, from log-probabilities [..., vocab]."""
    return (reference_log_probs.exp() * (reference_log_probs - model_log_probs)).sum(-1).clamp_min(0.0)


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def _percentiles(values: np.ndarray) -> dict[str, float]:
    return {name: float(np.percentile(values, q)) for name, q in PERCENTILES.items()}


def perplexities(per_token: dict[str, np.ndarray], where: np.ndarray | slice = slice(None)) -> dict[str, float]:
    """The model's and the reference's perplexity over the selected tokens, and their ratio."""
    ppl = math.exp(float(per_token["nll"][where].mean(dtype=np.float64)))
    reference_ppl = math.exp(float(per_token["reference_nll"][where].mean(dtype=np.float64)))
    return {"ppl": ppl, "reference_ppl": reference_ppl, "ppl_ratio": ppl / reference_ppl}


def second_half(per_token: dict[str, np.ndarray]) -> np.ndarray | None:
    """The tokens llama-perplexity scores (predicted from a logit at position >= seq_len // 2 of its window), or None
    when the values hold no positions or were already scored from the middle of the window on."""
    position = per_token.get("position")
    if position is None or position.size == 0 or position.min() > 0:
        return None
    return position >= (int(position.max()) + 2) // 2


def summarize(per_token: dict[str, np.ndarray]) -> dict[str, Any]:
    """The statistics llama-perplexity prints, from per-token values."""
    kld, same, delta_p = per_token["kld"], per_token["same_top1"].astype(np.float64), per_token["delta_p"]
    whole = perplexities(per_token)
    half = second_half(per_token)
    return {
        "tokens": int(len(kld)),
        **whole,
        "second_half": None if half is None else perplexities(per_token, half) | {"tokens": int(half.sum())},
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
