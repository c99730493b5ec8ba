"""GGUF export of a (pruned) checkpoint, validated in llama.cpp against PyTorch.

    >>> result = export_gguf(Path("out/pruned"), Path("out/gguf"), GgufExportSettings(outtypes=["f32", "q4_k_m"]))
    >>> sorted(result.files)
    ['pruned-F32.gguf', 'pruned-Q4_K_M.gguf']

F32/F16/BF16/Q8_0/Q4_0 are written by gguf-py; K-quants are made by llama.cpp's own quantizer from an F32 file.
Every file is then loaded in llama.cpp (llama-cpp-python) and checked: identical token ids to the Hugging Face
tokenizer, logits against PyTorch (F32), and perplexity against PyTorch within a bound per type. All files are
written into a temporary directory beside the target, which is renamed only when every file passes; a failed
export is kept as `<target>.failed` with its `validation.json`.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimllm.core.artifacts import atomic_directory, atomic_write_json, library_versions, plain
from slimllm.core.errors import UserInputError, parse_choice
from slimllm.evaluation.perplexity import causal_lm_loss_sum
from slimllm.exporters.checkpoint import CheckpointInfo, inspect_checkpoint
from slimllm.exporters.gguf_writer import GgufType, quantize_with_llama_cpp, write_gguf
from slimllm.exporters.llama_cpp_runner import LlamaCppModel, import_llama_cpp
from slimllm.exporters.parity import (
    FALLBACK_EVAL_TEXT,
    PARITY_PROMPTS,
    CheckResult,
    ParityReport,
    TorchReference,
    compare_logits,
    eval_windows,
    hf_token_ids,
    long_window,
    past_window_length,
    perplexity_check,
    tokenizer_samples,
    tokens_check,
)
from slimllm.exporters.records import EXPORT_RECORD_FILE, VALIDATION_FILE


@dataclass(frozen=True)
class GgufTolerance:
    max_ppl_ratio: float
    """Perplexity in llama.cpp over PyTorch's must lie within [1/r, r]."""
    max_abs_logits: float | None = None
    """Bound on |Δlogits| on the parity prompts (F32 only: other types are judged on perplexity)."""
    min_argmax_agreement: float = 0.0
    """Share of evaluation positions where llama.cpp's argmax equals PyTorch's."""


# F32 differs from PyTorch only in summation order. F16/BF16 round every weight; Q8_0 costs about 1 %; 4-bit and
# smaller types cost much more on 100M-parameter models than on 7B ones. Measured on the pruned SmolLM2-135M
# (8 x 512 tokens of WikiText-2), perplexity ratio and argmax agreement with PyTorch: F32 1.0000 / 100 %,
# F16 1.0001 / 99.8 %, Q8_0 1.011 / 93.5 %, Q4_K_M 1.032 / 81.1 % (its 576-wide rows fall back to Q5_0),
# Q4_0 1.42 / 57.7 % (bit-identical to llama.cpp's own Q4_0 of the same F32 file). Perplexity alone cannot see a
# wrong attention pattern on a model with weak predictions, so every type is also held to an argmax bound, over the
# half of the positions where PyTorch is most decided. On a random-weight test model (256 wide) that agreement is
# 100 % for F16/BF16/Q8_0 but only 26 % (Q4_0) and 35 % (Q4_K_M): 4-bit noise exceeds the margins of a model that
# predicts nothing, so the 4-bit-and-below bounds are set for such weak models and are loose for real ones.
TOLERANCES: dict[GgufType, GgufTolerance] = {
    GgufType.F32: GgufTolerance(1.005, max_abs_logits=0.02, min_argmax_agreement=0.995),
    GgufType.F16: GgufTolerance(1.01, min_argmax_agreement=0.97),
    GgufType.BF16: GgufTolerance(1.03, min_argmax_agreement=0.90),
    GgufType.Q8_0: GgufTolerance(1.02, min_argmax_agreement=0.85),
    GgufType.Q6_K: GgufTolerance(1.05, min_argmax_agreement=0.60),
    GgufType.Q5_K_M: GgufTolerance(1.10, min_argmax_agreement=0.40),
    GgufType.Q5_K_S: GgufTolerance(1.10, min_argmax_agreement=0.40),
    GgufType.Q4_0: GgufTolerance(1.60, min_argmax_agreement=0.20),
    GgufType.Q4_K_M: GgufTolerance(1.25, min_argmax_agreement=0.25),
    GgufType.Q4_K_S: GgufTolerance(1.35, min_argmax_agreement=0.20),
    GgufType.Q3_K_M: GgufTolerance(1.80, min_argmax_agreement=0.15),
    GgufType.Q2_K: GgufTolerance(3.00, min_argmax_agreement=0.10),
}


