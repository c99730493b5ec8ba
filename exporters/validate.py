"""Re-validate an existing export against a checkpoint (`slimllm validate`).

    >>> report = validate_artifact(Path("out/onnx"), reference=Path("out/pruned"))
    >>> report.passed

The settings of the original export (engine, precision, evaluation text) are read from its `slimllm_export.json`,
so the same bounds apply; `--reference` may point at another checkpoint to compare against.
"""

from __future__ import annotations

from pathlib import Path

from slimllm.errors import UserInputError
from slimllm.exporters.parity import ParityReport
from slimllm.exporters.records import read_export_record


def _record(directory: Path) -> dict:
    return read_export_record(directory) or {}


def _reference_dir(record: dict, reference: Path | None) -> Path:
    if reference is not None:
        return Path(reference)
    if record.get("source_checkpoint"):
        return Path(record["source_checkpoint"])
    raise UserInputError("the artifact records no source checkpoint; pass --reference CHECKPOINT_DIR")


def validate_artifact(artifact: Path, reference: Path | None = None, eval_data: str | None = None) -> ParityReport:
    artifact = Path(artifact).expanduser()
    if not artifact.exists():
        raise UserInputError(f"{artifact} does not exist; pass an ONNX export directory or a .gguf file")
    if artifact.suffix.lower() == ".gguf":
        return _validate_gguf(artifact, reference, eval_data)
    directory = artifact if artifact.is_dir() else artifact.parent
    if (directory / "model.onnx").is_file():
        return _validate_onnx(directory, reference, eval_data)
    raise UserInputError(f"{artifact} is neither an ONNX export directory nor a .gguf file")


def _validate_onnx(directory: Path, reference: Path | None, eval_data: str | None) -> ParityReport:
    from slimllm.exporters.checkpoint import inspect_checkpoint
    from slimllm.exporters.onnx import OnnxExportSettings, validate_onnx

    record = _record(directory)
    values = dict(record.get("settings") or {})
    if eval_data is not None:
        values["eval_data"] = eval_data
    settings = OnnxExportSettings(**values)
    checkpoint = inspect_checkpoint(_reference_dir(record, reference), hash_files=False)
    report = validate_onnx(directory, checkpoint.path, settings)
    report.context["reference_checkpoint"] = str(checkpoint.path)
    return report


def _validate_gguf(path: Path, reference: Path | None, eval_data: str | None) -> ParityReport:
    from gguf import GGUFReader

    from slimllm.exporters.checkpoint import inspect_checkpoint
    from slimllm.exporters.gguf import GgufExportSettings, validate_gguf_files
    from slimllm.exporters.gguf_writer import GgufType, llama_file_type
    from slimllm.models import gguf_field_value

    record = _record(path.parent)
    reader = GGUFReader(str(path))
    file_type = gguf_field_value(reader, "general.file_type")
    file_type = int(file_type) if file_type is not None else None
    outtype = next((t for t in GgufType if llama_file_type(t) == file_type), None)
    if outtype is None:
        raise UserInputError(f"{path.name} has file type {file_type}, which slimllm has no bound for")
    values = {k: v for k, v in (record.get("settings") or {}).items() if k != "outtypes"}
    if eval_data is not None:
        values["eval_data"] = eval_data
    settings = GgufExportSettings(outtypes=[outtype], **values)
    checkpoint = inspect_checkpoint(_reference_dir(record, reference), hash_files=False)
    reports, _, _ = validate_gguf_files({outtype: path}, checkpoint.path, settings)
    report = reports[path.name]
    report.context["reference_checkpoint"] = str(checkpoint.path)
    return report
