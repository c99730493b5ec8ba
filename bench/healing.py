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
by one under --work-dir, keyed by their settings, so an interrupted run resumes at the row it was healing. With
several --tokens, every row heals at each budget; --max-minutes skips the rows that would not finish in time (each
estimated from the tokens/s the run has measured), and says so.

Writes bench/results/healing-<model>[-<tag>].json and .md with the machine, library versions and settings.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shlex
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
from slimllm.recovery.healing import HealSettings, heal_model  # noqa: E402
from slimllm.recovery.training import frozen_teacher  # noqa: E402
from slimllm.recovery.training_text import training_text  # noqa: E402

DEV_FRACTION = 0.1
"""The development slice: the last tenth of the validation text."""

ROWS: dict[str, tuple[dict[str, Any], str]] = {
    "wikitext": ({}, "the demo's healing: WikiText-2 blocks, the teacher run on every batch, constant LR 1e-4"),
    "wikitext, stored top-64": ({"teacher_top_k": 64}, "the teacher's top-64 stored once; no teacher pass per step"),
    "teacher text": ({"teacher_text": 1.0, "teacher_prompts": "calibration"},
                     "every block written by the dense model from 16-token WikiText openings (T 0.8, top-p 0.95)"),
    "half teacher text": ({"teacher_text": 0.5, "teacher_prompts": "calibration"},
                          "half the blocks WikiText-2, half written by the dense model"),
    "cosine 3e-4": ({"lr_schedule": "cosine", "lr": 3e-4}, "peak LR 3e-4, cosine decay to a tenth"),
}
"""Row name -> (HealSettings that differ from the demo's, what the row is)."""


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


def prune(args: argparse.Namespace, loaded) -> tuple[torch.nn.Module, PruneSettings, list[int]]:
    """The demo's pruning (or --method's selection with the demo's repair), calibrated without the development
    slice."""
    settings = PruneSettings(method=args.method, remove=args.remove, calib=args.calib, calib_blocks=args.calib_blocks,
                             block_len=512, batch_size=2, repair="lsq")
    calibration = load_calibration(args.calib, loaded.model, loaded.tokenizer, settings.calib_blocks,
                                   settings.block_len, settings.seed, holdout=DEV_FRACTION)
    model, _, selection, _ = prune_in_memory(loaded, settings, calibration)
    say(f"removed layers {selection.removed_layers}")
    return model, settings, selection.removed_layers


def demo_heal_settings(args: argparse.Namespace, tokens: int, **overrides) -> HealSettings:
    return HealSettings(**({"calib": args.calib, "tokens": tokens, "scope": "full", "lr": 1e-4, "distill": 1.0,
                            "block_len": 512, "batch_size": args.batch_size} | overrides))


def heal_row(args: argparse.Namespace, loaded, pruned: torch.nn.Module, settings: HealSettings) -> dict[str, Any]:
    """Heal a copy of the pruned model as `settings` say; returns the timings and the healed model."""
    teacher = frozen_teacher(loaded.model)
    written = dataclasses.replace(settings.written_text, batch_size=args.generate_batch)
    text = training_text(settings.calib, loaded.tokenizer, settings.tokens, settings.block_len, settings.batch_size,
                         settings.seed, teacher, written, holdout=DEV_FRACTION)
    student = copy.deepcopy(pruned)
    for p in student.parameters():
        p.requires_grad_(True)
    healed, result = heal_model(student, text.blocks, settings, teacher if settings.distill > 0 else None,
                                teacher_key=f"dense {args.model}")
    return {"model": healed, "tokens": result.tokens, "heal_seconds": result.seconds,
            "tokens_per_s": result.tokens_per_second, "teacher_seconds": result.teacher_seconds,
            "first_run_tokens_per_s": result.tokens / (result.seconds + result.teacher_seconds),
            "text": text.source, "teacher_blocks": text.teacher_blocks, "final_ce": result.losses[-1],
            "final_kl": result.kl[-1] if result.kl else None, "peak_memory_gib": result.peak_memory_gib}


def run_rows(args: argparse.Namespace, loaded, pruned, scorer: Scorer) -> dict[str, dict[str, Any]]:
    """Every row at every budget, each cached as soon as it is scored; rows past --max-minutes are skipped."""
    rows: dict[str, dict[str, Any]] = {}
    started, rate, scoring_seconds = time.perf_counter(), None, 0.0
    for tokens in args.tokens:
        for name in args.rows:
            label = name if len(args.tokens) == 1 else f"{name}, {tokens:,} tokens"
            overrides, description = ROWS[name]
            settings = demo_heal_settings(args, tokens, **overrides)
            key = digest({"row": plain(settings), "model": args.model, "remove": args.remove,
                          **({"method": args.method, "calib_blocks": args.calib_blocks}
                             if (args.method, args.calib_blocks) != ("shortgpt", 32) else {}),
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
                                   "description": description}
                    continue
            say(f"{label}: healing {settings.tokens} tokens ...")
            row = heal_row(args, loaded, pruned, settings)
            model, rate = row.pop("model"), row["tokens_per_s"]
            scored = time.perf_counter()
            row |= {"description": description, "settings": plain(settings)} | scorer.score(model)
            scoring_seconds = time.perf_counter() - scored
            atomic_write_json(cached, row)
            rows[label] = row
            say(f"{label}: PPL {row['ppl']:.3f}, KLD {row['kld']:.4f}, {row['tokens_per_s']:.0f} tok/s")
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
    lines += ["", "Rows:", ""] + [f"- **{name}**: {row['description']}." for name, row in rows.items()]
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


def main() -> None:
    args = arguments()
    torch.manual_seed(0)
    loaded = load_model(args.model, device=args.device, for_training=True)
    scorer = Scorer(args, loaded)
    dense = dense_scores(args, loaded, scorer)
    pruned, prune_settings, removed = prune(args, loaded)
    rows = run_rows(args, loaded, pruned, scorer)
    timing = step_timing(args, loaded, pruned) if args.step_timing else None
    payload = {
        "command": "python bench/healing.py " + shlex.join(sys.argv[1:]),
        "machine": machine_info(), "versions": library_versions(),
        "settings": vars(args) | {"work_dir": str(args.work_dir), "results_dir": str(args.results_dir),
                                  "prune": plain(dataclasses.asdict(prune_settings)), "dev_fraction": DEV_FRACTION,
                                  "removed_layers": removed},
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
