"""Text sources for calibration and evaluation, and their token blocks.

    >>> from slimllm.core.data import DataPurpose, load_corpus, calibration_blocks
    >>> corpus = load_corpus("../shared/data/wikitext2/wiki.valid.tokens", DataPurpose.CALIBRATION)
    >>> blocks = calibration_blocks(tokenize_corpus(corpus, tokenizer), n_blocks=8, block_len=512, seed=0)

A source is a hub dataset name (`wikitext2`, `c4`), a local `.txt`/`.raw`/`.tokens`, `.jsonl` or `.parquet` file,
or `self`: the model writes its own calibration text (the offline default). Calibration never reads an evaluation
split: hub sources take their train split, and local files whose name marks them as a test split are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from slimllm.core.artifacts import atomic_write_json, cache_dir, sha256_text
from slimllm.core.errors import UserInputError, first_line
from slimllm.core.placement import input_device, parameter_value

log = logging.getLogger(__name__)

SELF_SOURCE = "self"
SHARED_DATA_ENV = "SLIMLLM_DATA_DIR"
TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".text")


class DataPurpose(str, Enum):
    CALIBRATION = "calibration"
    EVALUATION = "evaluation"


@dataclass(frozen=True)
class HubDataset:
    """A hub dataset and the split each purpose reads."""

    path: str
    name: str | None
    splits: dict[DataPurpose, str]
    data_files: dict[str, str] | None = None
    text_field: str = "text"


HUB_DATASETS: dict[str, HubDataset] = {
    "wikitext2": HubDataset(
        "wikitext",
        "wikitext-2-raw-v1",
        {DataPurpose.CALIBRATION: "train", DataPurpose.EVALUATION: "test"},
    ),
    "c4": HubDataset(
        "allenai/c4",
        None,
        {DataPurpose.CALIBRATION: "train", DataPurpose.EVALUATION: "validation"},
        data_files={
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
}


@dataclass(frozen=True)
class TextCorpus:
    """Documents read from one source. `text` is the documents joined with blank lines."""

    source: str
    kind: str
    documents: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.documents)

    @property
    def sha256(self) -> str:
        return sha256_text(self.text)


@dataclass(frozen=True)
class SelfTextSettings:
    """How the model writes its own calibration text for `--calib self`."""

    n_samples: int = 32
    """Minimum number of generated documents."""
    min_tokens: int = 0
    """Keep generating documents until their joined text has at least this many tokens."""
    max_new_tokens: int = 256
    """Tokens generated per document."""
    temperature: float = 0.8
    """Sampling temperature."""
    top_p: float = 0.95
    """Nucleus sampling threshold."""
    batch_size: int = 8
    """Documents generated together."""
    seed: int = 0
    """Sampling seed; the same seed and model give the same text."""
    prompts: tuple[str, ...] | None = None
    """What the documents start from, cycled (None: `SELF_PROMPTS`; an empty string: the start token alone)."""


# Varied openings, so the generated text covers narrative, expository, technical and conversational registers.
SELF_PROMPTS: tuple[str, ...] = (
    "The history of the city begins",
    "In mathematics, a prime number is",
    "The recipe calls for",
    "Scientists recently discovered that",
    "Once upon a time, in a small village,",
    "The main causes of the war were",
    "To install the software, first",
    "The novel tells the story of",
    "Photosynthesis is the process by which",
    "The football season ended with",
    "In computer science, a hash table",
    "The museum's collection includes",
    "Climate change affects",
    "The company was founded in",
    "Dear editor, I am writing to",
    "The river flows through",
    "A healthy diet should include",
    "The album was released in",
    "During the Renaissance, artists",
    "The following steps explain how to",
    "The election results showed",
    "The human heart has four chambers",
    "Python is a programming language that",
    "The mountain was first climbed",
)


def shared_data_dir() -> Path:
    """The shared WikiText-2 folder: `$SLIMLLM_DATA_DIR`, else `../shared/data/wikitext2` from the repo root."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2"  # <repo>/../shared


def _looks_like_test_split(path: Path) -> bool:
    parts = re.split(r"[._\-\s]+", path.name.lower())
    return "test" in parts


def _documents_from_lines(text: str) -> list[str]:
    """One document per non-blank line, as WikiText and the `datasets` text loader treat plain text."""
    return [line for line in text.splitlines() if line.strip()]


