"""The candidates of a frontier run: every model through the quantization ladder of every backend the profile has,
each exported and validated once into the work directory, under the content hash of the model it came from.

    >>> for candidate in frontier_candidates(models, settings, profile):
    ...     artifact = export_candidate(candidate, work_dir, settings)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slimllm.core.errors import UserInputError
from slimllm.core.progress import Progress, announcer
from slimllm.frontier.models import FrontierModel
from slimllm.frontier.settings import FrontierSettings
from slimllm.latency.profiles import BackendKind, BackendSpec, TargetProfile

LLAMA_CPP = "llama.cpp"
ONNXRUNTIME = "onnxruntime"


@dataclass(frozen=True)
class Candidate:
    model: FrontierModel
    backend: str
    quant: str
    """A GGUF type (`q8_0`) on llama.cpp, an ONNX variant (`int4`) on onnxruntime."""

    @property
    def name(self) -> str:
        return f"{self.model.label} {self.quant}"

    def export_dir(self, work_dir: Path) -> Path:
        kind = "gguf" if self.backend == LLAMA_CPP else "onnx"
        return work_dir / "exports" / f"{self.model.label}-{self.model.sha256[:12]}" / f"{kind}-{self.quant}"


def backend_specs(profile: TargetProfile, settings: FrontierSettings) -> dict[str, BackendSpec]:
    """The profile's llama.cpp and onnxruntime backends the ladders need; a ladder the profile cannot run is one
    clear error."""
    specs = {}
    for kind, name, ladder, flag in ((BackendKind.LLAMA_CPP, LLAMA_CPP, settings.gguf_types, "--gguf-types"),
                                     (BackendKind.ONNXRUNTIME, ONNXRUNTIME, settings.onnx_variants, "--onnx-variants")):
        spec = next((s for s in profile.backends if s.kind is kind), None)
        if ladder and spec is None:
            raise UserInputError(f"profile {profile.name!r} has no {name} backend to measure {flag} on; pass "
                                 f"{flag} none or a profile with a [[backend]] kind = \"{name}\"")
        if ladder:
            specs[name] = spec
    if not specs:
        raise UserInputError("no candidate to measure: --gguf-types and --onnx-variants are both none")
    return specs


def frontier_candidates(models: list[FrontierModel], settings: FrontierSettings,
                        specs: dict[str, BackendSpec]) -> list[Candidate]:
    candidates = []
    for model in models:
        if LLAMA_CPP in specs:
            candidates += [Candidate(model, LLAMA_CPP, quant) for quant in settings.gguf_types]
        if ONNXRUNTIME in specs:
            candidates += [Candidate(model, ONNXRUNTIME, quant) for quant in settings.onnx_variants]
    return candidates


class CandidateCheckFailed(Exception):
    """The candidate's artifact failed its own export check (its quality against the checkpoint it was made from):
    a measurement, not an error. The frontier lists it with the failed figure and measures it no further."""

    def __init__(self, reason: str, size_bytes: int) -> None:
        super().__init__(reason)
        self.reason, self.size_bytes = reason, size_bytes


def export_candidate(candidate: Candidate, work_dir: Path, settings: FrontierSettings,
                     progress: Progress | None = None) -> Path:
    """The candidate's validated artifact (a .gguf file, or an ONNX export directory): reused when an earlier run
    exported the same model content with the same settings, else exported now. An artifact that fails its export
    check raises `CandidateCheckFailed`, now and in later runs (the failed export's record is kept and read)."""
    from slimllm.core.errors import ValidationError
    from slimllm.exporters.records import export_or_reuse, read_export_record, reusable_export

    target = candidate.export_dir(work_dir)
    export, export_settings = _exporter(candidate, settings)
    failed = target.with_name(target.name + ".failed")
    if (record := reusable_export(failed, candidate.model.sha256, export_settings, passed=False)) is not None:
        raise CandidateCheckFailed(*_failure(record))
    try:
        export_or_reuse(export, candidate.model.checkpoint, target, candidate.model.sha256, export_settings,
                        announce=announcer(progress, f"export {candidate.name}"))
    except ValidationError as exc:
        record = reusable_export(failed, candidate.model.sha256, export_settings, passed=False)
        raise CandidateCheckFailed(*(_failure(record) if record else (str(exc), 0))) from exc
    if candidate.backend == ONNXRUNTIME:
        return target
    return target / next(iter(read_export_record(target)["files"]))


def _exporter(candidate: Candidate, settings: FrontierSettings):
    """The export function and its settings for the candidate: the same validation for every candidate."""
    from slimllm.exporters.gguf import GgufExportSettings, export_gguf
    from slimllm.exporters.onnx import OnnxExportSettings, export_onnx

    if candidate.backend == LLAMA_CPP:
        export_settings = GgufExportSettings(outtypes=[candidate.quant], eval_data=settings.eval_data,
                                             eval_seq_len=settings.eval_seq_len, eval_windows=2, tokenizer_lines=50)
        return export_gguf, export_settings
    quant = "none" if candidate.quant == "fp32" else candidate.quant
    return export_onnx, OnnxExportSettings(quant=quant, provider="cpu", eval_data=settings.eval_data, eval_windows=2)


def _failure(record: dict) -> tuple[str, int]:
    """What failed, in figures, and the size of the failed artifact."""
    files = record.get("files", {})
    reasons = [f"{info.get('type', name)}: PPL {info['ppl']:.2f} against {info['reference_ppl']:.2f} of its own "
               f"checkpoint (× {info['ppl_ratio']:.2f})" for name, info in files.items()
               if not info.get("passed", True) and "ppl_ratio" in info]
    reason = "failed its export check: " + ("; ".join(reasons) or "see validation.json of the failed export")
    return reason, sum(int(info.get("bytes", 0)) for info in files.values())


def artifact_bytes(artifact: Path) -> int:
    """What the candidate costs on disk: the file, or every file of an export directory but its records."""
    if artifact.is_file():
        return artifact.stat().st_size
    skip = {"validation.json", "slimllm_export.json"}
    return sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file() and p.name not in skip)
