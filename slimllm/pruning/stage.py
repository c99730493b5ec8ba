"""The prune stage: load a model, choose layers with a method, remove them and save the pruned checkpoint.

>>> from slimllm.pruning.stage import PruneSettings, run_prune
>>> result = run_prune("smollm2-135m", PruneSettings(method="shortgpt", remove=8, calib="self"), Path("out/p"))
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimllm.core.artifacts import check_output_directory, local_inputs, plain
from slimllm.core.data import CalibrationData, load_calibration
from slimllm.core.device import dtype_name
from slimllm.core.errors import UserInputError
from slimllm.core.placement import Placement, PlacementNeeds, check_placement_supports, device_map_of
from slimllm.core.progress import Progress
from slimllm.models.architectures import decoder_layers
from slimllm.models.checkpoints import save_pruned_checkpoint
from slimllm.models.flops import ModelShape
from slimllm.models.loading import LoadedModel, load_model
from slimllm.pruning.candidates import candidate_layers, check_removable, layers_to_remove
from slimllm.pruning.registry import (
    Selection,
    SelectionRequest,
    get_method,
    method_settings_sections,
    select_layers_with,
)
from slimllm.pruning.settings import PruneSettings
from slimllm.pruning.surgery import SurgeryReport, remove_layers
from slimllm.recovery.repair import RepairMethod, repair_before_removal

"""Called with (done, total) and, from TRSP, keyword details (stage, loss)."""


@dataclass
class PruneResult:
    out_dir: Path | None
    method: str
    original_num_layers: int
    removed_layers: list[int]
    kept_layers: list[int]
    params_before: int
    params_after: int
    seconds: float
    selection_seconds: float
    calibration: dict | None
    scores: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    summary: str = ""
    """What the method removed, in one line, where it is more than whole layers (2SSP)."""
    removed_kinds: dict[int, str] = field(default_factory=dict)
    """What each removed layer was (Gemma 3: `local` or `global` attention)."""
    compute_removed: dict[str, float] = field(default_factory=dict)
    """Share of the forward FLOPs per token removed (`compute_removed_shares`)."""

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["out_dir"] = str(self.out_dir) if self.out_dir else None
        return payload


COMPUTE_CONTEXT = 512
"""Context length at which the removed share of the compute is stated."""


def compute_removed_shares(dense: ModelShape, pruned: ModelShape, context: int = COMPUTE_CONTEXT) -> dict[str, float]:
    """The share of a generated token's forward FLOPs (at `context`) that pruning removed: of the decoder blocks,
    and of the whole model with its LM head, which pruning keeps (for Gemma 3 270M the head is a large part)."""
    return {
        "context": context,
        "blocks": 1 - pruned.blocks_flops(context) / dense.blocks_flops(context),
        "with_lm_head": 1 - pruned.decode_flops(context) / dense.decode_flops(context),
    }


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def resolve_k(loaded: LoadedModel, settings: PruneSettings) -> tuple[int, list[int]]:
    """k and the candidate layers; a method that does not remove whole layers gets k = 0 and every layer."""
    num_layers = len(decoder_layers(loaded.model, loaded.architecture))
    if not settings.method.spec.removes_layers:
        if settings.remove is not None or settings.ratio is not None:
            raise UserInputError(
                f"{settings.method.value} sets its own target (see `slimllm prune --help`); drop --remove/--ratio"
            )
        return 0, list(range(num_layers))
    k = layers_to_remove(num_layers, settings.remove, settings.ratio)
    candidates = candidate_layers(num_layers, settings.protect_first, settings.protect_last)
    check_removable(num_layers, k, candidates)
    return k, candidates


def prune_placement_needs(settings: PruneSettings, method_settings: Any, architecture) -> PlacementNeeds:
    """What the chosen method and repair need of a model spread with `--device-map`: no weight training (TRSP
    with stage 2 or full stage 1, DReSS), every weight resident where they edit weights (2SSP, the repair)."""
    spec = get_method(settings.method)
    repair = settings.resolved_repair(method_settings, architecture)
    repairs = repair is not RepairMethod.NONE
    trains = spec.updates_weights(method_settings)
    alternatives = [spec.spread_alternative] if trains and spec.spread_alternative else []
    return PlacementNeeds(
        f"--method {spec.name}" + (f" with --repair {repair.value}" if repairs else ""),
        trains_weights=trains,
        edits_weights=spec.edits_model or repairs,
        alternatives=alternatives + (["--repair none"] if repairs and not spec.edits_model else []),
    )


def check_prune_placement(loaded: LoadedModel, settings: PruneSettings, method_settings: Any = None) -> bool:
    """Refuse, before any work, a method or repair that a model spread with `--device-map` cannot run (one that
    trains weights, or edits offloaded ones); returns whether the run edits weights."""
    needs = prune_placement_needs(settings, method_settings, loaded.architecture)
    check_placement_supports(loaded.model, needs)
    return needs.edits_weights


def prune_in_memory(
    loaded: LoadedModel,
    settings: PruneSettings,
    calibration: CalibrationData | None = None,
    progress: Progress | None = None,
    inplace: bool = False,
    method_settings: Any = None,
    work_dir: Path | None = None,
    resume: bool = False,
) -> tuple[torch.nn.Module, SurgeryReport, Selection, float]:
    """Select and remove layers; returns the pruned model, the surgery report, the selection and its seconds.

    The loaded model is left intact unless `inplace` (which saves a copy of the weights); a method that trains
    works on a copy otherwise. `method_settings` are the method's own settings (None: its defaults).
    """
    k, candidates = resolve_k(loaded, settings)
    spec = get_method(settings.method)
    repair_method = settings.resolved_repair(method_settings, loaded.architecture)
    if repair_method is not RepairMethod.NONE and spec.transfers_removed_work(method_settings):
        raise UserInputError(
            f"--repair {repair_method.value} fits the removed layers' outputs, but {spec.name} has already trained "
            "the kept layers to do without them; use --repair none, or (TRSP) --stage2 none with gates-only stage 1"
        )
    if repair_method is not RepairMethod.NONE and not spec.removes_layers:
        raise UserInputError(
            f"--repair {repair_method.value} repairs removed layers, and {spec.name} removes none; use --repair none"
        )
    edits = check_prune_placement(loaded, settings, method_settings)
    started = time.perf_counter()
    changes_weights = spec.updates_weights(method_settings) or edits
    model = loaded.model if inplace or not changes_weights else copy.deepcopy(loaded.model)
    request = SelectionRequest(
        model,
        calibration.blocks if calibration is not None else None,
        k,
        candidates,
        settings.batch_size,
        settings.seed,
        settings=method_settings,
        work_dir=work_dir,
        resume=resume,
        progress=progress,
    )
    selection = select_layers_with(spec, request)
    model = selection.model if selection.model is not None else model
    repair = repair_before_removal(
        model, selection.removed_layers, request.blocks, settings.batch_size, repair_method, settings.repair_ridge,
        progress,
    )
    if repair is not None:
        selection.details["repair"] = repair
    seconds = time.perf_counter() - started
    pruned, report = remove_layers(model, selection.removed_layers, inplace=inplace or changes_weights)
    return pruned, report, selection, seconds


def resolve_prune_settings(
    recipe: dict[str, dict[str, Any]] | Path | str | None = None,
    given: dict[str, dict[str, Any]] | None = None,
    flag_names: dict[str, str] | None = None,
) -> tuple[PruneSettings, Any]:
    """`PruneSettings` and the chosen method's own settings from class defaults < recipe < values given.

    `recipe` is a recipe file or its loaded sections; `given` maps a section (`prune`, or a method's name such as
    `trsp`) to the values given for it (flags, or a Python caller's overrides). Values given for another method's
    section than the chosen one are an error rather than silently ignored.
    """
    from slimllm.core.settings import build_settings, read_toml

    # A recipe file's other sections belong to other stages: `slimllm.pipeline.recipes.load_recipe` checks them all.
    sections = read_toml(Path(recipe), "recipe") if isinstance(recipe, (str, Path)) else dict(recipe or {})
    given = {name: values for name, values in (given or {}).items() if values}
    settings = build_settings(PruneSettings, sections.get("prune"), given.get("prune", {}), "[prune]", flag_names)
    spec = get_method(settings.method)
    for section, cls in method_settings_sections().items():  # every method section of the recipe is checked
        if section in sections and section != spec.name:
            build_settings(cls, sections[section], {}, f"[{section}]")
    chosen = given.get(spec.name, {})
    for section, values in given.items():
        # a flag several methods share (`--sparsity`) reaches every one of their sections: the chosen one reads it
        values = {key: value for key, value in values.items() if key not in chosen or chosen[key] != value}
        if section not in ("prune", spec.name) and values:
            flags = ", ".join((flag_names or {}).get(key, key) for key in values)
            raise UserInputError(f"{flags} set {section} settings, but --method is {spec.name}; drop them")
    if spec.settings_class is None:
        return settings, None
    own = build_settings(spec.settings_class, sections.get(spec.name), given.get(spec.name, {}), f"[{spec.name}]",
                         flag_names)
    return settings, own


def work_directory(out_dir: Path) -> Path:
    """Where resumable state lives while a stage runs: beside the output, never inside it."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def run_prune(
    model: str | LoadedModel,
    settings: PruneSettings | None,
    out_dir: Path,
    force: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress | None = None,
    method_settings: Any = None,
    resume: bool = False,
    recipe: Path | str | None = None,
    placement: Placement | None = None,
) -> PruneResult:
    """The whole stage: load, calibrate, select, remove and save to `out_dir` (atomically).

    Pass `settings` (and the method's own `method_settings`), or `settings=None` with `recipe=` a TOML file whose
    `[prune]` and method sections give them (`resolve_prune_settings` combines a recipe with overrides).
    TRSP checkpoints to `<out_dir>.partial/` after every round; `resume=True` continues from there.
    A spreading `placement` (`--device-map auto`) loads the model over the GPUs, host memory and disk.
    """
    started = time.perf_counter()
    if settings is None:
        settings, from_recipe = resolve_prune_settings(recipe)
        method_settings = method_settings if method_settings is not None else from_recipe
    work_dir = work_directory(Path(out_dir))
    inputs = local_inputs(model) if isinstance(model, (str, Path)) else []
    if not resume:
        check_output_directory(Path(out_dir), force, protected=inputs)  # fail before any expensive work
    elif not work_dir.is_dir():
        raise UserInputError(f"nothing to resume: {work_dir} does not exist; run without --resume")
    owns_model = not isinstance(model, LoadedModel)
    loaded = model if not owns_model else load_model(
        model, device=device, dtype=dtype, for_training=settings.method.trains_weights, placement=placement)
    resolve_k(loaded, settings)  # validate k and protection before calibrating
    check_prune_placement(loaded, settings, method_settings)
    calibration = None
    repair = settings.resolved_repair(method_settings, loaded.architecture)
    if settings.method.needs_calibration or repair is not RepairMethod.NONE:
        args = (settings.calib, loaded.model, loaded.tokenizer, settings.calib_blocks, settings.block_len)
        calibration = load_calibration(*args, settings.seed)
    dense_shape = ModelShape.from_config(loaded.model.config)  # before an in-place prune changes it
    params_before = count_parameters(loaded.model)
    pruned, report, selection, selection_seconds = prune_in_memory(
        loaded,
        settings,
        calibration,
        progress,
        inplace=owns_model,
        method_settings=method_settings,
        work_dir=work_dir / settings.method.value,
        resume=resume,
    )
    params_after = count_parameters(pruned)
    seconds = time.perf_counter() - started
    result = PruneResult(
        out_dir=Path(out_dir),
        method=settings.method.value,
        original_num_layers=report.original_num_layers,
        removed_layers=report.removed_layers,
        kept_layers=report.kept_layers,
        params_before=params_before,
        params_after=params_after,
        seconds=seconds,
        selection_seconds=selection_seconds,
        calibration=calibration.describe() if calibration else None,
        scores=selection.scores,
        details=selection.details,
        notes=loaded.notes + report.notes,
        summary=selection.summary,
        removed_kinds=report.removed_kinds,
        compute_removed=compute_removed_shares(dense_shape, ModelShape.from_config(pruned.config)),
    )
    record = _pruning_record(loaded, settings, result, report)
    save_pruned_checkpoint(
        pruned, loaded.tokenizer, Path(out_dir), record, force=force or resume, protected=[*inputs, loaded.source.path]
    )
    shutil.rmtree(work_dir, ignore_errors=True)
    return result


def _pruning_record(loaded: LoadedModel, settings: PruneSettings, result: PruneResult, report: SurgeryReport) -> dict:
    """`slimllm_pruning.json`: what was removed from what, how, with which data, and what it cost."""
    return {
        "source_model": loaded.source.spec,
        "original_num_layers": report.original_num_layers,
        "kept_layers": report.kept_layers,
        "removed_layers": report.removed_layers,
        "removed_kinds": {str(i): kind for i, kind in report.removed_kinds.items()},
        "compute_removed": result.compute_removed,
        "method": settings.method.value,
        "settings": plain(settings),
        "calibration": result.calibration,
        "seed": settings.seed,
        "scores": result.scores,
        "details": result.details,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "timings": {"selection_s": round(result.selection_seconds, 3), "total_s": round(result.seconds, 3)},
        "device": str(loaded.device),
        "device_map": device_map_of(loaded.model) or None,
        "dtype": dtype_name(loaded.dtype),
        "notes": result.notes,
        "summary": result.summary,
    }
