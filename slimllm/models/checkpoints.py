"""Checkpoints that plain transformers loads: model (safetensors), tokenizer and slimllm's JSON records beside them.

    >>> save_pruned_checkpoint(pruned, tokenizer, Path("out/pruned"), record={"method": "shortgpt"})
    >>> read_pruning_record(Path("out/pruned"))["method"]
    'shortgpt'
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from slimllm.core.artifacts import atomic_directory, library_versions

PRUNING_RECORD_FILE = "slimllm_pruning.json"


def save_checkpoint(
    model: nn.Module,
    tokenizer,
    out_dir: Path,
    records: Mapping[str, dict],
    force: bool = False,
    protected: Sequence[Path | str | None] = (),
) -> Path:
    """Save model (safetensors), tokenizer, generation config and each record (file name -> JSON payload) beside
    them, atomically.

    `protected` are inputs (the source model) that `force` must never replace."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, force=force, protected=[p for p in protected if p is not None]) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for file_name, payload in records.items():
            (tmp / file_name).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return out_dir


def save_pruned_checkpoint(
    model: nn.Module,
    tokenizer,
    out_dir: Path,
    record: dict,
    force: bool = False,
    protected: Sequence[Path | str | None] = (),
) -> Path:
    """Save a pruned model with `slimllm_pruning.json` (the record, its format version and library versions)."""
    payload = {"format_version": 1, **record, "versions": library_versions()}
    return save_checkpoint(model, tokenizer, out_dir, {PRUNING_RECORD_FILE: payload}, force, protected)


def read_pruning_record(checkpoint_dir: Path) -> dict | None:
    path = Path(checkpoint_dir) / PRUNING_RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None
