"""The models of a frontier run: the dense model, and each pruned variant pruned and healed as `compile` would, each
kept in the work directory under a key of everything it was made from, so that a later run reuses it.

    >>> models = prepare_models("smollm2-135m", settings, sections, Path("runs/f/work"))
    >>> [(m.label, m.checkpoint) for m in models]
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimllm.core.artifacts import atomic_write_json, content_id, digest, plain
from slimllm.core.progress import Progress
from slimllm.core.settings import build_settings
from slimllm.frontier.settings import FrontierSettings, PrunedVariant

MODEL_RECORD = "slimllm_frontier_model.json"
"""Beside a finished model of the work directory: the key it was made under, and how."""


@dataclass(frozen=True)
class FrontierModel:
    label: str
    """`dense`, or the pruned variant's label (`shortgpt-8`)."""
    checkpoint: Path
    sha256: str
    record: dict[str, Any]


def prepare_models(
    model: str, settings: FrontierSettings, sections: dict[str, dict[str, Any]], work_dir: Path,
    device: str = "auto", progress: Progress | None = None, extra: dict[str, Path] | None = None,
) -> list[FrontierModel]:
    """The dense model, every pruned variant (pruned, repaired and healed with the recipe's [prune] and [heal]
    settings, or reused from the work directory), and `extra` checkpoints given by label (a compile run's healed
    model), in that order."""
    from slimllm.core.artifacts import sha256_tree
    from slimllm.models.loading import checkpoint_directory

    dense_dir = checkpoint_directory(model)
    dense = FrontierModel("dense", dense_dir, sha256_tree(dense_dir), {"model": model})
    models = [dense]
    for variant in settings.pruned_variants():
        models.append(_pruned(dense, variant, settings, sections, work_dir, device, progress))
    for label, checkpoint in (extra or {}).items():
        models.append(FrontierModel(label, Path(checkpoint), sha256_tree(Path(checkpoint)), {"given": str(checkpoint)}))
    return models


def variant_settings(variant: PrunedVariant, sections: dict[str, dict[str, Any]]):
    """(PruneSettings, the method's own settings, HealSettings) of one variant: the recipe's [prune], [method] and
    [heal] sections with the variant's method, budget and options over them."""
    from slimllm.pruning.registry import get_method
    from slimllm.pruning.settings import PruneSettings
    from slimllm.recovery.healing import HealSettings

    method = get_method(variant.method)
    own_target = ("method", "remove", "ratio") + (() if method.removes_layers else ("repair",))
    # the recipe's repair is for layer removal: a method that removes no layer (2SSP, DReSS) takes its default
    prune_values = {k: v for k, v in sections.get("prune", {}).items() if k not in own_target}
    budget = {}
    if method.removes_layers:
        budget = {"remove": int(variant.budget)} if variant.budget >= 1 else {"ratio": variant.budget}
    prune = build_settings(PruneSettings, prune_values, {"method": variant.method, **budget}, "[prune]")
    own = None
    if method.settings_class is not None:
        options = dict(variant.options)
        if not method.removes_layers:
            options["sparsity"] = variant.budget
        own = build_settings(method.settings_class, sections.get(method.name), _typed(method.settings_class, options),
                             f"[{method.name}]")
    heal_values = dict(sections.get("heal", {}))
    heal_values.setdefault("calib", prune.calib)
    heal = build_settings(HealSettings, heal_values, {}, "[heal]")
    return prune, own, heal


def _typed(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """`KEY=VALUE` strings as the settings class's field types read them (numbers as numbers, the rest as given)."""
    typed = {}
    for key, value in options.items():
        if isinstance(value, str):
            for convert in (int, float):
                try:
                    value = convert(value)
                    break
                except ValueError:
                    continue
        typed[key] = value
    return typed


def _pruned(dense: FrontierModel, variant: PrunedVariant, settings: FrontierSettings,
            sections: dict[str, dict[str, Any]], work_dir: Path, device: str,
            progress: Progress | None) -> FrontierModel:
    from slimllm.core.artifacts import sha256_tree
    from slimllm.pruning.stage import run_prune
    from slimllm.recovery.healing import run_heal

    prune, own, heal = variant_settings(variant, sections)
    key = digest({"dense": dense.sha256, "prune": plain(prune), "method": plain(own), "calib": content_id(prune.calib),
                  "heal": plain(heal) if settings.heal else None, "heal_text": content_id(heal.calib)})
    home = work_dir / "models" / f"{variant.label}-{key[:12]}"
    final = home / ("healed" if settings.heal else "pruned")
    record_path = home / MODEL_RECORD
    earlier = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if earlier.get("key") == key and final.is_dir():
        return FrontierModel(variant.label, final, sha256_tree(final), earlier)
    shutil.rmtree(home, ignore_errors=True)  # an unfinished earlier attempt under this key: ours to replace
    stage = _labelled(progress, f"{variant.label}: prune")
    pruned = run_prune(str(dense.checkpoint), prune, home / "pruned", device=device, method_settings=own,
                       progress=stage)
    record = {"key": key, "variant": dataclasses.asdict(variant), "prune": pruned.to_dict()}
    if settings.heal:
        healed = run_heal(home / "pruned", dataclasses.replace(heal, teacher=str(dense.checkpoint)), final,
                          device=device, progress=_labelled(progress, f"{variant.label}: heal"))
        record["heal"] = healed.to_dict()
    atomic_write_json(record_path, plain(record))
    return FrontierModel(variant.label, final, sha256_tree(final), record)


def _labelled(progress: Progress | None, label: str) -> Progress | None:
    if progress is None:
        return None

    def labelled(done: int, total: int, **postfix) -> None:
        progress(done, total, **{**postfix, "stage": f"{label} {postfix.get('stage', '')}".strip()})

    return labelled