@dataclass
class GgufExportSettings:
    """Settings of `slimllm export --target gguf`."""

    outtypes: list[GgufType] = field(default_factory=lambda: [GgufType.F16])
    """Output types; one file each: f32, f16, bf16, q8_0, q4_0 (gguf-py) and K-quants such as q4_k_m (llama.cpp)."""
    eval_data: str | None = None
    """Text for the perplexity checks and tokenizer comparison; None uses a built-in paragraph."""
    eval_seq_len: int = 512
    """Tokens per perplexity window (also the llama.cpp context used for validation)."""
    eval_windows: int = 8
    """Perplexity windows scored per file."""
    tokenizer_lines: int = 200
    """Lines of the evaluation text whose token ids must match the Hugging Face tokenizer exactly."""
    generate_tokens: int = 32
    """Greedy tokens generated in llama.cpp and shown next to PyTorch's."""
    threads: int | None = None
    """llama.cpp threads for validation and quantization (None: llama.cpp's default)."""
    allow_full_attention: bool = False
    """Export a sliding-window model that llama.cpp's graph for its architecture runs with full attention."""

    def __post_init__(self) -> None:
        if isinstance(self.outtypes, (str, GgufType)):
            self.outtypes = [self.outtypes]
        # `--outtype f16,q8_0 --outtype q4_k_m` and `outtypes = ["f16,q8_0"]` both mean three types.
        self.outtypes = [
            part.strip() if isinstance(value, str) else value
            for value in self.outtypes
            for part in (value.split(",") if isinstance(value, str) else [value])
            if not isinstance(part, str) or part.strip()
        ]
        self.outtypes = list(
            dict.fromkeys(
                parse_choice(GgufType, t.value if isinstance(t, GgufType) else str(t).lower(), "--outtype")
                for t in self.outtypes
            )
        )
        if not self.outtypes:
            raise UserInputError("give at least one --outtype")
        if self.eval_seq_len < 16 or self.eval_windows < 1 or self.tokenizer_lines < 0 or self.generate_tokens < 1:
            raise UserInputError("eval_seq_len >= 16, eval_windows >= 1, tokenizer_lines >= 0, generate_tokens >= 1")


@dataclass
class GgufExportResult:
    out_dir: Path
    files: dict[str, dict[str, Any]]
    """File name -> {type, bytes, ppl, ppl_ratio, ...}."""
    validation: dict[str, Any]
    seconds: dict[str, float]
    greedy_samples: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["out_dir"] = str(self.out_dir)
        return payload

    def path_of(self, outtype: GgufType | str) -> Path:
        label = (outtype if isinstance(outtype, GgufType) else GgufType(str(outtype).lower())).label
        for name, info in self.files.items():
            if info["type"] == label:
                return self.out_dir / name
        raise KeyError(label)


def gguf_file_name(checkpoint: CheckpointInfo, outtype: GgufType) -> str:
    """`<checkpoint name>-<TYPE>.gguf`; a cached dequantized model is named after what it was made from."""
    name = checkpoint.path.name
    source = checkpoint.path / "slimllm_source.json"
    if source.is_file():
        name = json.loads(source.read_text()).get("embedded") or name
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"
    return f"{base}-{outtype.label}.gguf"


def gguf_architecture(config) -> str:
    """`general.architecture` of the export: the registry's, or `deci` for a model with blocks without attention."""
    from slimllm.exporters.gguf_writer import DECI_ARCH
    from slimllm.models.architectures import architecture_for
    from slimllm.models.attention_free import attention_free_layers

    return DECI_ARCH if attention_free_layers(config) else architecture_for(config).gguf_arch