def _read_text_file(path: Path) -> list[str]:
    try:
        # utf-8-sig drops the byte-order mark some releases (e.g. wiki.valid.tokens) start with.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"cannot read {path}: it is not UTF-8 text; convert it to UTF-8 first") from exc
    return _documents_from_lines(text)


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    documents: list[str] = []
    with open(path, encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserInputError(f"cannot read {path}: line {number} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or text_field not in record:
                raise UserInputError(f"cannot read {path}: line {number} has no {text_field!r} field")
            if str(record[text_field]).strip():
                documents.append(str(record[text_field]))
    return documents


def _read_parquet(path: Path, text_field: str) -> list[str]:
    import pyarrow.lib
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.lib.ArrowException, OSError) as exc:
        raise UserInputError(f"cannot read {path}: not a readable parquet file ({exc})") from exc
    if text_field not in table.column_names:
        raise UserInputError(f"cannot read {path}: no {text_field!r} column (columns: {', '.join(table.column_names)})")
    return [str(value) for value in table.column(text_field).to_pylist() if value and str(value).strip()]


def _read_hub(name: str, purpose: DataPurpose) -> list[str]:
    entry = HUB_DATASETS[name]
    try:
        import datasets

        dataset = datasets.load_dataset(
            entry.path, entry.name, data_files=entry.data_files, split=entry.splits[purpose]
        )
    except Exception as exc:  # datasets raises many unrelated types for network and hub failures
        raise UserInputError(
            f"could not download the {name} dataset ({first_line(exc)}); check your network, or pass a local "
            f".txt/.jsonl/.parquet file or `{SELF_SOURCE}`"
        ) from exc
    return [row for row in dataset[entry.text_field] if row and row.strip()]


def load_corpus(
    source: str,
    purpose: DataPurpose,
    *,
    model=None,
    tokenizer=None,
    self_settings: SelfTextSettings | None = None,
    text_field: str = "text",
) -> TextCorpus:
    """Read documents from a source. `self` needs the model and tokenizer that will write the text."""
    source = str(source).strip()
    if source == SELF_SOURCE:
        if purpose is DataPurpose.EVALUATION:
            raise UserInputError("`self` text is for calibration only; evaluate on real text such as wikitext2")
        if model is None or tokenizer is None:
            raise UserInputError("`self` calibration needs a model to write the text")
        documents = generate_self_text(model, tokenizer, self_settings or SelfTextSettings())
        kind = "self"
    elif source in HUB_DATASETS:
        documents = _read_hub(source, purpose)
        kind = "hub"
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserInputError(
                f"data source {source} does not exist; pass a .txt/.jsonl/.parquet file, "
                f"{', '.join(HUB_DATASETS)} or {SELF_SOURCE}"
            )
        if path.is_dir():
            raise UserInputError(f"data source {source} is a directory; pass a .txt/.jsonl/.parquet file")
        if purpose is DataPurpose.CALIBRATION and _looks_like_test_split(path):
            raise UserInputError(
                f"refusing to calibrate on {path.name}: it is an evaluation (test) split; calibrate on a "
                "train or validation split, e.g. wiki.valid.tokens"
            )
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            documents, kind = _read_jsonl(path, text_field), "jsonl"
        elif suffix == ".parquet":
            documents, kind = _read_parquet(path, text_field), "parquet"
        elif suffix in TEXT_SUFFIXES:
            documents, kind = _read_text_file(path), "text"
        else:
            raise UserInputError(
                f"unsupported data file {path.name}; use .txt/.raw/.tokens, .jsonl (a 'text' field) or .parquet"
            )
    if not documents:
        raise UserInputError(f"data source {source} holds no text; pass a file with non-empty documents")
    return TextCorpus(source=source, kind=kind, documents=tuple(documents))


def tokenize_corpus(corpus: TextCorpus, tokenizer) -> torch.Tensor:
    """Tokenize the joined corpus once, as the standard perplexity protocol does. Returns a 1-D LongTensor.

    The ids of one text under one tokenizer are computed once per process: a compile evaluates several artifacts
    of one model on the same text, and tokenizing WikiText-2 test takes about a second each time."""
    text = corpus.text
    fingerprint = _tokenizer_fingerprint(tokenizer)
    key = (sha256_text(text), fingerprint) if fingerprint is not None else None
    if key is not None and key in _TOKENIZED:
        return _TOKENIZED[key].clone()
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0].to(torch.long)
    if key is not None:
        while len(_TOKENIZED) >= _TOKENIZED_KEPT:
            _TOKENIZED.pop(next(iter(_TOKENIZED)))
        _TOKENIZED[key] = ids.clone()
    return ids


