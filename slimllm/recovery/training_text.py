"""What healing trains on: blocks of the training text, of text the teacher writes itself, or a mix of both.

    >>> text = training_text("wiki.valid.tokens", tokenizer, tokens=65_536, block_len=512, batch_size=2, seed=0,
    ...                      writer=dense_model, teacher_text=TeacherText(fraction=0.5, prompts="calibration"))

Distilling on the dense model's own samples keeps what the model knows rather than fitting one corpus (the teacher's
text is, by construction, where the teacher is confident): `fraction` of the blocks are cut from text the teacher
samples (`temperature`, `top_p`) from `prompts` — the fixed varied openings, the first tokens of random places in the
training text, or nothing but the start token. The samples are cached on disk by the teacher's fingerprint and the
sampling settings (`slimllm.core.data.generate_self_text`), so a rerun or another candidate of the same teacher
writes nothing again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from slimllm.core.artifacts import sha256_text
from slimllm.core.data import (
    SELF_PROMPTS,
    SELF_SOURCE,
    DataPurpose,
    SelfTextSettings,
    TextCorpus,
    bos_prefix_id,
    calibration_blocks,
    generate_self_text,
    load_corpus,
    split_development,
    token_rows,
    tokenize_corpus,
)
from slimllm.core.errors import UserInputError, parse_choice

PROMPT_TOKENS = 16
"""Tokens of the training text that start each teacher sample with `prompts = calibration`."""
CALIBRATION_PROMPTS = 64
"""How many places of the training text the calibration prompts are taken from (cycled over the samples)."""


class TeacherPrompts(str, Enum):
    OPENINGS = "openings"
    CALIBRATION = "calibration"
    NONE = "none"


@dataclass(frozen=True)
class TeacherText:
    """How much of the training text the teacher writes, and how."""

    fraction: float = 0.0
    """Share of the training blocks cut from the teacher's samples (0: none, 1: all)."""
    prompts: TeacherPrompts = TeacherPrompts.OPENINGS
    """What each sample starts from: openings (fixed varied openings), calibration (the first tokens of random places
    in the training text) or none (the start token alone)."""
    temperature: float = 0.8
    top_p: float = 0.95
    batch_size: int = 8
    """Samples generated together (larger on a GPU)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", parse_choice(TeacherPrompts, self.prompts, "--teacher-prompts"))
        if not 0.0 <= self.fraction <= 1.0:
            raise UserInputError(f"--teacher-text must be a fraction in [0, 1], got {self.fraction}")
        if not self.temperature > 0 or not 0.0 < self.top_p <= 1.0:
            raise UserInputError("--teacher-temperature must be positive and --teacher-top-p in (0, 1]")


@dataclass(frozen=True)
class TrainingText:
    """The training blocks and where they came from."""

    blocks: torch.Tensor
    """[n, block_len] token ids: the training text's blocks first, then the teacher's."""
    source: str
    sha256: str
    """Hash of every text the blocks were cut from."""
    teacher_blocks: int = 0


def training_text(
    calib: str,
    tokenizer,
    tokens: int,
    block_len: int,
    batch_size: int,
    seed: int,
    writer: nn.Module | None,
    teacher_text: TeacherText = TeacherText(),
    holdout: float = 0.0,
) -> TrainingText:
    """Enough blocks for `tokens` without repeating one (or every block the text holds), `teacher_text.fraction` of
    them written by `writer` (the teacher: the dense model, not the pruned one). `calib = self` is all teacher text.
    With `holdout`, neither blocks nor prompts come from the last `holdout` fraction of `calib` (the development
    slice, see `slimllm.core.data.split_development`)."""
    fraction = 1.0 if calib == SELF_SOURCE else teacher_text.fraction
    if fraction > 0 and writer is None:
        raise UserInputError("teacher-written training text needs the teacher; pass --teacher")
    wanted = math.ceil(tokens / block_len)
    teacher_blocks = round(fraction * wanted)
    bos_id = bos_prefix_id(tokenizer)
    parts, hashes, sources = [], [], []
    calib_ids = None
    if calib != SELF_SOURCE:
        corpus = load_corpus(calib, DataPurpose.CALIBRATION)
        calib_ids, _ = split_development(tokenize_corpus(corpus, tokenizer), holdout)
        available = token_rows(calib_ids, block_len, bos_id).shape[0]
        if available < batch_size:
            raise UserInputError(
                f"--calib {calib} has {calib_ids.numel()} tokens, fewer than one batch of {batch_size} x {block_len}; "
                "use a larger text or shorter --block-len"
            )
        from_calib = min(available, wanted - teacher_blocks)
        if from_calib > 0:
            parts.append(calibration_blocks(calib_ids, from_calib, block_len, seed, bos_id))
        hashes.append(corpus.sha256)
        sources.append(corpus.source)
    if teacher_blocks > 0:
        documents = generate_self_text(writer, tokenizer, SelfTextSettings(
            n_samples=8, min_tokens=int(1.05 * teacher_blocks * block_len) + block_len,
            temperature=teacher_text.temperature, top_p=teacher_text.top_p, seed=seed,
            batch_size=teacher_text.batch_size,
            prompts=teacher_prompts(teacher_text.prompts, tokenizer, calib_ids, seed),
        ))
        written = TextCorpus(source=SELF_SOURCE, kind="self", documents=tuple(documents))
        ids = tokenize_corpus(written, tokenizer)
        available = token_rows(ids, block_len, bos_id).shape[0]
        if available < 1:
            raise UserInputError("the teacher stops writing almost at once; train on a text file instead")
        parts.append(calibration_blocks(ids, min(available, teacher_blocks), block_len, seed, bos_id))
        hashes.append(written.sha256)
        sources.append(f"teacher text ({teacher_text.prompts.value} prompts, T={teacher_text.temperature}, "
                       f"top-p {teacher_text.top_p})")
    blocks = torch.cat(parts)
    sha256 = hashes[0] if len(hashes) == 1 else sha256_text("\n".join(hashes))
    return TrainingText(blocks, " + ".join(sources), sha256,
                        int(parts[-1].shape[0]) if teacher_blocks > 0 else 0)


def teacher_prompts(kind: TeacherPrompts, tokenizer, calib_ids: torch.Tensor | None, seed: int) -> tuple[str, ...]:
    """The openings the teacher's samples start from."""
    if kind is TeacherPrompts.OPENINGS:
        return SELF_PROMPTS
    if kind is TeacherPrompts.NONE:
        return ("",)
    if calib_ids is None or calib_ids.numel() <= PROMPT_TOKENS:
        raise UserInputError("--teacher-prompts calibration needs a training text (--calib a file or dataset)")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, calib_ids.numel() - PROMPT_TOKENS, (CALIBRATION_PROMPTS,), generator=generator)
    prompts = (tokenizer.decode(calib_ids[s : s + PROMPT_TOKENS], skip_special_tokens=True,
                                clean_up_tokenization_spaces=False).strip() for s in starts)
    return tuple(p for p in prompts if p) or ("",)
