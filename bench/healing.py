"""Healing levers at equal tokens: what healing trains on, how the teacher is consulted, and the schedule.

    python bench/healing.py --tokens 32768 --hellaswag-tasks 400
    python bench/healing.py --device cuda --tokens 4194304 16777216 --batch-size 32 --rows wikitext \
        "half teacher text" --tag gpu          # make gpu-heal

One pruned model (the demo's: ShortGPT removes 8 of SmolLM2-135M's 30 layers, least-squares repair, calibrated on
WikiText-2 validation without its last tenth), healed once per row with the demo's settings and one lever changed,
every row the same number of tokens. Each row is scored against the dense model on the WikiText-2 test windows
(perplexity over whole windows and over their second halves, as llama-perplexity scores, and KLD), on the development
slice (the last tenth of the validation text, which no row calibrates, trains or writes prompts from: choices are
made on it), and on HellaSwag (acc_norm and llama.cpp's per-token rule, with standard errors). Rows are cached one
by one under --work-dir, keyed by their settings, and a row's training state is saved every 50 steps, so an
interrupted run resumes inside the row it was healing. With several --tokens, every row heals at each budget;
--max-minutes skips the rows that would not finish in time (each estimated from the tokens/s the run has measured),
and says so.

Writes bench/results/healing-<model>[-<tag>].json and .md with the machine, library versions and settings.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speed_common import DATA_DIR, HELLASWAG_FILE, REPO_ROOT, RESULTS_DIR  # noqa: E402

from slimllm.core.artifacts import (  # noqa: E402
    atomic_write_json,
    atomic_write_text,
    digest,
    library_versions,
    machine_info,
    plain,
)
from slimllm.core.data import (  # noqa: E402
    DataPurpose,
    bos_prefix_id,
    load_calibration,
    load_corpus,
    split_development,
    tokenize_corpus,
)
from slimllm.evaluation.accuracy import evaluate_tasks, pad_token_id  # noqa: E402
from slimllm.evaluation.divergence import per_token_divergence, summarize  # noqa: E402
from slimllm.evaluation.perplexity import split_windows, torch_logits_fn  # noqa: E402
from slimllm.evaluation.sequence_scoring import torch_shared_prefix_log_probs  # noqa: E402
from slimllm.evaluation.tasks import read_task  # noqa: E402
from slimllm.models.loading import load_model  # noqa: E402
from slimllm.pruning.settings import PruneSettings  # noqa: E402
from slimllm.pruning.stage import prune_in_memory  # noqa: E402
from slimllm.recovery.healing import HealScope, HealSettings, heal_model, layers_next_to_cuts  # noqa: E402
from slimllm.recovery.training import frozen_teacher  # noqa: E402
from slimllm.recovery.training_text import training_text  # noqa: E402

DEV_FRACTION = 0.1
"""The development slice: the last tenth of the validation text."""

@dataclasses.dataclass(frozen=True)
class Row:
    """One lever: what differs from the demo's pruning and healing."""

    description: str
    heal: dict[str, Any] = dataclasses.field(default_factory=dict)
    """HealSettings that differ from the demo's."""
    prune: dict[str, Any] = dataclasses.field(default_factory=dict)
    """PruneSettings that differ from the demo's (another selection, fewer calibration blocks)."""
    method: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The method's own settings; `sparsity: "depth"` is the block-parameter share of removing --remove layers."""
    rounds: int = 1
    """Iterative pruning: remove --remove / rounds layers, heal --tokens / rounds, re-score on the healed model,
    repeat (each round's text drawn with its own seed)."""

    @property
    def pruning(self) -> dict[str, Any]:
        """How the row prunes, as its cache key and result record it."""
        return {"prune": self.prune, "method_settings": self.method, "rounds": self.rounds}


DEMO_PRUNING = Row("the demo's pruning").pruning
"""A row that prunes as the demo does (its cache key leaves the pruning out, as it did before rows could change it)."""