_TOKENIZED: dict[tuple[str, str], torch.Tensor] = {}
_TOKENIZED_KEPT = 8


def _tokenizer_fingerprint(tokenizer) -> str | None:
    """What decides a fast tokenizer's ids: its whole serialized pipeline (vocabulary, merges, normalizer, special
    tokens and the post-processor that inserts BOS/EOS). None for other tokenizers, which are not cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return sha256_text(backend.to_str()) if backend is not None else None


def bos_prefix_id(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every text with it (Gemma, Llama 2/3), else None (SmolLM2, Qwen).

    Such a model has only ever seen sequences that start with BOS: a window cut from the middle of a text without
    it is outside its training (Gemma 3 270M, four 512-token windows of WikiText-2 test: perplexity 49.9 without,
    23.2 with). Every evaluation window and calibration block of such a model starts with BOS, as llama-perplexity's
    chunks do.
    """
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if bos is not None and ids and ids[0] == bos else None


def token_rows(token_ids: torch.Tensor, row_len: int, bos_id: int | None = None) -> torch.Tensor:
    """Every whole row of `row_len` tokens of a token stream, in order, shape [n, row_len]. With `bos_id`, each row
    is BOS followed by the next `row_len - 1` tokens of the text (a BOS that starts the stream is not text)."""
    if bos_id is None:
        available = token_ids.numel() // row_len
        return token_ids[: available * row_len].view(available, row_len)
    body = token_ids[1:] if token_ids.numel() and int(token_ids[0]) == bos_id else token_ids
    available = body.numel() // (row_len - 1)
    rows = body[: available * (row_len - 1)].view(available, row_len - 1)
    return torch.cat([torch.full((available, 1), bos_id, dtype=rows.dtype), rows], dim=1)


def calibration_blocks(
    token_ids: torch.Tensor, n_blocks: int, block_len: int, seed: int, bos_id: int | None = None
) -> torch.Tensor:
    """`n_blocks` distinct non-overlapping blocks of `block_len` tokens, chosen with `seed`. Shape [n, len].
    With `bos_id`, every block starts with BOS (see `bos_prefix_id`)."""
    if n_blocks < 1 or block_len < 2:
        raise UserInputError(f"need at least 1 block of 2 tokens, got {n_blocks} blocks of {block_len}")
    blocks = token_rows(token_ids, block_len, bos_id)
    available = blocks.shape[0]
    if available < n_blocks:
        raise UserInputError(
            f"the calibration text has {token_ids.numel()} tokens, fewer than {n_blocks} blocks of {block_len}; "
            "use fewer blocks, shorter blocks or a larger source"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:n_blocks].sort().values
    return blocks[chosen].clone()


def model_fingerprint(model) -> str:
    """A cheap content fingerprint: the config plus the first values of every parameter."""
    parts = [model.config.to_json_string(use_diff=False)]
    with torch.no_grad():
        for name, param in model.named_parameters():
            head = parameter_value(model, name, param).detach().flatten()[:16].float().cpu()
            parts.append(f"{name}:{tuple(param.shape)}:{[round(v, 6) for v in head.tolist()]}")
    return sha256_text("\n".join(parts))


@torch.no_grad()
def generate_self_text(model, tokenizer, settings: SelfTextSettings) -> list[str]:
    """Sample documents from the model itself, from varied short openings; cached on disk per model and settings.

    The documents come in seeded batches, so a request for less text is a prefix of one for more: the cache holds the
    batches written so far and the random state after them, keyed without `n_samples` and `min_tokens`, and a larger
    request continues where the last one stopped, writing the documents a run from scratch would have written."""
    sampling = {k: v for k, v in settings.__dict__.items() if k not in ("n_samples", "min_tokens")}
    key = sha256_text(model_fingerprint(model) + json.dumps(sampling, sort_keys=True))[:24]
    cache_file = cache_dir() / "self-text" / f"{key}.json"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {"batches": []}
    documents, tokens = [], 0
    for batch in cached["batches"]:
        if len(documents) >= settings.n_samples and tokens >= settings.min_tokens:
            break
        documents.extend(batch["documents"])
        tokens += batch["tokens"]
    if len(documents) >= settings.n_samples and tokens >= settings.min_tokens:
        return documents
    if cached["batches"] and not cached.get("rng_state"):  # batches whose random state was not kept: start over
        cached, documents, tokens = {"batches": []}, [], 0
    log.info("writing text with the model itself (at least %d documents and %d tokens; cached for next time)",
             settings.n_samples, settings.min_tokens)
    batches = _sample_batches(model, tokenizer, settings, cached, len(documents), tokens)
    atomic_write_json(cache_file, {"settings": sampling, "batches": cached["batches"] + batches["new"],
                                   "rng_state": batches["rng_state"]})
    return documents + [d for batch in batches["new"] for d in batch["documents"]]


