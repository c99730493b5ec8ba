"""Metadata of GGUF files that loading needs: the tokenizer model, special-token ids and insertion flags.

    >>> gguf_tokenizer_model(Path("model.gguf"))       # 'gpt2' (byte-level BPE) or 'llama' (SentencePiece)

gguf-py's `GGUFReader` parses every metadata array field by field when it opens a file: about 19 s on 2 cores for
Gemma 3's 262k-token vocabulary. Loading a file needs several of its keys, so one parsed reader per file (keyed by
its path, size and modification time) serves them all (`gguf_reader`).
"""

from __future__ import annotations

import functools
from pathlib import Path


def gguf_reader(gguf_path: Path):
    """The file's parsed `GGUFReader`, shared by every metadata read of the same unchanged file."""
    path = Path(gguf_path).resolve()
    stat = path.stat()
    return _cached_reader(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int):
    from gguf import GGUFReader

    return GGUFReader(path)


def gguf_field_value(reader, key: str):
    """The scalar value of a GGUF metadata key (None when the file lacks it)."""
    field_ = reader.fields.get(key)
    return None if field_ is None else field_.parts[field_.data[0]][0]


def gguf_tokenizer_model(gguf_path: Path) -> str | None:
    """`tokenizer.ggml.model`: `gpt2` (byte-level BPE), `llama` (SentencePiece), ..."""
    field_ = gguf_reader(gguf_path).fields.get("tokenizer.ggml.model")
    return None if field_ is None else bytes(field_.parts[field_.data[0]]).decode("utf-8")


def gguf_add_special_tokens(gguf_path: Path) -> dict[str, bool]:
    """`tokenizer.ggml.add_bos_token` / `add_eos_token` from a GGUF file's metadata (absent keys omitted)."""
    reader = gguf_reader(gguf_path)
    flags: dict[str, bool] = {}
    for key, name in (
        ("tokenizer.ggml.add_bos_token", "add_bos_token"),
        ("tokenizer.ggml.add_eos_token", "add_eos_token"),
    ):
        value = gguf_field_value(reader, key)
        if value is not None:
            flags[name] = bool(value)
    return flags


GGUF_SPECIAL_TOKEN_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """Special-token ids a GGUF file declares (`bos`, `eos`, `unk`, `pad`; absent keys omitted)."""
    reader = gguf_reader(gguf_path)
    ids = {name: gguf_field_value(reader, key) for name, key in GGUF_SPECIAL_TOKEN_KEYS.items()}
    return {name: int(value) for name, value in ids.items() if value is not None}
