"""Real model sizes on this machine: random-weight models built from published configurations, compiled end to end,
with the wall time and peak memory of every stage beside `slimllm plan`'s estimate.

    python bench/scale.py                       # Llama-3.2-1B-shaped: compile --target all, plus an fp32 ONNX export
    python bench/scale.py --models qwen2.5-3b --steps onnx-fp32

Why random weights: no hub access here, and memory, file formats, external data and parity do not depend on what the
weights learned. The tokenizer is SmolLM2's (the embedded model's), its 49,152 ids inside the published vocabulary;
the embedding keeps the published number of rows, so parameter counts and file sizes are the real ones.

Steps (each a separate `slimllm` process; peaks are RSS of the process and its children, sampled every 50 ms):
- `compile`: `slimllm compile MODEL --method shortgpt --remove K --target all --onnx-quant int4` (ONNX fp32 export
  quantized to int4, GGUF F16 + Q8_0 + Q4_K_M), no healing (LoRA or FSDP territory at this size), no latency profile
  and no multiple-choice task (hours on 2 cores); per stage from the run's manifest;
- `onnx-fp32`: `slimllm export <pruned> --target onnx` (fp32, validated), on the pruned checkpoint of `compile`, or
  on the dense model when `compile` is not among the steps.

Writes bench/results/scale-<models>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimllm.artifacts import (  # noqa: E402
    atomic_write_json,
    atomic_write_text,
    library_versions,
    machine_info,
)
from slimllm.memory import PeakMemory  # noqa: E402
from slimllm.models import checkpoint_directory  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared" / "data"
GIB = 2**30

MODELS = {
    # Published configurations (Llama-3.2-1B; Qwen2.5-3B), vocabulary sizes included.
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "qwen2.5-3b": dict(
        model_type="qwen2", hidden_size=2048, num_hidden_layers=36, intermediate_size=11008, num_attention_heads=16,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        max_position_embeddings=32768, rms_norm_eps=1e-6, use_sliding_window=False,
    ),
}
REMOVE = {"llama-3.2-1b": 4, "qwen2.5-3b": 9}


def build_model(name: str, out: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of the published shape, with SmolLM2's tokenizer files; reused when present."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors.index.json").is_file() or (out / "model.safetensors").is_file():
        return out
    values = dict(MODELS[name])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    tokenizer_dir = checkpoint_directory("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    del model
    os.replace(tmp, out)
    return out


def _run(command: list[str], log: Path, remeasure: bool) -> tuple[int, float, int]:
    """Run a slimllm command; returns (exit code, seconds, peak RSS of its process tree).

    The figures are kept beside the log; an unchanged command is not run again unless `remeasure`.
    """
    record = log.with_suffix(".measured.json")
    if record.is_file() and not remeasure:
        kept = json.loads(record.read_text())
        if kept["command"] == command:
            return kept["code"], kept["seconds"], kept["peak"]
    started = time.perf_counter()
    with open(log, "w") as handle, PeakMemory(interval=0.1) as peak:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    seconds = time.perf_counter() - started
    atomic_write_json(record, {"command": command, "code": code, "seconds": seconds, "peak": peak.host_bytes})
    return code, seconds, peak.host_bytes


def _plan(model_dir: Path, flags: list[str]) -> dict[str, dict]:
    """`slimllm plan` for the same model and flags: its estimate per stage."""
    command = [sys.executable, "-m", "slimllm", "plan", str(model_dir), *flags, "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode not in (0, 2):
        raise RuntimeError(f"slimllm plan failed: {completed.stderr.strip()[-500:]}")
    payload = json.loads(completed.stdout[completed.stdout.index("{"):])
    return {stage["stage"]: stage for stage in payload["stages"]}


def compile_rows(name: str, model_dir: Path, run_dir: Path, work: Path, remeasure: bool) -> tuple[list[dict], dict]:
    recipe = work / f"{name}-recipe.toml"
    recipe.write_text(
        "[prune]\n"
        f'calib = "{SHARED / "wikitext2" / "wiki.valid.tokens"}"\n'
        "calib_blocks = 8\nblock_len = 512\nbatch_size = 1\n"
        "[gguf]\nouttypes = [\"f16\", \"q8_0\", \"q4_k_m\"]\n"
    )
    flags = [
        "--recipe", str(recipe), "--method", "shortgpt", "--remove", str(REMOVE[name]), "--target", "all",
        "--onnx-quant", "int4", "--no-heal", "--profile", "none", "--eval-task", "none", "--eval-windows", "4",
        "--eval-data", str(SHARED / "wikitext2" / "wiki.test.raw"),
    ]
    command = [sys.executable, "-m", "slimllm", "compile", str(model_dir), "--out", str(run_dir), *flags, "--json"]
    code, seconds, peak = _run(command, work / f"{name}-compile.log", remeasure)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    plans = _plan(model_dir, flags)
    rows = []
    for stage, entry in manifest["stages"].items():
        rows.append(_row(name, f"compile: {stage}", entry.get("status") == "done", entry.get("seconds"),
                         entry.get("peak_host_bytes"), plans.get(stage)))
    rows.append(_row(name, "compile (whole process)", code == 0, seconds, peak, None))
    return rows, manifest


def _row(model: str, step: str, passed: bool, seconds, peak, plan: dict | None) -> dict:
    row = {"model": model, "step": step, "passed": passed, "seconds": seconds, "peak_host_bytes": peak}
    if plan is not None:
        row["plan_host_bytes"] = plan["host_bytes"]
        row["plan_time_class"] = plan["time_class"]
        row["plan_ratio"] = (plan["host_bytes"] / peak) if peak else None
    return row


def onnx_fp32_row(name: str, checkpoint: Path, out: Path, work: Path, remeasure: bool) -> dict:
    flags = ["--eval-data", str(SHARED / "wikitext2" / "wiki.test.raw")]
    command = [sys.executable, "-m", "slimllm", "export", str(checkpoint), "--target", "onnx", "--out", str(out),
               "--force", *flags, "--json"]
    code, seconds, peak = _run(command, work / f"{name}-onnx-fp32.log", remeasure)
    plan = _plan(checkpoint, ["--method", "none", "--target", "onnx", "--profile", "none", "--eval-task", "none"])
    row = _row(name, "export onnx fp32", code == 0, seconds, peak, plan["export_onnx"])
    files = json.loads((out / "slimllm_export.json").read_text())["files"] if code == 0 else {}
    row["files"] = files
    row["external_data"] = "model.onnx_data" in files
    return row


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def render(result: dict) -> str:
    lines = [
        f"# Scale: {', '.join(result['models'])}",
        "",
        f"Machine: {result['machine'].get('cpu', '')}, {result['machine'].get('cores', '')} cores, "
        f"{result['machine'].get('memory_gib', '')} GiB. Command: `{result['command']}`.",
        "Peaks are RSS of the process and its children (file pages mapped by safetensors and llama.cpp included). "
        "`plan` is `slimllm plan`'s estimate for the same settings; ratio = estimate / measured.",
        "",
        "| model | step | passed | seconds | peak RSS GiB | × fp32 weights | plan GiB | plan / measured |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        weights = result["weights_bytes"][row["model"]]
        peak = row.get("peak_host_bytes")
        plan = row.get("plan_host_bytes")
        lines.append(
            f"| {row['model']} | {row['step']} | {'yes' if row['passed'] else 'NO'} | "
            f"{row['seconds'] or 0:.0f} | {peak / GIB if peak else 0:.2f} | {peak / weights if peak else 0:.2f} | "
            f"{plan / GIB if plan else 0:.2f} | {row.get('plan_ratio') or 0:.2f} |"
        )
    lines += ["", "fp32 weight sizes: " + ", ".join(
        f"{m} {b / GIB:.2f} GiB" for m, b in result["weights_bytes"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama-3.2-1b", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--steps", default="compile,onnx-fp32", help="compile, onnx-fp32")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--remeasure", action="store_true", help="run steps whose figures are already kept")
    args = parser.parse_args()
    models = args.models.split(",")
    steps = args.steps.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    sizes: dict[str, int] = {}
    for name in models:
        model_dir = build_model(name, args.work / f"{name}-random")
        sizes[name] = weights_bytes(model_dir)
        onnx_source = model_dir
        if "compile" in steps:
            run_dir = args.work / f"{name}-compile"
            compile_result, manifest = compile_rows(name, model_dir, run_dir, args.work, args.remeasure)
            rows += compile_result
            onnx_source = Path(manifest["stages"]["prune"]["outputs"]["path"])
        if "onnx-fp32" in steps:
            rows.append(onnx_fp32_row(name, onnx_source, args.work / f"{name}-onnx-fp32", args.work, args.remeasure))
    result = {
        "models": models,
        "command": "python bench/scale.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "versions": library_versions(),
        "weights_bytes": sizes,
        "rows": rows,
    }
    tag = args.tag or "-".join(models)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS_DIR / f"scale-{tag}.json", result)
    atomic_write_text(RESULTS_DIR / f"scale-{tag}.md", render(result))
    print(render(result))


if __name__ == "__main__":
    main()
