"""The model behind `slimllm eval`: a checkpoint in PyTorch, an ONNX export in onnxruntime, or a GGUF file in
llama.cpp, all behind the same `logits_fn` (input ids [b, t] -> logits [b, t, vocab]) and a Hugging Face tokenizer.

    >>> with open_backend("runs/demo/onnx", "auto") as scorer:
    ...     result = evaluate_tasks(scorer.sequence_log_probs, scorer.tokenizer, tasks)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from slimllm.core.errors import UserInputError
from slimllm.core.placement import Placement
from slimllm.evaluation.accuracy import pad_token_id
from slimllm.evaluation.sequence_scoring import SequenceLogProbs, logits_fn_log_probs, torch_shared_prefix_log_probs


@dataclass
class Scorer:
    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    tokenizer: object
    backend: str
    """What computes the logits, in words (e.g. "onnxruntime (CPUExecutionProvider)")."""
    model: str
    sequence_log_probs: SequenceLogProbs | None = None
    """How multiple-choice endings are scored; defaults to whole sequences through `logits_fn`."""

    def __post_init__(self) -> None:
        if self.sequence_log_probs is None:
            self.sequence_log_probs = logits_fn_log_probs(self.logits_fn, pad_token_id(self.tokenizer))

    def close(self) -> None:
        """Drop the model behind the scorer: a caller that keeps the `Scorer` (for its `backend` text) does not keep
        the model alive while the next one loads."""
        self.logits_fn = self.sequence_log_probs = _closed


def _closed(*_args, **_kwargs):
    raise RuntimeError("this scorer's model was released when its open_backend block ended")


def resolve_backend(spec: str, backend: str) -> str:
    """`auto`: onnxruntime for an ONNX export directory, PyTorch for everything else (a .gguf input is dequantized
    into PyTorch; pass --backend llama.cpp to run the file in llama.cpp)."""
    if backend != "auto":
        return backend
    return "onnxruntime" if (Path(spec) / "model.onnx").is_file() else "torch"


@contextlib.contextmanager
def open_backend(
    spec: str, backend: str = "auto", device: str = "auto", dtype: str = "auto", context: int = 4096,
    placement: Placement | None = None,
) -> Iterator[Scorer]:
    """Load `spec` in the chosen backend for scoring (llama.cpp with a `context`-token window); closes it on exit.
    A spreading `placement` (`--device-map auto`) places a PyTorch model with accelerate."""
    chosen = resolve_backend(spec, backend)
    if placement is not None and placement.spread and chosen != "torch":
        raise UserInputError(f"--device-map places PyTorch models, and {spec} runs in {chosen}; drop --device-map")
    if chosen == "llama.cpp":
        with _llama_cpp_scorer(spec, context) as scorer:
            yield scorer
        return
    scorer = _onnx_scorer(Path(spec), device) if chosen == "onnxruntime" else _torch_scorer(spec, device, dtype,
                                                                                             placement)
    try:
        yield scorer
    finally:
        scorer.close()
        _release_memory()


def _torch_scorer(spec: str, device: str, dtype: str, placement: Placement | None) -> Scorer:
    from slimllm.evaluation.perplexity import torch_logits_fn
    from slimllm.models.loading import load_model

    loaded = load_model(spec, device=device, dtype=dtype, placement=placement)
    where = (placement.describe() if placement is not None and placement.spread else str(loaded.device))
    return Scorer(
        torch_logits_fn(loaded.model),
        loaded.tokenizer,
        f"torch ({where})",
        loaded.source.spec,
        torch_shared_prefix_log_probs(loaded.model, pad_token_id(loaded.tokenizer)),
    )


def _release_memory() -> None:
    """Collect the released model now (its closures form cycles), and hand its GPU blocks back to the device."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _onnx_scorer(directory: Path, device: str) -> Scorer:
    from transformers import AutoTokenizer

    from slimllm.exporters.ort_session import OrtCausalLM

    if not (directory / "model.onnx").is_file():
        raise UserInputError(f"{directory} holds no model.onnx; pass an ONNX export directory or --backend torch")
    provider = "cuda" if device.startswith("cuda") else "cpu" if device == "cpu" else "auto"
    runner = OrtCausalLM(directory / "model.onnx", provider)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return Scorer(runner.logits_fn(), tokenizer, f"onnxruntime ({runner.provider_used})", str(directory))


@contextlib.contextmanager
def _llama_cpp_scorer(spec: str, context: int) -> Iterator[Scorer]:
    from transformers import AutoTokenizer

    from slimllm.exporters.llama_cpp_runner import LlamaCppModel

    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise UserInputError(f"{path} holds {len(files)} .gguf files; pass the one to evaluate")
        path = files[0]
    if path.suffix != ".gguf" or not path.is_file():
        raise UserInputError(f"--backend llama.cpp needs a .gguf file, got {spec}")
    tokenizer_dir = _tokenizer_source(path)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = LlamaCppModel(path, n_ctx=context)
    try:
        scorer = Scorer(
            model.logits_fn(), tokenizer, "llama.cpp (llama-cpp-python, CPU)", str(path), model.sequence_log_probs()
        )
        try:
            yield scorer
        finally:
            scorer.close()
    finally:
        model.close()


def _tokenizer_source(path: Path) -> Path:
    """Where the Hugging Face tokenizer of a .gguf file is: the checkpoint a slimllm export was made from, a
    tokenizer beside the file, or else the cached directory dequantized from the file itself."""
    from slimllm.exporters.records import read_export_record
    from slimllm.models.loading import checkpoint_directory

    record = read_export_record(path.parent)
    if record is not None and Path(record.get("source_checkpoint", "")).is_dir():
        return Path(record["source_checkpoint"])
    if (path.parent / "tokenizer.json").is_file():
        return path.parent
    return checkpoint_directory(str(path))
