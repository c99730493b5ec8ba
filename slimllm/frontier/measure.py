"""One measurement protocol for every candidate, each result kept under the content of what it measured.

    >>> cache = MeasurementCache(work_dir)
    >>> quality = measure_quality(artifacts, dense, settings, cache)       # KLD, perplexity against the dense model

Quality is the KL divergence from the dense model (PyTorch, fp32) on the same windows, its 99th percentile, the
share of tokens with the same top-1 and the perplexity, over whole windows and over each window's second half
(llama-perplexity's protocol), as `slimllm eval --kl-reference` reports them; the task is zero-shot multiple choice
(acc_norm and llama.cpp's per-token rule, with standard errors); latency is the profile's prompt and generation lengths
in each backend, the candidates measured in turn. A result is reused when the artifact's content, the protocol and
(for latency) the machine are the same: adding a candidate measures only that candidate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimllm.core.artifacts import atomic_write_json, content_id, digest, machine_info, plain
from slimllm.core.progress import Progress
from slimllm.frontier.candidates import Candidate
from slimllm.frontier.models import FrontierModel
from slimllm.frontier.settings import FrontierSettings
from slimllm.latency.profiles import BackendSpec, TargetProfile

TASK_CONTEXT = 1024


@dataclass(frozen=True)
class Measured:
    """A candidate with its artifact on disk and the artifact's content hash."""

    candidate: Candidate
    artifact: Path
    sha256: str


class MeasurementCache:
    """`<work>/measurements/<kind>-<key>.json`, written atomically; `measured` lists what this run measured anew."""

    def __init__(self, work_dir: Path) -> None:
        self.directory = Path(work_dir) / "measurements"
        self.measured: list[str] = []

    def _path(self, kind: str, key: str) -> Path:
        return self.directory / f"{kind}-{key[:32]}.json"

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        path = self._path(kind, key)
        return json.loads(path.read_text()) if path.is_file() else None

    def put(self, kind: str, key: str, name: str, value: dict[str, Any]) -> None:
        atomic_write_json(self._path(kind, key), plain(value))
        self.measured.append(f"{kind} {name}")


QUALITY_VERSION = 2
"""Bumped when a quality record gains or changes a figure (2: perplexity over each window's second half)."""


def quality_key(item: Measured, dense: FrontierModel, settings: FrontierSettings, windows: int) -> str:
    return digest({"artifact": item.sha256, "backend": item.candidate.backend, "dense": dense.sha256,
                   "data": content_id(settings.eval_data), "seq_len": settings.eval_seq_len, "windows": windows,
                   "version": QUALITY_VERSION})


def measure_quality(items: list[Measured], dense: FrontierModel, settings: FrontierSettings, cache: MeasurementCache,
                    windows: int | None = None, progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """KLD and perplexity of every candidate against the dense model on the first `windows` evaluation windows."""
    from slimllm.evaluation.divergence import divergence_statistics
    from slimllm.exporters.parity import eval_windows
    from slimllm.exporters.scorers import open_backend

    windows = windows or settings.eval_windows
    kind = "quality" if windows == settings.eval_windows else f"quality{windows}"
    found = {item.candidate.name: cache.get(kind, quality_key(item, dense, settings, windows)) for item in items}
    missing = [item for item in items if found[item.candidate.name] is None]
    if missing:
        with open_backend(str(dense.checkpoint), "torch", "cpu", "fp32") as reference:
            ids, _ = eval_windows(reference.tokenizer, settings.eval_data, settings.eval_seq_len, windows)
            for index, item in enumerate(missing):
                if progress:
                    progress(index, len(missing), stage=f"KLD {item.candidate.name}")
                with open_backend(str(item.artifact), item.candidate.backend, "cpu", "fp32",
                                  context=int(ids.shape[1])) as scorer:
                    stats = divergence_statistics(scorer.logits_fn, reference.logits_fn, ids)
                value = {key: stats[key] for key in ("ppl", "reference_ppl", "ppl_ratio", "second_half", "kld",
                                                     "same_top1", "tokens")
                         if key in stats} | {"windows": int(ids.shape[0]), "seq_len": int(ids.shape[1])}
                cache.put(kind, quality_key(item, dense, settings, windows), item.candidate.name, value)
                found[item.candidate.name] = value
    return found


def task_key(item: Measured, settings: FrontierSettings) -> str:
    return digest({"artifact": item.sha256, "backend": item.candidate.backend, "task": settings.task,
                   "file": content_id(settings.task_file), "tasks": settings.tasks})


def measure_task(items: list[Measured], settings: FrontierSettings, cache: MeasurementCache,
                 progress: Progress | None = None) -> dict[str, dict[str, Any] | None]:
    """acc_norm (± its standard error), acc and llama.cpp's per-token rule of every candidate on the same tasks."""
    from slimllm.evaluation.accuracy import evaluate_tasks
    from slimllm.evaluation.tasks import default_task_file, read_task
    from slimllm.exporters.scorers import open_backend

    if settings.task is None or settings.tasks == 0:
        return {item.candidate.name: None for item in items}
    found = {item.candidate.name: cache.get("task", task_key(item, settings)) for item in items}
    missing = [item for item in items if found[item.candidate.name] is None]
    if missing:
        path = Path(settings.task_file) if settings.task_file else default_task_file(settings.task)
        tasks = read_task(settings.task, path)
        for index, item in enumerate(missing):
            if progress:
                progress(index, len(missing), stage=f"{settings.task} {item.candidate.name}")
            with open_backend(str(item.artifact), item.candidate.backend, "cpu", "fp32",
                              context=TASK_CONTEXT) as scorer:
                result = evaluate_tasks(scorer.sequence_log_probs, scorer.tokenizer, tasks, settings.task,
                                        limit=settings.tasks)
            value = {key: value for key, value in result.to_dict().items() if key != "correct"}
            cache.put("task", task_key(item, settings), item.candidate.name, value)
            found[item.candidate.name] = value
    return found


def speed_key(item: Measured, spec: BackendSpec, profile: TargetProfile) -> str:
    machine = machine_info()
    return digest({"artifact": item.sha256, "spec": plain(spec), "prompts": profile.prompt_lengths,
                   "generate": profile.generate_tokens, "repeats": profile.repeats, "warmup": profile.warmup,
                   "threads": profile.resolved_threads, "machine": [machine.get("cpu"), machine.get("cpu_count")]})


def measure_speed(items: list[Measured], specs: dict[str, BackendSpec], profile: TargetProfile, vocab: int,
                  cache: MeasurementCache, progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Prefill and decode tokens/s and peak memory of every candidate, the new ones of a backend measured in turn."""
    from slimllm.latency.profiler import measure_in_turn

    found = {item.candidate.name: cache.get("speed", speed_key(item, specs[item.candidate.backend], profile))
             for item in items}
    for backend, spec in specs.items():
        missing = [item for item in items if item.candidate.backend == backend and found[item.candidate.name] is None]
        if not missing:
            continue
        measured = measure_in_turn(spec, {item.candidate.name: item.artifact for item in missing}, profile, vocab,
                                   progress)
        for item in missing:
            cache.put("speed", speed_key(item, spec, profile), item.candidate.name, measured[item.candidate.name])
            found[item.candidate.name] = measured[item.candidate.name]
    return found