def check_gguf_supports(config, settings: GgufExportSettings) -> int | None:
    """Refuse a model llama.cpp would run differently: a sliding attention window its graph does not apply.

    Returns the window that is exported as full attention (`--allow-full-attention`), else None.
    """
    from slimllm.models.architectures import architecture_for, sliding_window
    from slimllm.models.attention_free import attention_free_layers

    window = sliding_window(config)
    architecture = architecture_for(config)
    attention_free = attention_free_layers(config)
    if attention_free and architecture.has_qk_norm:
        raise UserInputError(
            f"blocks {attention_free} of this {architecture.name} model have no attention, which only llama.cpp's "
            "deci graph runs, and deci has no q/k norm; prune with 2SSP's --stage width for a GGUF"
        )
    if window is None or (architecture.gguf_sliding_window and not attention_free):
        return None
    if not settings.allow_full_attention:
        raise UserInputError(
            f"this {architecture.name} model attends through a sliding window of {window} tokens, which llama.cpp's "
            f"{architecture.gguf_arch} graph does not apply (past {window} tokens the GGUF would compute something "
            "else); pass --allow-full-attention to export it with full attention anyway"
        )
    return window


def check_gguf_dependencies(settings: GgufExportSettings) -> None:
    """Fail before any work when llama.cpp is missing: every file is validated in it, and K-quants are made by it."""
    import_llama_cpp()


def export_gguf(
    checkpoint_dir: Path, out_dir: Path, settings: GgufExportSettings | None = None, force: bool = False
) -> GgufExportResult:
    """Write every requested type, validate each in llama.cpp, then move the directory into place."""
    settings = settings or GgufExportSettings()
    checkpoint = inspect_checkpoint(checkpoint_dir)
    check_gguf_dependencies(settings)
    full_attention_window = check_gguf_supports(checkpoint.config, settings)
    seconds: dict[str, float] = {}
    with atomic_directory(Path(out_dir), force=force, keep_failed=True, protected=[checkpoint.path]) as tmp:
        paths: dict[GgufType, Path] = {}
        started = time.perf_counter()
        for outtype in [t for t in settings.outtypes if t.written_by_gguf_py]:
            paths[outtype] = tmp / gguf_file_name(checkpoint, outtype)
            write_gguf(checkpoint, paths[outtype], outtype)
        kquants = [t for t in settings.outtypes if not t.written_by_gguf_py]
        if kquants:
            source = paths.get(GgufType.F32)
            intermediate = None
            if source is None:
                intermediate = source = tmp / ".intermediate-F32.gguf"
                write_gguf(checkpoint, source, GgufType.F32)
            for outtype in kquants:
                paths[outtype] = tmp / gguf_file_name(checkpoint, outtype)
                quantize_with_llama_cpp(source, paths[outtype], outtype, settings.threads)
            if intermediate is not None:
                intermediate.unlink()
        seconds["write"] = time.perf_counter() - started

        started = time.perf_counter()
        reports, files, samples = validate_gguf_files(paths, checkpoint.path, settings, full_attention_window)
        seconds["validate"] = time.perf_counter() - started
        validation = {
            "passed": all(r.passed for r in reports.values()),
            "attention": _attention_record(full_attention_window),
            "files": {name: report.to_dict() for name, report in reports.items()},
            "versions": library_versions(),
        }
        atomic_write_json(tmp / VALIDATION_FILE, validation)
        atomic_write_json(
            tmp / EXPORT_RECORD_FILE,
            {
                "format": "gguf",
                "settings": plain(settings),
                "source_checkpoint": str(checkpoint.path),
                "source_sha256": checkpoint.sha256,
                "architecture": gguf_architecture(checkpoint.config),
                "pruning": checkpoint.pruning_summary,
                "files": files,
                "validation_passed": validation["passed"],
                "seconds": seconds,
                "versions": library_versions(),
            },
        )
        failed = [r for r in reports.values() if not r.passed]
        if failed:
            from slimllm.core.errors import ValidationError

            raise ValidationError(
                "GGUF parity check failed",
                [f"{Path(r.artifact).name}: {c.describe()}" for r in failed for c in r.failures()],
            )
    return GgufExportResult(Path(out_dir), files, validation, seconds, samples)


