"""Checks shared by the ONNX and GGUF exporters: an exported artifact must compute what the checkpoint computes.

    >>> reference = TorchReference.load(Path("out/pruned"))
    >>> report = ParityReport(artifact="out/onnx/model.onnx")
    >>> report.add(compare_logits("prefill", reference.logits(ids), candidate_logits, max_abs=1e-4))
    >>> report.raise_if_failed()          # one ValidationError listing every failed figure

The reference is always plain transformers on the saved checkpoint (no slimllm code in the forward pass), so a bug
in our own model handling cannot hide a bug in an exporter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimllm.core.errors import ValidationError

# Prompts for logits and generation parity: prose, code, digits and punctuation, unicode.
PARITY_PROMPTS: tuple[str, ...] = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n   ",
    "Les élèves ont étudié l'histoire de la ville pendant",
    "Q: What is 17 times 3?\nA:",
)

# A short paragraph for quantized-model perplexity when no evaluation text is given. Written for this purpose.
FALLBACK_EVAL_TEXT = (
    "The river town grew slowly at first. Its earliest houses stood on the eastern bank, where the ground was "
    "higher and the spring floods rarely reached. Merchants brought salt, wool and iron down the valley, and the "
    "ferry that carried them across became the first public service the town paid for. By the end of the "
    "century a stone bridge had replaced the ferry, a market hall stood beside the church, and the population "
    "had passed four thousand. The railway arrived much later. Its engineers chose a route along the western "
    "bank, and within twenty years the station district was larger than the old town. Today the two halves are "
    "joined by three bridges, and the market hall is a museum that tells the story of the crossing.\n\n"
    "A hash table stores values under keys. It computes a number from each key, reduces that number to a slot "
    "in an array, and keeps the value there. When two keys land in the same slot, the table must resolve the "
    "collision, either by keeping a short list in each slot or by probing for the next free one. A good hash "
    "function spreads keys evenly, so that most lookups touch a single slot and finish in constant time. When "
    "the array fills up, the table allocates a larger one and moves every entry, which is expensive but rare.\n\n"
    "To make bread, mix five hundred grams of flour with ten grams of salt, seven grams of yeast and three "
    "hundred and fifty millilitres of warm water. Knead the dough for ten minutes, until it is smooth and "
    "springs back when pressed. Leave it covered for an hour, shape it into a loaf, let it rise again, and bake "
    "it at two hundred and twenty degrees for about thirty-five minutes."
)


@dataclass
class CheckResult:
    """One parity or quality figure with the bound it was held to."""

    name: str
    passed: bool
    metric: str
    value: float | None
    bound: float | None
    details: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.value is None:
            return f"{self.name}: {self.metric}"
        comparison = "<=" if self.metric != "argmax_agreement" and not self.metric.endswith("_min") else ">="
        if self.metric == "ppl_ratio" and self.bound is not None:
            return f"{self.name}: ppl_ratio {self.value:.4g} (bound within [{1 / self.bound:.4g}, {self.bound:.4g}])"
        bound = "" if self.bound is None else f" (bound {comparison} {self.bound:.3g})"
        return f"{self.name}: {self.metric} {self.value:.4g}{bound}"


@dataclass
class ParityReport:
    """Every check run on one artifact; `raise_if_failed` reports all failures at once."""

    artifact: str
    checks: list[CheckResult] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    """Provider or backend actually used, dtype, versions: whatever makes the figures reproducible."""
    warnings: list[str] = field(default_factory=list)

    def add(self, *checks: CheckResult) -> None:
        self.checks.extend(checks)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failures(self) -> list[CheckResult]:
        return [check for check in self.checks if not check.passed]

    def raise_if_failed(self, what: str = "parity check") -> None:
        failed = self.failures()
        if failed:
            raise ValidationError(f"{what} failed for {self.artifact}", [check.describe() for check in failed])

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact,
            "passed": self.passed,
            "checks": [asdict(check) for check in self.checks],
            "context": self.context,
            "warnings": self.warnings,
        }


def _as_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def compare_logits(
    name: str,
    reference: np.ndarray | torch.Tensor,
    candidate: np.ndarray | torch.Tensor,
    max_abs: float,
    min_argmax_agreement: float | None = None,
    mask: np.ndarray | torch.Tensor | None = None,
    relative: float = 0.0,
    exact: np.ndarray | None = None,
    noise_multiple: float = 0.0,
) -> CheckResult:
    """Max and mean |Δ| between two logits arrays [..., vocab], over the positions `mask` keeps.

    The bound is `max_abs + relative * max|reference|` (numpy's allclose form), plus, with `exact` (the same
    reference computed in float64 on the same inputs), `noise_multiple` times the reference's own fp32 error
    max|reference - exact|: an fp32 export cannot be held closer to the fp32 reference than the reference is to the
    exact result, and that error differs from input to input (see `float64_compute`).
    """
    ref = _as_numpy(reference)
    cand = _as_numpy(candidate)
    if ref.shape != cand.shape:
        return CheckResult(name, False, f"shape mismatch {cand.shape} vs reference {ref.shape}", None, None)
    exact = np.asarray(exact, dtype=np.float64) if exact is not None else None
    if mask is not None:
        keep = np.asarray(_as_numpy(mask) if isinstance(mask, torch.Tensor) else mask).astype(bool)
        ref, cand = ref[keep], cand[keep]
        exact = exact[keep] if exact is not None else None
    ref = ref.reshape(-1, ref.shape[-1])
    cand = cand.reshape(-1, cand.shape[-1])
    if not np.isfinite(cand).all():
        return CheckResult(name, False, "non-finite logits", None, None)
    delta = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
    max_delta = float(delta.max())
    agreement = float((ref.argmax(-1) == cand.argmax(-1)).mean())
    reference_abs_max = float(np.abs(ref).max())
    noise = float(np.abs(ref - exact.reshape(ref.shape)).max()) if exact is not None else None
    bound = max_abs + relative * reference_abs_max + noise_multiple * (noise or 0.0)
    passed = max_delta <= bound
    if min_argmax_agreement is not None:
        passed = passed and agreement >= min_argmax_agreement
    return CheckResult(
        name,
        passed,
        "max_abs_logits",
        max_delta,
        bound,
        {
            "mean_abs": float(delta.mean()),
            "argmax_agreement": agreement,
            "min_argmax_agreement": min_argmax_agreement,
            "positions": int(ref.shape[0]),
            "reference_abs_max": reference_abs_max,
            "atol": max_abs,
            "rtol": relative,
            "reference_fp32_error": noise,
            "noise_multiple": noise_multiple if noise is not None else None,
        },
    )


@contextlib.contextmanager
def float64_compute(model: torch.nn.Module) -> Iterator[None]:
    """Run `model` in float64 inside the block without holding a float64 copy of it: each module's own parameters
    and buffers are swapped for float64 copies while it runs, and the original tensors put back afterwards (so the
    model is bit-for-bit unchanged). Its outputs then approximate the exact result to about 1e-16 relative, which is
    what measures the fp32 reference's own rounding error on the same inputs."""
    handles = []

    def to_float64(module, _args):
        module._slimllm_fp32 = {**module._parameters, **module._buffers}
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is not None and tensor.is_floating_point():
                    store[key] = tensor.detach().double()

    def restore(module, _args, _output):
        saved = module.__dict__.pop("_slimllm_fp32")
        for store in (module._parameters, module._buffers):
            for key in store:
                store[key] = saved[key]

    for module in model.modules():
        if any(t is not None for t in (*module._parameters.values(), *module._buffers.values())):
            handles += [module.register_forward_pre_hook(to_float64), module.register_forward_hook(restore)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tokens_check(name: str, expected: Sequence[int], actual: Sequence[int], **details: Any) -> CheckResult:
    """Two token sequences must be identical; the first difference is recorded."""
    expected, actual = [int(t) for t in expected], [int(t) for t in actual]
    first_difference = next(
        (i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
        None if len(expected) == len(actual) else min(len(expected), len(actual)),
    )
    passed = first_difference is None
    return CheckResult(
        name,
        passed,
        "identical tokens" if passed else f"tokens differ from position {first_difference}",
        None,
        None,
        {"expected": expected, "actual": actual, "first_difference": first_difference, **details},
    )


def perplexity_check(name: str, reference_ppl: float, candidate_ppl: float, max_ratio: float) -> CheckResult:
    """Candidate perplexity over reference perplexity must lie within [1/max_ratio, max_ratio].

    Two-sided: an export that scores far *better* than its source is as suspicious as one that scores worse.
    """
    ratio = candidate_ppl / reference_ppl if reference_ppl > 0 else math.inf
    passed = math.isfinite(candidate_ppl) and 1.0 / max_ratio <= ratio <= max_ratio
    return CheckResult(
        name,
        passed,
        "ppl_ratio",
        ratio,
        max_ratio,
        {"reference_ppl": reference_ppl, "candidate_ppl": candidate_ppl},
    )


def tokenizer_samples(tokenizer, texts: Sequence[str] = ()) -> list[tuple[str, str, bool]]:
    """(name, text, add_special_tokens) samples: plain text both ways, special-token text and a chat rendering."""
    samples: list[tuple[str, str, bool]] = []
    base = list(texts) or list(PARITY_PROMPTS)
    for index, text in enumerate(base):
        samples.append((f"text[{index}]", text, True))
        samples.append((f"text[{index}] no-special", text, False))
    specials = [t for t in (tokenizer.bos_token, tokenizer.eos_token) if t]
    if specials:
        samples.append(("special tokens in text", f"{specials[0]}Hello{specials[-1]} world {specials[0]}", False))
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name three rivers in Europe."},
                {"role": "assistant", "content": "The Danube, the Rhine and the Loire."},
            ],
            tokenize=False,
        )
        samples.append(("chat template", rendered, False))
    return samples


