"""`slimllm frontier`: prepare the models, export every candidate, measure them all the same way, find the Pareto
set per backend, choose, and write the table, the charts and the chosen artifact.

    >>> result = run_frontier("smollm2-135m", FrontierSettings(pruned=["shortgpt:8"], max_kld=0.1), "cpu-x86",
    ...                       Path("runs/frontier"))
    >>> print(result.choice.summary)          # runs/frontier/frontier.md, frontier-llama.cpp.png, best/
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimllm.core.artifacts import (
    atomic_directory,
    check_output_directory,
    library_versions,
    local_inputs,
    machine_info,
    mark_output,
    plain,
    sha256_tree,
)
from slimllm.core.errors import SlimllmError, UserInputError
from slimllm.core.progress import Progress
from slimllm.frontier.candidates import (
    Candidate,
    CandidateCheckFailed,
    artifact_bytes,
    backend_specs,
    export_candidate,
    frontier_candidates,
)
from slimllm.frontier.choice import Choice, choose
from slimllm.frontier.measure import Measured, MeasurementCache, measure_quality, measure_speed, measure_task
from slimllm.frontier.models import prepare_models
from slimllm.frontier.pareto import Interval, Point, pareto
from slimllm.frontier.results import CandidateResult
from slimllm.frontier.settings import FrontierSettings
from slimllm.latency.profiles import TargetProfile

log = logging.getLogger(__name__)

PROXY_WINDOWS = 2


class NothingFitsError(SlimllmError):
    """No measured candidate meets the constraints; the frontier is written all the same (exit code 1)."""


@dataclass
class FrontierResult:
    out_dir: Path
    results: list[CandidateResult]
    verdicts: dict[str, dict[str, dict[str, str | None]]]
    """Backend -> axis (decode, prefill, size) -> candidate -> None (on the frontier) or the one dominating it."""
    choice: Choice
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each phase: models (pruning and healing), exports, quality, task, latency."""
    measured: list[str] = field(default_factory=list)
    """What this run measured anew (the rest came from the work directory)."""


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def phase(self, name: str, started: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def run_frontier(
    model: str, settings: FrontierSettings, profile: str | TargetProfile, out_dir: Path,
    sections: dict[str, dict[str, Any]] | None = None, device: str = "auto", force: bool = False,
    progress: Progress | None = None, extra: dict[str, Path] | None = None,
) -> FrontierResult:
    """Measure every candidate of `model` on `profile` into `out_dir` (see the module's docstring). `sections` are
    the recipe's tables ([prune] and [heal] configure the pruned variants); `extra` adds checkpoints by label."""
    from slimllm.latency.profiler import check_backends_available
    from slimllm.latency.profiles import load_profile

    out_dir = Path(out_dir)
    profile = load_profile(profile) if not isinstance(profile, TargetProfile) else profile
    specs = backend_specs(profile, settings)
    check_backends_available(profile)
    _check_baseline(settings)
    if not (out_dir / "work").is_dir():  # a directory an earlier frontier run left is ours to continue
        check_output_directory(out_dir, force, protected=local_inputs(model))
    out_dir.mkdir(parents=True, exist_ok=True)
    mark_output(out_dir)
    work, clock, cache = out_dir / "work", _Clock(), MeasurementCache(out_dir / "work")
    started = time.perf_counter()
    models = prepare_models(model, settings, sections or {}, work, device, progress, extra)
    clock.phase("models", started)
    items, failed = _exported(frontier_candidates(models, settings, specs), work, settings, clock, progress)
    items, skipped = _within_budget(items, models[0], settings, cache, clock, progress, started)
    results = _measure(items, models[0], settings, specs, profile, cache, clock, progress)
    results += skipped + failed
    return _finish(out_dir, model, settings, profile, results, clock, cache, started, models)


def _check_baseline(settings: FrontierSettings) -> None:
    names = [f"dense {q}" for q in (*settings.gguf_types, *settings.onnx_variants)]
    if "min_speedup" in settings.constraints() and settings.baseline not in names:
        raise UserInputError(f"--baseline {settings.baseline!r} is not a candidate of this run; use one of "
                             f"{', '.join(names)}")


def _exported(candidates: list[Candidate], work: Path, settings: FrontierSettings, clock: _Clock,
              progress: Progress | None) -> tuple[list[Measured], list[CandidateResult]]:
    """Every candidate's validated artifact; a candidate whose artifact fails its export check is listed with the
    failed figure instead and measured no further."""
    started = time.perf_counter()
    items, failed = [], []
    for index, candidate in enumerate(candidates):
        if progress:
            progress(index, len(candidates), stage=f"export {candidate.name}")
        try:
            artifact = export_candidate(candidate, work, settings)
        except CandidateCheckFailed as exc:
            log.warning("%s %s", candidate.name, exc.reason)
            failed.append(CandidateResult(candidate.name, candidate.model.label, candidate.backend, candidate.quant,
                                          "", exc.size_bytes, notes=[exc.reason]))
            continue
        items.append(Measured(candidate, artifact, sha256_tree(artifact)))
    clock.phase("exports", started)
    return items, failed


def _within_budget(items, dense, settings, cache, clock, progress, started) -> tuple[list[Measured], list]:
    """With `max_minutes`: KLD on two windows for every candidate first; a candidate that another beats on both
    size and that KLD (beyond its standard error) is not measured further, nor any once the budget is spent."""
    if settings.max_minutes is None:
        return items, []
    phase = time.perf_counter()
    proxy = measure_quality(items, dense, settings, cache, PROXY_WINDOWS, progress)
    clock.phase("quality", phase)
    points = [Point(i.candidate.name, Interval.exact(-artifact_bytes(i.artifact)),
                    Interval.around(proxy[i.candidate.name]["kld"]["mean"], proxy[i.candidate.name]["kld"]["stderr"]))
              for i in items]
    verdict = pareto(points)
    kept, skipped = [], []
    spent = (time.perf_counter() - started) / 60
    per_candidate = settings.max_minutes / max(len(items), 1)
    for item in sorted(items, key=lambda i: artifact_bytes(i.artifact)):
        name = item.candidate.name
        if verdict[name] is not None:
            skipped.append(_unmeasured(item, proxy[name], f"not measured further: {verdict[name]} is smaller and "
                                       f"closer to the dense model on the {PROXY_WINDOWS}-window KLD"))
        elif spent + per_candidate * (len(kept) + 1) > settings.max_minutes:
            skipped.append(_unmeasured(item, proxy[name], "not measured further: the time budget was spent"))
        else:
            kept.append(item)
    return kept, skipped


def _unmeasured(item: Measured, proxy: dict, note: str) -> CandidateResult:
    return CandidateResult(item.candidate.name, item.candidate.model.label, item.candidate.backend,
                           item.candidate.quant, str(item.artifact), artifact_bytes(item.artifact),
                           quality=proxy, notes=[note])


def _measure(items, dense, settings, specs, profile, cache, clock, progress) -> list[CandidateResult]:
    from slimllm.models.attention_free import read_config

    phase = time.perf_counter()
    quality = measure_quality(items, dense, settings, cache, progress=progress)
    clock.phase("quality", phase)
    phase = time.perf_counter()
    task = measure_task(items, settings, cache, progress)
    clock.phase("task", phase)
    phase = time.perf_counter()
    vocab = int(read_config(str(dense.checkpoint)).vocab_size)
    speed = measure_speed(items, specs, profile, vocab, cache, progress)
    clock.phase("latency", phase)
    return [CandidateResult(i.candidate.name, i.candidate.model.label, i.candidate.backend, i.candidate.quant,
                            str(i.artifact), artifact_bytes(i.artifact), quality[i.candidate.name],
                            task[i.candidate.name], speed[i.candidate.name]) for i in items]


def frontier_verdicts(results: list[CandidateResult]) -> dict[str, dict[str, dict[str, str | None]]]:
    """Per backend and axis, every measured candidate's verdict (see `pareto`)."""
    verdicts: dict[str, dict[str, dict[str, str | None]]] = {}
    for backend in dict.fromkeys(r.backend for r in results):
        measured = [r for r in results if r.backend == backend and r.decode is not None]
        verdicts[backend] = {
            "decode": pareto([Point(r.name, r.decode, r.kld_interval) for r in measured]),
            "prefill": pareto([Point(r.name, r.prefill, r.kld_interval) for r in measured]),
            "size": pareto([Point(r.name, Interval.exact(r.size_bytes / 2**20), r.kld_interval) for r in measured],
                           speed_higher_is_better=False),
        }
    return verdicts


def _finish(out_dir, model, settings, profile, results, clock, cache, started, models) -> FrontierResult:
    from slimllm.frontier.report import write_frontier_report

    measured = [r for r in results if r.decode is not None]
    choice = choose(measured, settings.constraints(), settings.baseline)
    if choice.winner is not None:
        _copy_best(out_dir, choice.winner)
    clock.seconds["total"] = time.perf_counter() - started
    result = FrontierResult(out_dir, results, frontier_verdicts(results), choice, clock.seconds, cache.measured)
    payload = {
        "benchmark": "frontier", "model": model, "profile": profile.to_dict(),
        "settings": plain(settings), "candidates": [r.to_dict() for r in results], "frontier": result.verdicts,
        "choice": choice.to_dict(), "seconds": clock.seconds, "measured_this_run": cache.measured,
        "models": {m.label: {"checkpoint": str(m.checkpoint), "sha256": m.sha256, "seconds": _prepared_in(m.record)}
                   for m in models},
        "machine": machine_info(), "versions": library_versions(),
    }
    write_frontier_report(out_dir, payload, results, result.verdicts, choice)
    return result


def _prepared_in(record: dict[str, Any]) -> dict[str, float]:
    """The seconds pruning and healing took when the model was made (in this run or an earlier one)."""
    return {step: float(record[step]["seconds"]) for step in ("prune", "heal")
            if isinstance(record.get(step), dict) and "seconds" in record[step]}


def _copy_best(out_dir: Path, winner: CandidateResult) -> None:
    """`best/`: the chosen artifact, with the validation record of its export."""
    artifact = Path(winner.artifact)
    with atomic_directory(out_dir / "best", force=True) as tmp:
        if artifact.is_dir():
            shutil.copytree(artifact, tmp / artifact.name)
        else:
            shutil.copy2(artifact, tmp / artifact.name)
            for record in ("validation.json", "slimllm_export.json"):
                if (artifact.parent / record).is_file():
                    shutil.copy2(artifact.parent / record, tmp / record)