def _attention_record(full_attention_window: int | None) -> dict[str, Any]:
    if full_attention_window is None:
        return {"exported_as": "as configured"}
    return {
        "exported_as": "full attention (--allow-full-attention)",
        "sliding_window": full_attention_window,
        "note": f"the checkpoint attends through a window of {full_attention_window} tokens; the GGUF attends to the "
        "whole context, so the two agree up to that length; the checks hold it to the full-attention model, and "
        "'beyond the sliding window' records how far it departs from the checkpoint past the window",
    }


def _tokenizer_texts(settings: GgufExportSettings) -> list[str]:
    """Lines whose token ids must match: the first non-blank lines of the evaluation text."""
    if settings.tokenizer_lines == 0:
        return []
    if settings.eval_data is None:
        return [p for p in FALLBACK_EVAL_TEXT.split("\n") if p.strip()]
    from slimllm.core.data import DataPurpose, load_corpus

    corpus = load_corpus(settings.eval_data, DataPurpose.EVALUATION)
    return list(corpus.documents[: settings.tokenizer_lines])


@dataclass
class _Reference:
    """Everything the checks compare against, computed once from PyTorch for all files."""

    tokenizer: Any
    windows: torch.Tensor
    source: str
    ppl: float
    argmax: Any
    margin_threshold: float
    samples: list[tuple[str, str, bool]]
    prompt_ids: list[list[int]]
    prompt_logits: list[np.ndarray]
    greedy: list[int]
    beyond: tuple[torch.Tensor, Any] | None
    """For a model with a sliding window: a window of text longer than it and the windowed checkpoint's argmax."""
    full_attention_window: int | None
    native_window: int | None = None
    """The sliding window llama.cpp applies itself (Gemma 3): the long window is then a graded check."""


def _reference(checkpoint_dir: Path, settings: GgufExportSettings, full_attention_window: int | None) -> _Reference:
    from slimllm.models.architectures import sliding_window

    reference = TorchReference.load(checkpoint_dir, full_attention=full_attention_window is not None)
    tokenizer = reference.tokenizer
    beyond = None
    native_window = None if full_attention_window is not None else sliding_window(reference.model.config)
    if full_attention_window is not None:
        windowed = TorchReference.load(checkpoint_dir)
        long_windows, _ = long_window(tokenizer, settings.eval_data, 2 * full_attention_window)
        beyond_reference = _window_stats(windowed.logits_fn(), long_windows)[1]
        beyond_reference.mark_confident()
        beyond = (long_windows, beyond_reference)
        del windowed
    elif native_window is not None:
        long_windows, _ = long_window(tokenizer, settings.eval_data, past_window_length(native_window))
        beyond_reference = _window_stats(reference.logits_fn(), long_windows)[1]
        beyond_reference.mark_confident()
        beyond = (long_windows, beyond_reference)
    windows, source = eval_windows(tokenizer, settings.eval_data, settings.eval_seq_len, settings.eval_windows)
    ppl, argmax, _ = _window_stats(reference.logits_fn(), windows)
    threshold = argmax.mark_confident()
    samples = tokenizer_samples(tokenizer) + [
        (f"eval line {i}", text, True) for i, text in enumerate(_tokenizer_texts(settings))
    ]
    prompt_ids = [hf_token_ids(tokenizer, p, True) for p in PARITY_PROMPTS]
    prompt_logits = [reference.forward(np.array([ids]))[0][0] for ids in prompt_ids]
    greedy = reference.greedy(prompt_ids[0], settings.generate_tokens)
    return _Reference(tokenizer, windows, source, ppl, argmax, threshold, samples, prompt_ids, prompt_logits, greedy,
                      beyond, full_attention_window, native_window)