ROWS: dict[str, Row] = {
    "wikitext": Row("the demo's healing: WikiText-2 blocks, the teacher run on every batch, constant LR 1e-4"),
    "wikitext, stored top-64": Row("the teacher's top-64 stored once; no teacher pass per step",
                                   {"teacher_top_k": 64}),
    "teacher text": Row("every block written by the dense model from 16-token WikiText openings (T 0.8, top-p 0.95)",
                        {"teacher_text": 1.0, "teacher_prompts": "calibration"}),
    "half teacher text": Row("half the blocks WikiText-2, half written by the dense model",
                             {"teacher_text": 0.5, "teacher_prompts": "calibration"}),
    "cosine 3e-4": Row("peak LR 3e-4, cosine decay to a tenth", {"lr_schedule": "cosine", "lr": 3e-4}),
    "shortgpt, 8 blocks": Row("ShortGPT selection and least-squares repair on 8 calibration blocks instead of 32 (the "
                              "control of the sleb-kl row)", prune={"calib_blocks": 8}),
    "sleb-kl, 8 blocks": Row("output-aware selection: greedy by the KL to the unpruned model's top-64, re-scored after "
                             "each removal, on 8 calibration blocks (its search costs one suffix pass per candidate "
                             "per step); least-squares repair on the same blocks", prune={"method": "sleb-kl",
                                                                                          "calib_blocks": 8}),
    "iterative 2 x 4": Row("ShortGPT removes 4 layers, repair, heal half the tokens; ShortGPT re-scores the healed "
                           "model and removes 4 more, repair, heal the other half", rounds=2),
    "cuts scope": Row("only the kept layers next to each cut and the final norm train (full healing trains every "
                      "weight)", {"scope": "cuts"}),
    "2ssp width + attention": Row("2SSP at the same block-parameter share as removing the layers (FFN neurons of "
                                  "every block, then whole attention modules), no repair, healed like the depth rows",
                                  prune={"method": "2ssp", "repair": "none"}, method={"sparsity": "depth"}),
}
"""Row name -> what differs from the demo's pruning and healing."""


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, default=8)
    parser.add_argument("--method", default="shortgpt", help="How the layers are chosen (the demo: shortgpt).")
    parser.add_argument("--calib-blocks", type=int, default=32, help="Selection and repair blocks of 512 tokens.")
    parser.add_argument("--calib", default=str(DATA_DIR / "wiki.valid.tokens"))
    parser.add_argument("--eval-data", default=str(DATA_DIR / "wiki.test.raw"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[32_768], help="Healing tokens of every row.")
    parser.add_argument("--batch-size", type=int, default=2, help="Blocks of 512 tokens per healing step.")
    parser.add_argument("--generate-batch", type=int, default=8, help="Teacher samples written together.")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-minutes", type=float, default=None, help="Skip rows that would end after this.")
    parser.add_argument("--tag", default="", help="Suffix of the result file names.")
    parser.add_argument("--step-timing", type=int, default=8,
                        help="Training steps timed per teacher mode, the modes alternating step by step (0: none).")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="Test and development windows.")
    parser.add_argument("--hellaswag-tasks", type=int, default=400)
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench-healing")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args()


def say(message: str) -> None:
    print(f"[healing] {message}", file=sys.stderr, flush=True)


