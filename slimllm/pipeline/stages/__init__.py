"""The stage registry of `slimllm compile`: each stage declares what it reads, what keys its reuse, and how it runs.

    >>> [spec.name for spec in compile_stages()]
    ['prune', 'heal', 'export_onnx', 'export_gguf', 'evaluate', 'accuracy', 'profile', 'report']

A stage is one module of this package that registers a `StageSpec`: its place in the pipeline (`order`), what it
reads, its recipe section and settings class, and its block of the report. Nothing else lists stages: the pipeline
(`slimllm.pipeline.compiler`) runs every module here in `order`, the recipe reader takes their sections, and the
report stage asks each for its blocks. A stage is reused when the digest of its settings (`keyed_by`) and of the
content hashes of the stages it `reads` is unchanged and its outputs are intact. A stage reads other stages only
through their declared outputs and results (`CompileContext.outputs` / `.results`), never by reaching into their
directories. `docs/extending.md` walks through adding one.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from slimllm.core.progress import Progress


@dataclass
class CompileContext:
    """What every stage of one compile run sees."""

    out_dir: Path
    model_spec: str
    dense_dir: Path
    dense_sha: str
    settings: dict[str, Any]
    """Settings objects by section: compile, prune, trsp (or another method's), onnx, gguf; prune None = dense."""
    resume: bool
    device: str
    progress: Progress | None
    dtype: str = "auto"
    """Compute dtype of the stages that train (prune, heal): auto, fp32, fp16 or bf16."""
    placement: Any = None
    """How the PyTorch stages (prune, heal, evaluate, accuracy) place the model (`slimllm.core.placement.Placement`);
    None: whole, on `device`."""
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Declared outputs of finished stages (path, sha256, files ...), by stage name."""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Result records of finished stages, by stage name (what the manifest stores under `result`)."""
    manifest: Any = None
    """The run's manifest (`slimllm.pipeline.compiler.Manifest`): the records the report stage renders."""

    @property
    def compile(self):
        return self.settings["compile"]


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name (the manifest key it owns), what it reads, what keys it, when it runs, and its body."""

    name: str
    run: Callable[[CompileContext], tuple[dict[str, Any], dict[str, Any]]]
    """Runs the stage; returns (declared outputs, result record)."""
    order: int
    """Its place in the pipeline: stages run in increasing order (prune 10, heal 20, exports 30-31, ...)."""
    reads: tuple[str, ...] | None = ()
    """Stages whose outputs it reads: their content hashes are part of its key. None: every stage before it."""
    section: str | None = None
    """Its recipe section (`[heal]`), read into `settings_class`; None when [compile] holds its settings."""
    settings_class: type | None = None
    report: Callable[[dict[str, Any], dict[str, bytes]], list[dict[str, Any]]] | None = None
    """Its blocks of report.md from its result record (images it draws go into the dict); None: it has none."""
    keyed_by: Callable[[CompileContext], dict[str, Any]] = lambda ctx: {}
    """Settings and outside inputs (source hashes) that decide whether an earlier result is still valid."""
    enabled: Callable[[CompileContext], bool] = lambda ctx: True
    writes: tuple[str, ...] = ()
    """Names under the run directory it writes (a `compile --force` removes these and nothing else)."""
    version: int = 1
    """Bumped when what the stage computes changes, so that an earlier run's result is not reused as this one's."""


_STAGES: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> StageSpec:
    if spec.name in _STAGES and _STAGES[spec.name] is not spec:
        raise ValueError(f"compile stage {spec.name!r} is registered twice")
    _STAGES[spec.name] = spec
    return spec


def compile_stages() -> list[StageSpec]:
    """Every stage of this package, in pipeline order."""
    for module in pkgutil.iter_modules(__path__):
        import_module(f"{__name__}.{module.name}")
    return sorted(_STAGES.values(), key=lambda spec: spec.order)


def stages_read(spec: StageSpec) -> tuple[str, ...]:
    """The stages `spec` reads: its declared ones, or (`reads` None) every stage before it."""
    if spec.reads is not None:
        return spec.reads
    return tuple(other.name for other in compile_stages() if other.order < spec.order)


def stage_inputs(spec: StageSpec, ctx: CompileContext) -> dict[str, Any]:
    """What decides reuse: the stage's own key and the content hash of every stage output it reads."""
    return {
        "settings": spec.keyed_by(ctx),
        "reads": {name: ctx.outputs.get(name, {}).get("sha256") for name in stages_read(spec)},
        "version": spec.version,
    }


def stage_sections() -> dict[str, type]:
    """Recipe section -> settings class of every stage that has its own section, in pipeline order."""
    return {spec.section: spec.settings_class for spec in compile_stages() if spec.section is not None}


def source_hash(source: str | None) -> str | None:
    """Content hash of a local calibration or evaluation file; the name itself for hub sources and `self`."""
    from slimllm.core.artifacts import content_id

    return content_id(source)