def hf_token_ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def left_padded_batch(tokenizer, prompts: Sequence[str], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask of a left-padded batch (decoder-only generation pads on the left)."""
    encoded = [hf_token_ids(tokenizer, prompt, True) for prompt in prompts]
    width = max(len(ids) for ids in encoded)
    ids = np.full((len(encoded), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(encoded), width), dtype=np.int64)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens) :] = tokens
        mask[row, width - len(tokens) :] = 1
    return ids, mask


def position_ids_from_mask(mask: np.ndarray, past_length: int = 0) -> np.ndarray:
    """Positions as transformers' generate computes them: cumulative count of real tokens, padding at 0."""
    positions = np.cumsum(mask, axis=-1) - 1
    positions = np.where(mask == 0, 1, positions)
    return positions[:, past_length:].astype(np.int64)


class TorchReference:
    """The checkpoint in plain transformers (fp32 on CPU by default): the reference every export is held to."""

    def __init__(self, model, tokenizer, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device

    @classmethod
    def load(
        cls,
        checkpoint_dir: Path,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        full_attention: bool = False,
    ) -> TorchReference:
        """`full_attention` turns a sliding attention window off (the model an export without one computes)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from slimllm.models.architectures import without_sliding_window
        from slimllm.models.attention_free import read_config

        config = read_config(str(checkpoint_dir))
        if full_attention:
            config = without_sliding_window(config)
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), config=config, dtype=dtype)
        model = model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, torch.device(device))

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else 0)

    @torch.no_grad()
    def forward(
        self, ids: np.ndarray, mask: np.ndarray | None = None, past=None, past_length: int = 0
    ) -> tuple[np.ndarray, Any]:
        """Logits (fp32 numpy) and the new KV cache for `ids` after `past_length` cached tokens."""
        logits, past = self._forward(ids, mask, past, past_length)
        return logits.float().cpu().numpy(), past

    @torch.no_grad()
    def forward_exact(
        self, ids: np.ndarray, mask: np.ndarray | None = None, past=None, past_length: int = 0
    ) -> tuple[np.ndarray, Any]:
        """`forward` computed in float64 (logits as float64 numpy; its own KV cache): the exact result the fp32
        reference approximates."""
        with float64_compute(self.model):
            logits, past = self._forward(ids, mask, past, past_length)
        return logits.double().cpu().numpy(), past

    def _forward(self, ids: np.ndarray, mask: np.ndarray | None, past, past_length: int):
        input_ids = torch.as_tensor(ids, device=self.device)
        if mask is None:
            mask = np.ones((ids.shape[0], past_length + ids.shape[1]), dtype=np.int64)
        attention_mask = torch.as_tensor(mask, device=self.device)
        position_ids = torch.as_tensor(position_ids_from_mask(mask, past_length), device=self.device)
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=True,
        )
        return output.logits, output.past_key_values

    @torch.no_grad()
    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """New tokens from transformers' own `generate` (greedy; EOS suppressed so the length is fixed)."""
        input_ids = torch.tensor([list(prompt_ids)], device=self.device)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
        )
        return output[0, input_ids.shape[1] :].tolist()

    def logits_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        from slimllm.evaluation.perplexity import torch_logits_fn

        return torch_logits_fn(self.model)


def past_window_length(window: int) -> int:
    """Tokens of text that checks past a sliding attention window use: twice the window, at least 256 beyond it."""
    return max(2 * window, window + 256)


def long_window(tokenizer, data: str | None, length: int) -> tuple[torch.Tensor, str]:
    """One window of `length` tokens (shape [1, length]) from a text source; without one, the built-in paragraph
    repeated as often as the length needs (checks past a sliding window need more text than it holds)."""
    if data is not None:
        return eval_windows(tokenizer, data, length, 1)
    from slimllm.core.data import bos_prefix_id
    from slimllm.evaluation.perplexity import split_windows

    repeats = 1 + length // max(1, len(FALLBACK_EVAL_TEXT.split()))
    ids = tokenizer(" ".join([FALLBACK_EVAL_TEXT] * repeats), return_tensors="pt", verbose=False)["input_ids"][0]
    return split_windows(ids, length, 1, bos_prefix_id(tokenizer)), "built-in paragraph (repeated)"


def eval_windows(tokenizer, data: str | None, seq_len: int, max_windows: int) -> tuple[torch.Tensor, str]:
    """Evaluation windows from a text source, or from the built-in paragraph when `data` is None."""
    from slimllm.core.data import DataPurpose, bos_prefix_id, load_corpus, tokenize_corpus
    from slimllm.evaluation.perplexity import split_windows

    bos_id = bos_prefix_id(tokenizer)
    if data is None:
        ids = tokenizer(FALLBACK_EVAL_TEXT, return_tensors="pt", verbose=False)["input_ids"][0]
        seq_len = min(seq_len, ids.numel())
        return split_windows(ids, seq_len, max_windows, bos_id), "built-in paragraph"
    corpus = load_corpus(data, DataPurpose.EVALUATION)
    return split_windows(tokenize_corpus(corpus, tokenizer), seq_len, max_windows, bos_id), data


def perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor) -> float:
    from slimllm.evaluation.perplexity import perplexity_of_windows

    nll, tokens = perplexity_of_windows(logits_fn, windows)
    return math.exp(nll / tokens)
