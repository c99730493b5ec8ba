"""Re-validate an existing export against a checkpoint (`slimllm validate`).

    >>> report = validate_artifact(Path("out/onnx"), reference=Path("out/pruned"))
    >>> report.passed

The settings of the original export (engine, precision, evaluation text) are read from its `slimllm_export.json`,
so the same bounds apply. The reference (the recorded source checkpoint, or `--reference`) must hold the content the
export was made from (its recorded `source_sha256`): a copy elsewhere is fine, another checkpoint is refused.
"""

from __future__ import annotations

from pathlib import Path

from slimllm.core.errors import UserInputError
from slimllm.exporters.parity import ParityReport
from slimllm.exporters.records import read_export_record


def _record(directory: Path) -> dict:
    return read_export_record(directory) or {}


def _reference(record: dict, reference: Path | None, artifact: Path):
    """The checkpoint to compare with, refused unless it holds what the export was made from: a check against
    another checkpoint (one rewritten since, another run's) would pass or fail for the wrong reason."""
    from slimllm.exporters.checkpoint import inspect_checkpoint

    if reference is None and not record.get("source_checkpoint"):
        raise UserInputError("the artifact records no source checkpoint; pass --reference CHECKPOINT_DIR")
    directory = Path(reference if reference is not None else record["source_checkpoint"]).expanduser()
    if not directory.is_dir():
        raise UserInputError(f"reference checkpoint {directory} does not exist; pass --reference CHECKPOINT_DIR")
    expected = record.get("source_sha256")
    checkpoint = inspect_checkpoint(directory, hash_files=expected is not None)
    if expected is not None and checkpoint.sha256 != expected:
        raise UserInputError(
            f"{artifact} was exported from another checkpoint than {directory} (source sha256 {expected[:12]}, "
            f"found {checkpoint.sha256[:12]}); export it again from this checkpoint, or pass --reference with the "
            "checkpoint it was exported from"
        )
    return checkpoint


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
    from slimllm.exporters.onnx import OnnxExportSettings, validate_onnx

    record = _record(directory)
    values = dict(record.get("settings") or {})
    if eval_data is not None:
        values["eval_data"] = eval_data
    settings = OnnxExportSettings(**values)
    checkpoint = _reference(record, reference, directory)
    report = validate_onnx(directory, checkpoint.path, settings)
    report.context["reference_checkpoint"] = str(checkpoint.path)
    return report


def _validate_gguf(path: Path, reference: Path | None, eval_data: str | None) -> ParityReport:
    from slimllm.exporters.gguf import GgufExportSettings, validate_gguf_files
    from slimllm.exporters.gguf_writer import GgufType, llama_file_type
    from slimllm.models.gguf_metadata import read_gguf_header

    record = _record(path.parent)
    file_type = read_gguf_header(path).metadata.get("general.file_type")
    file_type = int(file_type) if file_type is not None else None
    outtype = next((t for t in GgufType if llama_file_type(t) == file_type), None)
    if outtype is None:
        raise UserInputError(f"{path.name} has file type {file_type}, which slimllm has no bound for")
    values = {k: v for k, v in (record.get("settings") or {}).items() if k != "outtypes"}
    if eval_data is not None:
        values["eval_data"] = eval_data
    settings = GgufExportSettings(outtypes=[outtype], **values)
    checkpoint = _reference(record, reference, path)
    reports, _, _ = validate_gguf_files({outtype: path}, checkpoint.path, settings)
    report = reports[path.name]
    report.context["reference_checkpoint"] = str(checkpoint.path)
    return report
