"""Writing artifacts safely: atomic files and directories, content hashes and run records.

    >>> with atomic_directory(Path("out/pruned"), force=False) as tmp:
    ...     model.save_pretrained(tmp)

A file or directory that exists under its final name is complete: everything is written to a temporary path beside
the target and renamed into place only when it is finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from slimllm.core.errors import OutOfDiskSpaceError, UserInputError

_TRACKED_PACKAGES = (
    "slimllm",
    "torch",
    "transformers",
    "accelerate",
    "datasets",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "optimum",
    "optimum-onnx",
    "gguf",
    "llama-cpp-python",
)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that decide a run's numbers."""
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory and GPU of this machine, for reports."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(OSError, ValueError, IndexError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        info["memory_gib"] = round(int(meminfo[0].split()[1]) / 2**20, 1)
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def digest(payload: Any) -> str:
    """A stable hash of JSON-ready data (settings, stage inputs): enums, paths and dataclasses made plain first."""
    return sha256_text(json.dumps(plain(payload), sort_keys=True))


def sha256_file(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path: Path) -> str:
    """Content hash of a file, or of every file below a directory (names and contents, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def content_id(source: str | Path | None) -> str | None:
    """What identifies an input by content: the hash of a local file or directory, else the name itself (a hub id,
    `self`, a dataset name), which is all there is to key on before it is fetched."""
    if source is None:
        return None
    path = Path(str(source)).expanduser()
    return sha256_tree(path) if path.exists() else str(source)


def _temp_sibling(target: Path, suffix: str = "") -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=suffix, dir=target.parent)
    os.close(fd)
    return Path(name)


def _raise_if_disk_full(exc: OSError, target: Path) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise OutOfDiskSpaceError(
            f"no space left on the device while writing {target}; free some disk space or choose another --out"
        ) from exc


def atomic_write_bytes(target: Path, data: bytes) -> None:
    target = Path(target)
    tmp = _temp_sibling(target)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_disk_full(exc, target)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: Path, payload: Any) -> None:
    atomic_write_text(target, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")


def plain(value: Any) -> Any:
    """A JSON-ready copy: enums become their values, paths strings, dataclasses and tuples dicts and lists."""
    import dataclasses
    from enum import Enum

    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value"):  # enums
        return value.value
    if hasattr(value, "tolist"):  # tensors, numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


OUTPUT_MARKER = ".slimllm-output"
"""An empty file slimllm puts in every directory it creates as an output, so that `--force` knows it may replace it."""

_RECORD_MARKERS = (
    OUTPUT_MARKER,
    "manifest.json",  # a compile run
    "slimllm_pruning.json",  # a pruned checkpoint
    "slimllm_export.json",  # a validated ONNX or GGUF export
    "validation.json",  # a failed export kept for inspection
    "latency.json",  # a latency profile
)


def is_slimllm_output(directory: Path) -> bool:
    """True where `directory` carries one of the records slimllm writes into its outputs."""
    directory = Path(directory)
    return directory.is_dir() and any((directory / name).is_file() for name in _RECORD_MARKERS)


def mark_output(directory: Path) -> None:
    """Leave the marker that lets a later `--force` replace this directory."""
    (Path(directory) / OUTPUT_MARKER).touch()


def refuse_unsafe_replacement(target: Path, protected: Sequence[Path | str] = ()) -> None:
    """`--force` never replaces the current directory, the home or root directory, an input, or a parent of those."""
    resolved = Path(target).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UserInputError(f"--out {target} is the current directory or one of its parents; choose another --out")
    if resolved in (Path.home().resolve(), Path(resolved.anchor)):
        raise UserInputError(f"--out {target} is the home or root directory; choose another --out")
    for path in protected:
        source = Path(path).expanduser().resolve()
        if resolved == source or resolved in source.parents:
            raise UserInputError(
                f"--out {target} would replace the input {path} (or a directory holding it); choose another --out"
            )


def local_inputs(*specs: str | Path | None) -> list[Path]:
    """The given specs (models, data) that name local files or directories: the inputs `--force` must not replace."""
    paths = [Path(str(spec)).expanduser() for spec in specs if spec is not None]
    return [path for path in paths if path.exists()]


def check_output_directory(target: Path, force: bool, protected: Sequence[Path | str] = ()) -> None:
    """A non-empty existing output directory is only replaced with `force`, and only if slimllm wrote it.

    `protected` are the command's inputs: neither they nor a directory holding them are ever replaced.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserInputError(f"output path {target} exists and is not a directory; choose another --out")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not force:
        raise UserInputError(
            f"output directory {target} already exists and is not empty; pass --force to replace it "
            "or choose another --out"
        )
    refuse_unsafe_replacement(target, protected)
    if not is_slimllm_output(target):
        raise UserInputError(
            f"--force only replaces outputs slimllm wrote, and {target} is not one (no slimllm record inside); "
            "choose another --out or empty it yourself"
        )


@contextlib.contextmanager
def atomic_directory(
    target: Path, force: bool = False, keep_failed: bool = False, protected: Sequence[Path | str] = ()
) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; rename it to `target` when the block succeeds.

    On failure the temporary directory is removed, or kept as `<target>.failed` with `keep_failed`, so that no
    directory under the final name ever holds a half-written or unvalidated artifact. The finished directory
    carries the slimllm output marker.
    """
    target = Path(target)
    check_output_directory(target, force, protected)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    mark_output(tmp)
    failed = target.with_name(target.name + ".failed")
    try:
        yield tmp
    except BaseException as exc:
        if keep_failed and _replaceable(failed):
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(tmp, failed)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            _raise_if_disk_full(exc, target)
        raise
    replace_directory(tmp, target)
    if keep_failed and failed.exists() and _replaceable(failed):
        shutil.rmtree(failed, ignore_errors=True)  # an earlier failed attempt's debris would sit beside a good one


def _replaceable(path: Path) -> bool:
    """Absent, or a directory slimllm wrote."""
    return not path.exists() or is_slimllm_output(path)


def replace_directory(source: Path, target: Path) -> None:
    """Move a finished directory into place, replacing any previous one only after the new one is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


def cache_dir() -> Path:
    """Where slimllm keeps reusable derived files (dequantized embedded models, generated calibration text)."""
    root = os.environ.get("SLIMLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "slimllm"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock named `name` in the cache while the block runs: two processes that would make the
    same cached file (two runs, two test workers) make it once, one after the other, and never replace it while
    the other reads it."""
    import fcntl

    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