def validate_gguf_files(
    paths: dict[GgufType, Path],
    checkpoint_dir: Path,
    settings: GgufExportSettings,
    full_attention_window: int | None = None,
) -> tuple[dict[str, ParityReport], dict[str, dict[str, Any]], dict[str, str]]:
    """Check every file in llama.cpp; returns per-file reports, file summaries and the greedy samples shown.

    With `full_attention_window` (a sliding-window model exported with full attention) the checks hold the files to
    the full-attention model, and one more check measures them past the window against the checkpoint itself.
    """
    ref = _reference(checkpoint_dir, settings, full_attention_window)
    reports: dict[str, ParityReport] = {}
    files: dict[str, dict[str, Any]] = {}
    greedy_texts: dict[str, str] = {"pytorch": ref.tokenizer.decode(ref.greedy)}
    n_ctx = max(settings.eval_seq_len, max(len(ids) for ids in ref.prompt_ids) + settings.generate_tokens + 8)
    if ref.beyond is not None:
        n_ctx = max(n_ctx, int(ref.beyond[0].shape[1]))
    for outtype, path in paths.items():
        model = LlamaCppModel(path, n_ctx=n_ctx, threads=settings.threads)
        try:
            reports[path.name], agreement, check, greedy = _check_file(model, outtype, path, ref, settings)
            greedy_texts[outtype.label] = ref.tokenizer.decode(greedy)
        finally:
            model.close()
        files[path.name] = {
            "type": outtype.label,
            "bytes": path.stat().st_size,
            "ppl": check.details["candidate_ppl"],
            "reference_ppl": ref.ppl,
            "ppl_ratio": check.value,
            "argmax_agreement": agreement,
            "passed": reports[path.name].passed,
        }
    return reports, files, greedy_texts


def _check_file(model: LlamaCppModel, outtype: GgufType, path: Path, ref: _Reference, settings: GgufExportSettings):
    """Every check of one file. Returns the report, the argmax agreement, the perplexity check and greedy tokens."""
    tolerance = TOLERANCES[outtype]
    report = ParityReport(
        artifact=str(path),
        context={
            "type": outtype.label,
            "backend": "llama.cpp (llama-cpp-python), CPU, F32 KV cache",
            "tolerance": asdict(tolerance),
            "eval_data": ref.source,
        },
    )
    report.add(_tokenizer_check(model, ref.tokenizer, ref.samples))
    if tolerance.max_abs_logits is not None:
        report.add(_logits_check(model, ref, tolerance.max_abs_logits))
    ppl, _, agreement = _window_stats(model.logits_fn(), ref.windows, ref.argmax)
    check = perplexity_check(f"perplexity ({outtype.label})", ref.ppl, ppl, tolerance.max_ppl_ratio)
    check.details.update({"data": ref.source, "windows": int(ref.windows.shape[0]), "tokens": int(ref.windows.numel())})
    report.add(check)
    report.add(
        CheckResult(
            "argmax agreement on evaluation windows",
            agreement >= tolerance.min_argmax_agreement,
            "argmax_agreement",
            agreement,
            tolerance.min_argmax_agreement,
            {
                "over": f"the {CONFIDENT_SHARE:.0%} of positions where PyTorch's top logit leads most",
                "min_margin": ref.margin_threshold,
            },
        )
    )
    if ref.beyond is not None:
        report.add(_beyond_window_check(model, ref, tolerance.min_argmax_agreement))
    actual_greedy = model.greedy(ref.prompt_ids[0], settings.generate_tokens)
    greedy = tokens_check(f"greedy {settings.generate_tokens} tokens (informational)", ref.greedy, actual_greedy)
    greedy.metric = f"informational: {greedy.metric}"
    greedy.passed = True
    report.add(greedy)
    return report, agreement, check, actual_greedy


def _logits_check(model: LlamaCppModel, ref: _Reference, bound: float) -> CheckResult:
    deltas = [
        compare_logits(f"logits prompt {i}", expected, model.logits(ids), bound)
        for i, (ids, expected) in enumerate(zip(ref.prompt_ids, ref.prompt_logits, strict=True))
    ]
    worst = max(deltas, key=lambda c: c.value if c.value is not None else math.inf)
    return CheckResult(
        f"logits on {len(deltas)} prompts",
        all(c.passed for c in deltas),
        "max_abs_logits",
        worst.value,
        bound,
        {"per_prompt": [c.value for c in deltas], "mean_abs": worst.details.get("mean_abs")},
    )