class Scorer:
    """The dense model's reference figures, and every row scored the same way against it."""

    def __init__(self, args: argparse.Namespace, loaded) -> None:
        self.args, self.loaded = args, loaded
        self.device = next(loaded.model.parameters()).device
        bos = bos_prefix_id(loaded.tokenizer)
        test_ids = tokenize_corpus(load_corpus(args.eval_data, DataPurpose.EVALUATION), loaded.tokenizer)
        self.test = split_windows(test_ids, args.seq_len, args.windows, bos)
        calib_ids = tokenize_corpus(load_corpus(args.calib, DataPurpose.CALIBRATION), loaded.tokenizer)
        self.dev = split_windows(split_development(calib_ids, DEV_FRACTION)[1], args.seq_len, args.windows, bos)
        self.tasks = read_task("hellaswag", str(HELLASWAG_FILE)) if args.hellaswag_tasks else None

    def score(self, model: torch.nn.Module) -> dict[str, Any]:
        reference = torch_logits_fn(self.loaded.model)
        test = summarize(per_token_divergence(torch_logits_fn(model), reference, self.test))
        dev = summarize(per_token_divergence(torch_logits_fn(model), reference, self.dev))
        scores = {
            "ppl": test["ppl"], "ppl_ratio": test["ppl_ratio"], "ppl_second_half": test["second_half"]["ppl"],
            "ppl_ratio_second_half": test["second_half"]["ppl_ratio"],
            "kld": test["kld"]["mean"], "kld_stderr": test["kld"]["stderr"], "kld_99": test["kld"]["99%"],
            "same_top1": test["same_top1"]["mean"], "dense_ppl": test["reference_ppl"],
            "dense_ppl_second_half": test["second_half"]["reference_ppl"],
            "dev_ppl": dev["ppl"], "dev_kld": dev["kld"]["mean"], "dev_kld_stderr": dev["kld"]["stderr"],
        }
        if self.tasks is not None:
            say(f"HellaSwag, {self.args.hellaswag_tasks} tasks ...")
            result = evaluate_tasks(torch_shared_prefix_log_probs(model, pad_token_id(self.loaded.tokenizer)),
                                    self.loaded.tokenizer, self.tasks, limit=self.args.hellaswag_tasks)
            scores |= {"acc_norm": result.acc_norm, "acc_norm_stderr": result.acc_norm_stderr,
                       "acc_per_token": result.acc_per_token, "acc_per_token_stderr": result.acc_per_token_stderr}
        return scores


@dataclasses.dataclass
class Pruned:
    """A pruned model and what was removed, in the dense model's layer indices."""

    model: torch.nn.Module
    settings: PruneSettings
    removed: list[int]
    kept: list[int]
    summary: str = ""


def prune(args: argparse.Namespace, loaded, row: Row, remove: int | None = None, kept: list[int] | None = None,
          seed: int = 0) -> Pruned:
    """The demo's pruning (or the row's selection with the demo's repair), calibrated without the development slice.
    `kept`: the dense model's indices of `loaded`'s layers (a model pruned before, for iterative rounds)."""
    from slimllm.pruning.registry import get_method

    num_layers = loaded.model.config.num_hidden_layers
    kept = kept if kept is not None else list(range(num_layers))
    spec = get_method(row.prune.get("method", args.method))
    count = (remove or args.remove) if spec.removes_layers else None  # 2SSP and DReSS set their own target
    settings = PruneSettings(**({"method": args.method, "remove": count, "calib": args.calib,
                                 "calib_blocks": args.calib_blocks, "block_len": 512, "batch_size": 2, "repair": "lsq",
                                 "seed": seed} | row.prune))
    method_settings = None
    if spec.settings_class is not None:
        own = dict(row.method)
        if own.get("sparsity") == "depth":
            own["sparsity"] = args.remove / num_layers
        method_settings = spec.settings_class(**own)
    calibration = load_calibration(args.calib, loaded.model, loaded.tokenizer, settings.calib_blocks,
                                   settings.block_len, settings.seed, holdout=DEV_FRACTION)
    model, _, selection, _ = prune_in_memory(loaded, settings, calibration, method_settings=method_settings)
    removed = [kept[i] for i in selection.removed_layers]
    say(f"{settings.method.value} removed layers {removed} {selection.summary}")
    return Pruned(model, settings, removed, [k for i, k in enumerate(kept) if i not in selection.removed_layers],
                  selection.summary)


def demo_heal_settings(args: argparse.Namespace, tokens: int, **overrides) -> HealSettings:
    return HealSettings(**({"calib": args.calib, "tokens": tokens, "scope": "full", "lr": 1e-4, "distill": 1.0,
                            "block_len": 512, "batch_size": args.batch_size} | overrides))


