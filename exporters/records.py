"""The two files every validated export directory holds, and how to read them back.

    >>> record = read_export_record(Path("out/gguf"))      # settings, source hash, files, timings, versions
    >>> record["files"]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXPORT_RECORD_FILE = "slimllm_export.json"
"""What was exported from what: settings, source checkpoint and hash, files, timings, library versions."""
VALIDATION_FILE = "validation.json"
"""Every parity figure with its bound, the backend actually used and the versions."""


def read_export_record(directory: Path) -> dict[str, Any] | None:
    """The export record of a directory, or None where there is none (not an export, or not a finished one)."""
    path = Path(directory) / EXPORT_RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def export_or_reuse(export: Callable[..., Any], checkpoint: Path, target: Path, source_sha256: str, settings: Any,
                    rebuild: bool = False, announce: Callable[[], None] | None = None) -> bool:
    """Export `checkpoint` into `target` (a directory the caller owns) with `settings`, unless `target` holds an
    export of the same content with the same settings that passed its checks and `rebuild` is off. `announce` runs
    just before an export. True when it exported."""
    if not rebuild and reusable_export(target, source_sha256, settings) is not None:
        return False
    if announce is not None:
        announce()
    export(checkpoint, target, settings, force=True)
    return True


def reusable_export(directory: Path, source_sha256: str, settings: Any, passed: bool = True) -> dict[str, Any] | None:
    """The export record in `directory` if it was made from the checkpoint with this content hash and these very
    settings and its validation `passed` (False: the kept record of a failed export), else None: an export is reused
    by what it was made from, never by where it lies."""
    from slimllm.core.artifacts import plain

    record = read_export_record(directory)
    if record is None or record.get("source_sha256") != source_sha256:
        return None
    if bool(record.get("validation_passed", True)) is not passed:
        return None
    return record if record.get("settings") == json.loads(json.dumps(plain(settings))) else None
