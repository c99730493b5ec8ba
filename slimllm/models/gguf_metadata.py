"""Metadata of GGUF files: the key-value header and the tensor table, read directly, and what loading needs from
them (the tokenizer model, special-token ids and insertion flags).

    >>> header = read_gguf_header(Path("model.gguf"))
    >>> header.metadata["general.architecture"], header.tensors[0].type
    ('llama', 'F32')
    >>> gguf_tokenizer_model(Path("model.gguf"))       # 'gpt2' (byte-level BPE) or 'llama' (SentencePiece)

gguf-py's `GGUFReader` builds a numpy view for every element of every metadata array: about 19 s on 2 cores to
open Gemma 3 (a 262k-token vocabulary) and 3-6 s for any file with SmolLM2's 49k-token vocabulary. The header is
a simple format (GGUF v2/v3: counts, then typed key-value pairs, then tensor infos), so it is read here in one pass
(a fraction of a second for either), and once per file content.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimllm.core.errors import UserInputError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
"""GGUF value types with a fixed size (8 is a string, 9 an array), as struct formats."""
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufTensorInfo:
    name: str
    shape: tuple[int, ...]
    """As the file stores it: the fastest-varying dimension first."""
    type: str
    """ggml's type name (F32, F16, Q8_0, Q4_K ...)."""
    offset: int
    """From the start of the tensor data."""

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class GgufHeader:
    version: int
    metadata: dict[str, Any]
    """Every key: numbers and strings as Python values, arrays as lists."""
    tensors: list[GgufTensorInfo]
    data_offset: int
    """Where the tensor data starts in the file (aligned to `general.alignment`)."""


class _Cursor:
    """Reads GGUF's little-endian values from a buffer (the file's memory map), advancing `at`."""

    def __init__(self, data) -> None:
        self.data, self.at = data, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        text = self.data[self.at : self.at + length].decode("utf-8")
        self.at += length
        return text

    def value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item == _STRING:
                return [self.string() for _ in range(count)]
            if item in _SCALARS:
                dtype = np.dtype(_SCALARS[item])
                values = np.frombuffer(self.data, dtype, count, self.at)
                self.at += count * dtype.itemsize
                return values.tolist()
            return [self.value(item) for _ in range(count)]  # arrays of arrays
        return self.scalar(_SCALARS[kind])


def read_gguf_header(gguf_path: Path) -> GgufHeader:
    """The metadata and tensor table of a GGUF file, read once per content (the file's size, modification time and
    a hash of its first MiB, as the conversion cache keys GGUF files; not its path)."""
    import hashlib

    path = Path(gguf_path)
    stat = path.stat()
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()
    return _cached_header(stat.st_size, stat.st_mtime_ns, head, str(path))


@functools.lru_cache(maxsize=4)
def _cached_header(size: int, mtime_ns: int, head: str, path: str) -> GgufHeader:
    """Keyed by the first three arguments; `path` is where to read it from (lru_cache keys on every argument, so a
    copy elsewhere is read again, never a changed file served from the cache)."""
    import mmap

    from gguf import GGMLQuantizationType

    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if size < 24 or data[:4] != b"GGUF":
            raise UserInputError(f"{path} is not a GGUF file (no GGUF magic); pass a .gguf model file")
        cursor = _Cursor(data)
        cursor.at = 4
        version, tensor_count, kv_count = cursor.scalar("<I"), cursor.scalar("<Q"), cursor.scalar("<Q")
        metadata = {}
        for _ in range(kv_count):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.scalar("<I"))
        tensors = []
        for _ in range(tensor_count):
            name = cursor.string()
            shape = tuple(cursor.scalar("<Q") for _ in range(cursor.scalar("<I")))
            kind, offset = cursor.scalar("<I"), cursor.scalar("<Q")
            tensors.append(GgufTensorInfo(name, shape, GGMLQuantizationType(kind).name, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_offset = -(-cursor.at // alignment) * alignment
    return GgufHeader(version, metadata, tensors, data_offset)


def read_gguf_tensor(gguf_path: Path, name: str) -> np.ndarray:
    """One tensor's stored data: float32/float16 values for F32/F16 tensors, the raw bytes (uint8) of a quantized
    one, laid out as the file stores them."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    header = read_gguf_header(gguf_path)
    info = next((t for t in header.tensors if t.name == name), None)
    if info is None:
        raise KeyError(f"{gguf_path} has no tensor {name!r}")
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[info.type]]
    size = info.n_elements // block * block_bytes
    data = np.fromfile(gguf_path, np.uint8, size, offset=header.data_offset + info.offset)
    return data.view({"F32": np.float32, "F16": np.float16}.get(info.type, np.uint8))


def gguf_field_value(header: GgufHeader, key: str):
    """The value of a GGUF metadata key (None when the file lacks it)."""
    return header.metadata.get(key)


def gguf_tokenizer_model(gguf_path: Path) -> str | None:
    """`tokenizer.ggml.model`: `gpt2` (byte-level BPE), `llama` (SentencePiece), ..."""
    return read_gguf_header(gguf_path).metadata.get("tokenizer.ggml.model")


def gguf_add_special_tokens(gguf_path: Path) -> dict[str, bool]:
    """`tokenizer.ggml.add_bos_token` / `add_eos_token` from a GGUF file's metadata (absent keys omitted)."""
    metadata = read_gguf_header(gguf_path).metadata
    flags: dict[str, bool] = {}
    for key, name in (
        ("tokenizer.ggml.add_bos_token", "add_bos_token"),
        ("tokenizer.ggml.add_eos_token", "add_eos_token"),
    ):
        if metadata.get(key) is not None:
            flags[name] = bool(metadata[key])
    return flags


GGUF_SPECIAL_TOKEN_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """Special-token ids a GGUF file declares (`bos`, `eos`, `unk`, `pad`; absent keys omitted)."""
    metadata = read_gguf_header(gguf_path).metadata
    return {name: int(metadata[key]) for name, key in GGUF_SPECIAL_TOKEN_KEYS.items() if metadata.get(key) is not None}