def heal_row(args: argparse.Namespace, loaded, pruned: Pruned, settings: HealSettings,
             state_dir: Path) -> dict[str, Any]:
    """Heal a copy of the pruned model as `settings` say; returns the timings and the healed model. The training
    state is saved under `state_dir` every `settings.save_every` steps, and a rerun continues from it."""
    teacher = frozen_teacher(loaded.model)
    written = dataclasses.replace(settings.written_text, batch_size=args.generate_batch)
    text = training_text(settings.calib, loaded.tokenizer, settings.tokens, settings.block_len, settings.batch_size,
                         settings.seed, teacher, written, holdout=DEV_FRACTION)
    student = copy.deepcopy(pruned.model)
    for p in student.parameters():
        p.requires_grad_(True)
    near_cuts = None
    if settings.scope is HealScope.CUTS:
        near_cuts = layers_next_to_cuts(pruned.kept, len(pruned.kept) + len(pruned.removed))
    healed, result = heal_model(student, text.blocks, settings, teacher if settings.distill > 0 else None,
                                work_dir=state_dir, resume=True, state_key=state_dir.name,
                                teacher_key=f"dense {args.model}", trainable_layers=near_cuts)
    if result.resumed_from_step:
        say(f"continued from step {result.resumed_from_step} of {result.steps}")
    return {"model": healed, "tokens": result.tokens, "heal_seconds": result.seconds,
            "tokens_per_s": result.tokens_per_second, "teacher_seconds": result.teacher_seconds,
            "first_run_tokens_per_s": result.tokens / (result.seconds + result.teacher_seconds),
            "text": text.source, "teacher_blocks": text.teacher_blocks, "final_ce": result.losses[-1],
            "final_kl": result.kl[-1] if result.kl else None, "peak_memory_gib": result.peak_memory_gib,
            "trainable_params": result.trainable_params, "removed_layers": pruned.removed,
            "prune_summary": pruned.summary}


