"""HellaSwag on the whole validation split: the dense model in PyTorch and its F16 GGUF in llama.cpp, with the
wall time of 1,000 tasks and of the full run.

    python bench/hellaswag.py                        # dense SmolLM2-135M: PyTorch and GGUF F16
    python bench/hellaswag.py --checkpoint trsp=runs/demo/pruned --skip-gguf

Targets: 1,000 tasks in at most 3 minutes on 2 cores in PyTorch; the GGUF F16 acc_norm within 0.3 points of
PyTorch's. Results: bench/results/hellaswag-<name>.json and .md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speed_common import HELLASWAG_FILE, RESULTS_DIR, WORK_DIR, exported_gguf  # noqa: E402

from slimllm.core.artifacts import atomic_write_json, atomic_write_text, library_versions, machine_info  # noqa: E402
from slimllm.evaluation.accuracy import AccuracyResult, evaluate_tasks  # noqa: E402
from slimllm.evaluation.tasks import read_task  # noqa: E402
from slimllm.exporters.scorers import open_backend  # noqa: E402

TIMING_TASKS = 1000
TIMING_TARGET_SECONDS = 180.0
GGUF_POINTS = 0.3


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task-file", type=Path, default=HELLASWAG_FILE)
    parser.add_argument("--limit", type=int, default=None, help="Score only the first N tasks (default: all).")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="Another checkpoint to score in PyTorch on the same tasks (repeatable).")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="The dense model's F16 GGUF (default: exported by slimllm into the work directory).")
    parser.add_argument("--skip-gguf", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR / "hellaswag")
    parser.add_argument("--name", default="hellaswag-smollm2-135m")
    return parser.parse_args()


def dense_gguf(args, dense: Path) -> Path:
    if args.gguf is not None:
        return args.gguf
    return exported_gguf(dense, args.work_dir / "gguf-dense", ["f16"])["F16"]


def score(spec: str, backend: str, tasks, limit: int | None) -> tuple[AccuracyResult, str]:
    with open_backend(spec, backend, device="cpu", dtype="fp32", context=1024) as scorer:
        print(f"[hellaswag] {spec} on {scorer.backend} ...", file=sys.stderr, flush=True)
        return evaluate_tasks(scorer.sequence_log_probs, scorer.tokenizer, tasks, limit=limit), scorer.backend


def row(result: AccuracyResult, backend: str) -> dict:
    payload = result.to_dict()
    payload.pop("correct")
    return payload | {"backend": backend}


def write_markdown(path: Path, payload: dict) -> None:
    timing = payload["timing_1000"]
    lines = [
        f"# HellaSwag validation, {payload['tasks']} tasks",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"First {TIMING_TASKS} tasks, dense model in PyTorch: {timing['seconds']:.0f} s "
        f"({timing['tokens_per_second']:.0f} tokens/s; target ≤ {TIMING_TARGET_SECONDS:.0f} s).",
        "",
        "| model | backend | acc_norm | acc | per-token (llama.cpp's rule) | wall time |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, entry in payload["rows"].items():
        lines.append(
            f"| {label} | {entry['backend']} | {100 * entry['acc_norm']:.2f} ± {100 * entry['acc_norm_stderr']:.2f} "
            f"| {100 * entry['acc']:.2f} ± {100 * entry['acc_stderr']:.2f} | {100 * entry['acc_per_token']:.2f} | "
            f"{entry['seconds']:.0f} s |"
        )
    if "gguf_minus_torch_points" in payload:
        lines += ["", f"GGUF F16 minus PyTorch, acc_norm: {payload['gguf_minus_torch_points']:+.2f} points "
                      f"(target: within {GGUF_POINTS})."]
    machine = payload["machine"]
    lines += [
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_count']} cores). Versions: "
        + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()) + ".",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def main() -> int:
    from slimllm.models.loading import checkpoint_directory

    args = arguments()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    tasks = read_task("hellaswag", args.task_file)
    dense = checkpoint_directory(args.model)
    timing, backend = score(str(dense), "torch", tasks, TIMING_TASKS)
    rows = {}
    result = timing if args.limit == TIMING_TASKS else score(str(dense), "torch", tasks, args.limit)[0]
    rows["dense"] = row(result, backend)
    if not args.skip_gguf:
        result, backend = score(str(dense_gguf(args, dense)), "llama.cpp", tasks, args.limit)
        rows["dense GGUF F16"] = row(result, backend)
    for spec in args.checkpoint:
        name, _, path = spec.partition("=")
        result, backend = score(path, "torch", tasks, args.limit)
        rows[name] = row(result, backend)
    payload = {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "task_file": str(args.task_file),
        "tasks": rows["dense"]["tasks"],
        "timing_1000": {"seconds": timing.seconds, "tokens_per_second": timing.tokens_per_second,
                        "within_target": timing.seconds <= TIMING_TARGET_SECONDS},
        "rows": rows,
        "machine": machine_info(),
        "versions": library_versions(),
    }
    if "dense GGUF F16" in rows:
        payload["gguf_minus_torch_points"] = 100 * (rows["dense GGUF F16"]["acc_norm"] - rows["dense"]["acc_norm"])
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS_DIR / f"{args.name}.json", payload)
    write_markdown(RESULTS_DIR / f"{args.name}.md", payload)
    print((RESULTS_DIR / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"[hellaswag] {time.perf_counter() - started:.0f} s", file=sys.stderr)
    raise SystemExit(code)
