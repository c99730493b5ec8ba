"""A GGUF file in llama.cpp (through llama-cpp-python): tokenize, score every position, decode greedily.

    >>> model = LlamaCppModel(Path("out/gguf/model-F32.gguf"), n_ctx=1024)
    >>> ids = model.tokenize("Hello world", add_special=True)
    >>> logits = model.logits(ids)            # [len(ids), vocab], fp32

The KV cache is kept in F32 by default: llama.cpp's default F16 cache would add its own rounding to every F32
parity figure.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from slimllm.core.errors import MissingDependencyError


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise MissingDependencyError(
            "llama.cpp bindings are not installed; install the `llama` extra (`pip install 'slimllm[llama]'`, "
            "which builds llama-cpp-python from source)"
        ) from exc
    return llama_cpp


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """llama.cpp prints its load log on the C-level stderr; keep it out of our users' output."""
    try:
        fd = os.dup(2)
    except OSError:  # pragma: no cover - no stderr to redirect
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(fd, 2)
            os.close(fd)


class LlamaCppModel:
    """One GGUF model loaded in llama.cpp."""

    def __init__(
        self,
        path: Path,
        n_ctx: int = 1024,
        threads: int | None = None,
        logits_all: bool = True,
        f32_kv_cache: bool = True,
        n_gpu_layers: int = 0,
        vocab_only: bool = False,
    ) -> None:
        llama_cpp = import_llama_cpp()
        self.path = Path(path)
        kwargs = {}
        if f32_kv_cache:
            kwargs.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        with _quiet_native_stderr():
            self.llm = llama_cpp.Llama(
                str(self.path),
                n_ctx=n_ctx,
                n_batch=min(n_ctx, 512),
                n_ubatch=min(n_ctx, 512),
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=logits_all,
                n_gpu_layers=n_gpu_layers,
                vocab_only=vocab_only,
                verbose=False,
                seed=0,
                **kwargs,
            )
        self.n_ctx = n_ctx

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        """llama.cpp's tokenizer; `add_special` adds BOS/EOS as the file's add_bos/add_eos flags say."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits at every position of `ids` (a fresh sequence; no earlier context)."""
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens do not fit a context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation; EOS is not special, so exactly `max_new_tokens` come back."""
        self.llm.reset()
        self.llm.eval(list(prompt_ids))
        generated: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            generated.append(token)
            self.llm.eval([token])
        return generated

    def logits_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Input ids [b, t] -> logits [b, t, vocab], for the shared perplexity protocol."""

        def logits(input_ids: torch.Tensor) -> torch.Tensor:
            rows = [self.logits(row.tolist()) for row in input_ids]
            return torch.from_numpy(np.stack(rows))

        return logits

    def sequence_log_probs(self):
        """Multiple-choice scoring with each group's shared prefix evaluated once: the remainders continue from it
        on the key/value cache (`slimllm.evaluation.sequence_scoring.SequenceLogProbs`)."""
        from slimllm.evaluation.sequence_scoring import SequenceGroup, gather_log_probs

        def log_probs(groups: list[SequenceGroup]) -> list[list[torch.Tensor]]:
            results = []
            for group in groups:
                longest = max(len(s) for s in group.sequences)
                if longest > self.n_ctx:
                    raise ValueError(f"a task of {longest} tokens does not fit a context of {self.n_ctx}")
                self.llm.reset()
                self.llm.eval(group.sequences[0][: group.shared])
                head = torch.from_numpy(np.array(self.llm.scores[group.score_from - 1 : group.shared]))
                rows = []
                for sequence in group.sequences:
                    self.llm.n_tokens = group.shared  # drops the last remainder's cache entries on the next eval
                    self.llm.eval(sequence[group.shared :])
                    tail = torch.from_numpy(np.array(self.llm.scores[group.shared : len(sequence) - 1]))
                    rows.append(gather_log_probs(torch.cat([head, tail]), sequence[group.score_from :]))
                results.append(rows)
            return results

        return log_probs

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()