def _sample_batches(model, tokenizer, settings: SelfTextSettings, cached: dict, documents: int, tokens: int) -> dict:
    """Generate batches after the cached ones until the request is met; returns them and the random state after."""
    device = input_device(model)
    prompts = settings.prompts or SELF_PROMPTS
    start_text = tokenizer.bos_token or tokenizer.eos_token or ""
    saved_cpu = torch.random.get_rng_state()
    saved_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    if cached["batches"]:
        state = cached["rng_state"]
        torch.random.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
        if device.type == "cuda" and state.get("cuda") is not None:
            torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)
    else:
        torch.manual_seed(settings.seed)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    new: list[dict] = []
    batch_index = len(cached["batches"])
    try:
        while documents < settings.n_samples or tokens < settings.min_tokens:
            if batch_index > 10 * max(1, settings.n_samples // settings.batch_size) + 100 + len(cached["batches"]):
                raise UserInputError("the model stops generating almost at once; calibrate on a text file instead")
            start = batch_index * settings.batch_size
            batch = [prompts[(start + i) % len(prompts)] or start_text for i in range(settings.batch_size)]
            batch_index += 1
            encoded = tokenizer(batch, return_tensors="pt", padding=True).to(device)
            output = model.generate(**encoded, do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                                    max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            written = [t.strip() for t in tokenizer.batch_decode(output, skip_special_tokens=True)]
            written = [d for d in written if d]
            # +2 for the blank line that joins documents
            count = sum(len(tokenizer(d, verbose=False)["input_ids"]) + 2 for d in written)
            new.append({"documents": written, "tokens": count})
            documents, tokens = documents + len(written), tokens + count
        state = {"cpu": torch.random.get_rng_state().tolist(),
                 "cuda": torch.cuda.get_rng_state(device).tolist() if device.type == "cuda" else None}
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(saved_cpu)
        if saved_cuda is not None:
            torch.cuda.set_rng_state(saved_cuda, device)
    return {"new": new, "rng_state": state}


@dataclass(frozen=True)
class CalibrationData:
    """Fixed-length token blocks for calibration, with where they came from."""

    blocks: torch.Tensor
    """Token ids, shape [n_blocks, block_len]."""
    source: str
    kind: str
    sha256: str
    """Hash of the source text the blocks were cut from."""
    seed: int

    def describe(self) -> dict:
        return {
            "source": self.source,
            "kind": self.kind,
            "text_sha256": self.sha256,
            "n_blocks": int(self.blocks.shape[0]),
            "block_len": int(self.blocks.shape[1]),
            "tokens": int(self.blocks.numel()),
            "seed": self.seed,
        }


def split_development(token_ids: torch.Tensor, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration part, development part): the last `holdout` fraction of the tokens is held apart for tuning."""
    if not 0.0 <= holdout < 1.0:
        raise UserInputError(f"the development holdout must be a fraction in [0, 1), got {holdout}")
    cut = token_ids.numel() - int(round(holdout * token_ids.numel()))
    return token_ids[:cut], token_ids[cut:]


def load_calibration(source: str, model, tokenizer, n_blocks: int, block_len: int, seed: int = 0,
                     holdout: float = 0.0) -> CalibrationData:
    """Calibration blocks from any source; `self` generates enough text for the blocks requested.

    With `holdout`, blocks come only from the text before its last `holdout` fraction (the development slice that
    tuning measures on, see `split_development`)."""
    self_settings = None
    if source == SELF_SOURCE:
        # Blocks are cut at block boundaries of the joined text, so ask for a little more than n_blocks x block_len.
        self_settings = SelfTextSettings(
            n_samples=8, min_tokens=int(1.05 * n_blocks * block_len) + block_len, seed=seed
        )
    corpus = load_corpus(source, DataPurpose.CALIBRATION, model=model, tokenizer=tokenizer, self_settings=self_settings)
    ids, _ = split_development(tokenize_corpus(corpus, tokenizer), holdout)
    blocks = calibration_blocks(ids, n_blocks, block_len, seed, bos_prefix_id(tokenizer))
    return CalibrationData(blocks, corpus.source, corpus.kind, corpus.sha256, seed)