def heal_iteratively(args: argparse.Namespace, loaded, row: Row, settings: HealSettings,
                     state_dir: Path) -> dict[str, Any]:
    """`row.rounds` rounds of prune --remove / rounds layers, heal --tokens / rounds; the figures of all rounds."""
    current, kept, rounds, timings = loaded, None, [], {}
    for index in range(row.rounds):
        pruned = prune(args, current, row, remove=args.remove // row.rounds, kept=kept, seed=index)
        round_settings = dataclasses.replace(settings, tokens=settings.tokens // row.rounds, seed=index)
        healed = heal_row(args, loaded, pruned, round_settings, state_dir.with_name(f"{state_dir.name}-{index}"))
        current, kept = dataclasses.replace(loaded, model=healed["model"]), pruned.kept
        rounds.append({key: value for key, value in healed.items() if key != "model"})
        for key in ("tokens", "heal_seconds", "teacher_seconds"):
            timings[key] = timings.get(key, 0) + healed[key]
    return rounds[-1] | timings | {
        "model": current.model, "removed_layers": sorted(set(range(len(kept) + args.remove)) - set(kept)),
        "tokens_per_s": timings["tokens"] / timings["heal_seconds"],
        "first_run_tokens_per_s": timings["tokens"] / (timings["heal_seconds"] + timings["teacher_seconds"]),
        "rounds": rounds}


def prune_key(row: Row) -> str:
    return digest({"prune": row.prune, "method": row.method})


def run_rows(args: argparse.Namespace, loaded, scorer: Scorer, demo: Pruned) -> dict[str, dict[str, Any]]:
    """Every row at every budget, each cached as soon as it is scored; rows past --max-minutes are skipped."""
    rows: dict[str, dict[str, Any]] = {}
    pruned_models = {prune_key(ROWS["wikitext"]): demo}
    started, rate, scoring_seconds = time.perf_counter(), None, 0.0
    for tokens in args.tokens:
        for name in args.rows:
            label = name if len(args.tokens) == 1 else f"{name}, {tokens:,} tokens"
            row = ROWS[name]
            settings = demo_heal_settings(args, tokens, **row.heal)
            pruning = row.pruning
            key = digest({"row": plain(settings), "model": args.model, "remove": args.remove,
                          **({"method": args.method, "calib_blocks": args.calib_blocks}
                             if (args.method, args.calib_blocks) != ("shortgpt", 32) else {}),
                          **({"pruning": pruning} if pruning != DEMO_PRUNING else {}),
                          "scoring": scoring(args), "device": str(scorer.device)})
            cached = args.work_dir / "rows" / f"{key[:24]}.json"
            if cached.is_file():
                rows[label] = json.loads(cached.read_text())
                say(f"{label}: cached")
                continue
            if args.max_minutes is not None and rate is not None:
                expected = (time.perf_counter() - started + tokens / rate + scoring_seconds) / 60
                if expected > args.max_minutes:
                    say(f"{label}: skipped, it would end after {expected:.1f} of {args.max_minutes} minutes")
                    rows[label] = {"skipped": f"would end after {expected:.1f} of {args.max_minutes} minutes",
                                   "description": row.description}
                    continue
            say(f"{label}: healing {settings.tokens} tokens ...")
            state_dir = args.work_dir / "state" / key[:24]
            if row.rounds > 1:
                result = heal_iteratively(args, loaded, row, settings, state_dir)
            else:
                if prune_key(row) not in pruned_models:
                    pruned_models[prune_key(row)] = prune(args, loaded, row)
                result = heal_row(args, loaded, pruned_models[prune_key(row)], settings, state_dir)
            model, rate = result.pop("model"), result["tokens_per_s"]
            scored = time.perf_counter()
            result |= {"description": row.description, "settings": plain(settings), "pruning": pruning}
            result |= scorer.score(model)
            scoring_seconds = time.perf_counter() - scored
            atomic_write_json(cached, result)
            for finished in state_dir.parent.glob(f"{state_dir.name}*"):
                shutil.rmtree(finished, ignore_errors=True)
            rows[label] = result
            say(f"{label}: PPL {result['ppl']:.3f}, KLD {result['kld']:.4f}, {result['tokens_per_s']:.0f} tok/s")
    return rows


def scoring(args: argparse.Namespace) -> dict[str, Any]:
    return {"eval": args.eval_data, "seq_len": args.seq_len, "windows": args.windows,
            "hellaswag": args.hellaswag_tasks, "dev_fraction": DEV_FRACTION}


def tie_note(rows: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per row, against the first row: which differences exceed two standard errors (the rest are ties)."""
    base = next(iter(rows.values()), None)
    notes = {}
    for name, row in rows.items():
        if base is None or "skipped" in base or row is base or "skipped" in row:
            continue
        parts = []
        for metric, se, better in (("kld", "kld_stderr", -1), ("acc_norm", "acc_norm_stderr", 1),
                                   ("acc_per_token", "acc_per_token_stderr", 1)):
            if metric not in row:
                continue
            gap = row[metric] - base[metric]
            bound = 2 * math.hypot(row[se], base[se])
            verdict = "tie" if abs(gap) <= bound else ("better" if gap * better > 0 else "worse")
            parts.append(f"{metric} {verdict}")
        notes[name] = ", ".join(parts)
    return notes


def markdown(payload: dict[str, Any]) -> str:
    rows, dense = payload["rows"], payload["dense"]
    lines = [
        f"# Healing levers at equal tokens: {payload['settings']['model']}, {payload['settings']['remove']} layers "
        f"removed by {payload['settings']['method']} ({payload['settings']['removed_layers']})",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {payload['machine'].get('cpu', '')}, {payload['machine'].get('cpu_count', '')} cores; torch "
        f"{payload['versions'].get('torch', '')}, transformers {payload['versions'].get('transformers', '')}.",
        "",
        f"Every row heals the same pruned model for {' / '.join(f'{t:,}' for t in payload['settings']['tokens'])} "
        f"tokens (block 512, batch {payload['settings']['batch_size']}, CE + 1 × KL to the dense model, full "
        f"weights) on {payload['device']}. Test: WikiText-2 test, "
        f"{payload['settings']['windows']} × {payload['settings']['seq_len']} tokens; PPL ½ scores each window's "
        "second half, as llama-perplexity does. Dev: the last tenth of WikiText-2 validation, which nothing trained "
        f"on. HellaSwag: the first {payload['settings']['hellaswag_tasks']} validation tasks, ± one standard error. "
        "Against the first row, a difference within two standard errors is a tie.",
        "",
        "| row | PPL | PPL ½ | KLD | dev PPL | dev KLD | acc_norm % | per-token % | train tok/s | first-run tok/s "
        "| vs first row |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| dense | {dense['ppl']:.3f} | {dense['ppl_second_half']:.3f} | 0 | {dense['dev_ppl']:.3f} | 0 | "
        f"{_pct(dense, 'acc_norm')} | {_pct(dense, 'acc_per_token')} | | | |",
    ]
    for name, row in rows.items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} |" + " |" * 9)
            continue
        lines.append(
            f"| {name} | {row['ppl']:.3f} | {row['ppl_second_half']:.3f} | {row['kld']:.4f} ± {row['kld_stderr']:.4f} "
            f"| {row['dev_ppl']:.3f} | {row['dev_kld']:.4f} | {_pct(row, 'acc_norm')} | {_pct(row, 'acc_per_token')} "
            f"| {row['tokens_per_s']:.0f} | {row['first_run_tokens_per_s']:.0f} | {payload['ties'].get(name, '')} |"
        )
    lines += ["", "Rows:", ""] + [f"- **{name}**: {row['description']}.{_removal(row)}" for name, row in rows.items()]
    lines += ["", "train tok/s excludes the one teacher pass a stored top-k needs; first-run tok/s includes it (a "
              "rerun, a resume or another candidate on the same blocks reads the stored pass instead).", ""]
    timing = payload.get("step_timing")
    if timing:
        lines += [
            "## Seconds per healing step, the teacher modes alternating step by step", "",
            f"{timing['steps']} steps per mode after one warm-up step, {timing['tokens_per_step']} tokens a step, "
            "median:", "", "| teacher | s/step | tokens/s |", "|---|---:|---:|",
            *[f"| {name} | {value:.2f} | {timing['tokens_per_s'][name]:.0f} |"
              for name, value in timing["seconds_per_step"].items()],
            "", f"Speed-up of the stored top-64: {timing['speedup']:.2f}×. The one teacher pass that stores it took "
            f"{timing['teacher_pass_seconds']:.1f} s for {timing['teacher_pass_tokens']} tokens.", "",
        ]
    return "\n".join(lines)


def _removal(row: dict[str, Any]) -> str:
    """What the row's pruning removed, where it differs from the demo's (rows that prune their own way)."""
    if not row.get("pruning") or row["pruning"] == DEMO_PRUNING:
        return ""
    parts = [f"removed layers {row['removed_layers']}"] if row.get("removed_layers") else []
    parts += [row["prune_summary"]] if row.get("prune_summary") else []
    parts += [f"round {i + 1} removed {r['removed_layers']}" for i, r in enumerate(row.get("rounds", []))]
    return " " + "; ".join(parts) + "." if parts else ""


def _pct(row: dict[str, Any], metric: str) -> str:
    if metric not in row:
        return ""
    return f"{100 * row[metric]:.2f} ± {100 * row[metric + '_stderr']:.2f}"


def dense_scores(args: argparse.Namespace, loaded, scorer: Scorer) -> dict[str, Any]:
    cached = args.work_dir / f"dense-{digest(scoring(args))[:16]}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    say("scoring the dense model ...")
    scores = scorer.score(loaded.model)
    atomic_write_json(cached, scores)
    return scores


def step_timing(args: argparse.Namespace, loaded, pruned: torch.nn.Module) -> dict[str, Any]:
    """Seconds per healing step with the teacher run on every batch and with its stored top-64, the two alternating
    step by step on the same batches (each mode's first step is a warm-up and not counted)."""
    import statistics

    from slimllm.recovery.teacher_targets import compute_teacher_targets
    from slimllm.recovery.training import Optimization, batch_schedule, train

    steps = args.step_timing + 1
    teacher = frozen_teacher(loaded.model)
    text = training_text(args.calib, loaded.tokenizer, steps * args.batch_size * 512, 512, args.batch_size, 0, None,
                         holdout=DEV_FRACTION)
    stored = compute_teacher_targets(teacher, text.blocks, 64, args.batch_size)
    schedule = batch_schedule(text.blocks.shape[0], args.batch_size, steps, 0)
    modes = {"teacher every batch": teacher, "stored top-64": stored}
    models = {name: copy.deepcopy(pruned).requires_grad_(True) for name in modes}
    optimizations = {name: Optimization(m, [torch.optim.AdamW(m.parameters(), lr=1e-4)], None, "--lr")
                     for name, m in models.items()}
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    for step in range(steps):
        for name, mode in modes.items():
            seconds[name].append(train(models[name], text.blocks, schedule, range(step, step + 1),
                                       optimizations[name], "timing", mode, 1.0))
    per_step = {name: statistics.median(values[1:]) for name, values in seconds.items()}
    tokens = args.batch_size * 512
    say("s/step: " + ", ".join(f"{name} {value:.2f}" for name, value in per_step.items()))
    return {"steps": args.step_timing, "tokens_per_step": tokens, "teacher_pass_seconds": stored.seconds,
            "teacher_pass_tokens": int(text.blocks.numel()),
            "seconds_per_step": per_step, "all_seconds": seconds,
            "tokens_per_s": {name: tokens / value for name, value in per_step.items()},
            "speedup": per_step["teacher every batch"] / per_step["stored top-64"]}


def cached_step_timing(args: argparse.Namespace, loaded, demo: Pruned) -> dict[str, Any]:
    """`step_timing`, kept under --work-dir keyed by what it measures, so that a rerun that adds rows reports the
    timing measured alone instead of measuring it again beside other work."""
    key = digest({"model": args.model, "removed": demo.removed, "batch_size": args.batch_size,
                  "steps": args.step_timing, "device": str(next(loaded.model.parameters()).device)})
    cached = args.work_dir / f"step-timing-{key[:16]}.json"
    if cached.is_file():
        say("step timing: cached")
        return json.loads(cached.read_text())
    timing = step_timing(args, loaded, demo.model)
    atomic_write_json(cached, timing)
    return timing


def main() -> None:
    args = arguments()
    torch.manual_seed(0)
    loaded = load_model(args.model, device=args.device, for_training=True)
    scorer = Scorer(args, loaded)
    dense = dense_scores(args, loaded, scorer)
    demo = prune(args, loaded, Row("the demo's pruning"))
    rows = run_rows(args, loaded, scorer, demo)
    timing = cached_step_timing(args, loaded, demo) if args.step_timing else None
    payload = {
        "command": "python bench/healing.py " + shlex.join(sys.argv[1:]),
        "machine": machine_info(), "versions": library_versions(),
        "settings": vars(args) | {"work_dir": str(args.work_dir), "results_dir": str(args.results_dir),
                                  "prune": plain(dataclasses.asdict(demo.settings)), "dev_fraction": DEV_FRACTION,
                                  "removed_layers": demo.removed},
        "device": str(scorer.device), "dense": dense, "rows": rows, "ties": tie_note(rows),
        "step_timing": timing,
    }
    model = Path(args.model).stem.replace(".", "-") if args.model.endswith(".gguf") else args.model
    stem = f"healing-{model}" + (f"-{args.tag}" if args.tag else "")
    atomic_write_json(args.results_dir / f"{stem}.json", payload)
    atomic_write_text(args.results_dir / f"{stem}.md", markdown(payload))
    print(f"wrote {args.results_dir / stem}.json and .md")


if __name__ == "__main__":
    main()