def _beyond_window_check(model: LlamaCppModel, ref: _Reference, min_agreement: float) -> CheckResult:
    """Argmax agreement with the windowed checkpoint on text twice the window: graded where llama.cpp applies the
    window itself; informational for a full-attention export, which departs from the checkpoint there by design."""
    windows, argmax = ref.beyond
    _, _, agreement = _window_stats(model.logits_fn(), windows, argmax)
    if ref.native_window is not None:
        return CheckResult(
            f"argmax agreement at {windows.shape[1]} tokens (past the {ref.native_window}-token window)",
            agreement >= min_agreement,
            "argmax_agreement",
            agreement,
            min_agreement,
            {"sliding_window": ref.native_window, "context": int(windows.shape[1])},
        )
    return CheckResult(
        f"argmax agreement with the sliding-window checkpoint at {windows.shape[1]} tokens "
        "(beyond the sliding window, informational)",
        True,
        "argmax_agreement (informational)",
        agreement,
        None,
        {"sliding_window": ref.full_attention_window, "context": int(windows.shape[1])},
    )


def _tokenizer_check(model: LlamaCppModel, tokenizer, samples: list[tuple[str, str, bool]]) -> CheckResult:
    mismatches = []
    for name, text, add_special in samples:
        expected = hf_token_ids(tokenizer, text, add_special)
        actual = model.tokenize(text, add_special=add_special, parse_special=True)
        if expected != actual:
            mismatches.append({"sample": name, "text": text[:200], "hf": expected[:64], "llama.cpp": actual[:64]})
    return CheckResult(
        f"token ids identical on {len(samples)} samples",
        not mismatches,
        "identical token ids" if not mismatches else f"{len(mismatches)} samples tokenize differently",
        None,
        None,
        {"samples": len(samples), "mismatches": mismatches[:10]},
    )


CONFIDENT_SHARE = 0.5
"""The argmax bound is taken over the positions where PyTorch is most decided: the half with the widest lead of the
top logit over the runner-up. A faithful file must agree there whatever its precision, while many of the other
positions are near-ties that any rounding flips (most of them on weak or random-weight models). A wrong attention
pattern flips decided positions too, which perplexity on a weak model does not show."""


@dataclass
class ArgmaxReference:
    """Top-1 at every evaluation position, the lead of the top logit over the runner-up, and the decided positions."""

    argmax: list[np.ndarray]
    margin: list[np.ndarray]
    confident: list[np.ndarray] = field(default_factory=list)

    def mark_confident(self, share: float = CONFIDENT_SHARE) -> float:
        """Mark the `share` of positions with the widest margins as decided; returns the margin threshold."""
        threshold = float(np.quantile(np.concatenate(self.margin), 1.0 - share))
        self.confident = [margin >= threshold for margin in self.margin]
        return threshold


@torch.no_grad()
def _window_stats(
    logits_fn, windows: torch.Tensor, reference: ArgmaxReference | None = None
) -> tuple[float, ArgmaxReference, float | None]:
    """Perplexity over the windows, this model's top-1 (and confidence) per position, and the share of `reference`'s
    confident positions where this model's top-1 agrees (None without a reference, 1.0 where none is confident).
    One window at a time, so no logits are kept across windows."""
    nll, count, agree, confident_total = 0.0, 0, 0, 0
    own = ArgmaxReference([], [])
    for index in range(windows.shape[0]):
        window = windows[index : index + 1]
        logits = logits_fn(window).float()
        loss, tokens = causal_lm_loss_sum(logits, window)
        nll, count = nll + loss, count + tokens
        top2 = logits[0, :-1].topk(2, dim=-1)
        predicted = top2.indices[:, 0].cpu().numpy()
        own.argmax.append(predicted)
        own.margin.append((top2.values[:, 0] - top2.values[:, 1]).cpu().numpy())
        if reference is not None:
            mask = reference.confident[index]
            agree += int((predicted[mask] == reference.argmax[index][mask]).sum())
            confident_total += int(mask.sum())
    agreement = None
    if reference is not None:
        agreement = agree / confident_total if confident_total else 1.0
    return math.exp(nll / count), own, agreement
