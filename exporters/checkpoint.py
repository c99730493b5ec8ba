"""What an exporter needs to know about a saved checkpoint before touching it.

    >>> info = inspect_checkpoint(Path("out/pruned"))
    >>> info.architecture.gguf_arch, info.num_layers, info.pruning_summary["removed_layers"]

A wrong path, a directory that is not a Hugging Face checkpoint or an unsupported architecture is a user error
raised here, before any export work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimllm.core.artifacts import sha256_tree
from slimllm.core.errors import UserInputError
from slimllm.models.architectures import Architecture, architecture_for
from slimllm.models.checkpoints import read_pruning_record


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    config: Any
    """The transformers config object."""
    architecture: Architecture
    sha256: str
    """Content hash of every file in the checkpoint directory."""
    pruning_summary: dict[str, Any] | None
    """Method, original layer count and removed layers from `slimllm_pruning.json`, if the checkpoint was pruned."""

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))


def inspect_checkpoint(checkpoint_dir: Path, hash_files: bool = True) -> CheckpointInfo:
    """Validate a checkpoint directory and read its config and pruning record."""
    from slimllm.models.attention_free import read_config

    path = Path(checkpoint_dir).expanduser()
    if not path.exists():
        raise UserInputError(f"checkpoint {path} does not exist; pass a directory written by `slimllm prune`")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserInputError(
            f"{path} is not a Hugging Face checkpoint directory (no config.json); pass the output of "
            "`slimllm prune` or a save_pretrained directory"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserInputError(f"checkpoint {path} has no weights (*.safetensors); it may be incomplete")
    try:
        config = read_config(str(path))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise UserInputError(f"could not read {path / 'config.json'} ({exc})") from exc
    architecture = architecture_for(config)
    record = read_pruning_record(path)
    summary = None
    if record is not None:
        summary = {
            key: record.get(key)
            for key in ("method", "source_model", "original_num_layers", "removed_layers", "kept_layers", "summary")
        }
    return CheckpointInfo(path.resolve(), config, architecture, sha256_tree(path) if hash_files else "", summary)
