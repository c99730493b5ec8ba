"""Describe an artifact: a GGUF file, an ONNX export or a Hugging Face checkpoint.

    >>> summary = inspect_artifact(Path("out/gguf/pruned-Q8_0.gguf"))
    >>> summary["metadata"]["llama.block_count"], summary["tensor_types"]
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from slimllm.core.errors import UserInputError
from slimllm.exporters.records import read_export_record

_LONG_ARRAY = 16


def _gguf_value(value: Any) -> Any:
    """A readable value for one GGUF metadata field (long arrays and long strings are summarized)."""
    if isinstance(value, list) and len(value) > _LONG_ARRAY:
        return f"[{len(value)} items]"
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value


def inspect_gguf(path: Path) -> dict[str, Any]:
    from slimllm.models.gguf_metadata import read_gguf_header

    header = read_gguf_header(path)
    metadata = {name: _gguf_value(value) for name, value in header.metadata.items()}
    types = Counter(t.type for t in header.tensors)
    blocks = {int(t.name.split(".")[1]) for t in header.tensors if t.name.startswith("blk.")}
    return {
        "kind": "gguf",
        "path": str(path),
        "bytes": path.stat().st_size,
        "metadata": metadata,
        "tensor_count": len(header.tensors),
        "tensor_types": dict(types),
        "blocks": len(blocks),
        "parameters": int(sum(t.n_elements for t in header.tensors)),
        "tensors": [
            {"name": t.name, "type": t.type, "shape": list(t.shape)}
            for t in header.tensors
            if not t.name.startswith("blk.") or t.name.startswith("blk.0.")
        ],
    }


def inspect_onnx(path: Path) -> dict[str, Any]:
    import onnx

    model_path = path / "model.onnx" if path.is_dir() else path
    model = onnx.load(str(model_path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)

    def describe(values) -> list[dict[str, Any]]:
        rows = []
        for value in values:
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            rows.append({"name": value.name, "shape": dims})
        return rows

    directory = model_path.parent
    return {
        "kind": "onnx",
        "path": str(model_path),
        "bytes": sum(p.stat().st_size for p in directory.glob("model.onnx*")),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": describe(model.graph.input),
        "outputs": describe(model.graph.output),
        "op_types": dict(ops.most_common()),
        "export_record": read_export_record(directory),
    }


def inspect_checkpoint_dir(path: Path) -> dict[str, Any]:
    from slimllm.exporters.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(path, hash_files=False)
    config = info.config
    return {
        "kind": "checkpoint",
        "path": str(info.path),
        "architecture": info.architecture.name,
        "layers": info.num_layers,
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
        "tied_embeddings": info.tied_embeddings,
        "bytes": sum(p.stat().st_size for p in info.path.glob("*.safetensors")),
        "pruning": info.pruning_summary,
    }


def inspect_artifact(path: Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserInputError(f"{path} does not exist; pass a .gguf file, an ONNX export or a checkpoint directory")
    if path.suffix.lower() == ".gguf":
        return inspect_gguf(path)
    if path.suffix.lower() == ".onnx" or (path.is_dir() and (path / "model.onnx").is_file()):
        return inspect_onnx(path)
    if path.is_dir() and (path / "config.json").is_file():
        return inspect_checkpoint_dir(path)
    if path.is_dir() and any(path.glob("*.gguf")):
        names = sorted(p.name for p in path.glob("*.gguf"))
        raise UserInputError(f"{path} holds GGUF files; inspect one of them: {', '.join(names)}")
    raise UserInputError(f"{path} is not a .gguf file, an ONNX export or a Hugging Face checkpoint directory")
