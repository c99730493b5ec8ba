"""Real model sizes on this machine: random-weight models built from published configurations, compiled end to end,
with the wall time and peak memory of every stage beside `slimllm plan`'s estimate.

    python bench/scale.py                       # Llama-3.2-1B-shaped: compile --target all, plus an fp32 ONNX export
    python bench/scale.py --models qwen2.5-3b --steps onnx-fp32

Why random weights: no hub access here, and memory, file formats, external data and parity do not depend on what the
weights learned. The tokenizer is SmolLM2's (the embedded model's), its 49,152 ids inside the published vocabulary;
the embedding keeps the published number of rows, so parameter counts and file sizes are the real ones.

Steps (each a separate `slimllm` process; peaks are RSS of that process and its children,
sampled every 0.1 s beside the process's own high-water mark; the benchmark's process is not counted):
- `compile`: `slimllm compile MODEL --method shortgpt --remove K --target all --onnx-quant int4` (ONNX fp32 export
  quantized to int4, GGUF F16 + Q8_0 + Q4_K_M), no healing (LoRA or FSDP territory at this size), no latency profile
  and no multiple-choice task (hours on 2 cores); per stage from the run's manifest;
- `prune`: `slimllm prune MODEL --method shortgpt --remove K` alone (same calibration), for models whose whole
  compile would take hours here; its checkpoint feeds `onnx-fp32`;
- `prune-offload`: the same prune with the model spread by `--device-map auto --max-memory cpu=2GiB`: the layers
  beyond 2 GiB stay on disk and are read as they run (the path of a model larger than its GPUs);
- `onnx-fp32`: `slimllm export <pruned> --target onnx` (fp32, validated), on the pruned checkpoint of `compile` or
  `prune`, or on the dense model when neither is among the steps.

Two peaks per step: resident (RSS) and private (RSS less the pages of files the processes map: the checkpoints
transformers reads in place). `plan` estimates both; its fit check holds the private figure against the machine.
Models given the plan alone are described as published, in bf16 (their loading converts them, so nothing is mapped).

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

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speed_common import REPO_ROOT as ROOT  # noqa: E402
from speed_common import RESULTS_DIR  # noqa: E402

from slimllm.core.artifacts import (  # noqa: E402
    atomic_write_json,
    atomic_write_text,
    library_versions,
    machine_info,
)
from slimllm.core.data import shared_data_dir  # noqa: E402
from slimllm.core.memory import peak_rss, process_tree_memory  # noqa: E402
from slimllm.models.loading import checkpoint_directory  # noqa: E402

SHARED = shared_data_dir().parent
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
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
    ),
    "llama-3.1-70b": dict(
        model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
        max_position_embeddings=131072, rms_norm_eps=1e-5,
    ),
}
EMBEDDED = ("smollm2-135m",)
"""Real models run as they are (the plan's check at the small end)."""
REMOVE = {"smollm2-135m": 8, "llama-3.2-1b": 4, "qwen2.5-3b": 9, "llama-3.1-8b": 8, "llama-3.1-70b": 20}
"""A quarter of the layers."""


def _config(name: str):
    from transformers import AutoConfig

    if name in EMBEDDED:
        return AutoConfig.from_pretrained(str(checkpoint_directory(name)))
    values = dict(MODELS[name])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def config_only(name: str, out: Path) -> Path:
    """A directory with the published configuration alone (bf16, as published): all `slimllm plan` reads."""
    out.mkdir(parents=True, exist_ok=True)
    config = _config(name)
    config.dtype = "bfloat16"
    config.save_pretrained(str(out))
    return out


def build_model(name: str, out: Path, seed: int = 0) -> Path:
    """A random-weight checkpoint of the published shape, with SmolLM2's tokenizer files; reused when present."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "model.safetensors.index.json").is_file() or (out / "model.safetensors").is_file():
        return out
    config = _config(name)
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


def _sample_peaks(child: subprocess.Popen, interval: float = 0.1) -> dict:
    """Peaks of the child's process tree until it ends: resident (sampled, and the child's own high-water mark) and
    private. This benchmark's own process is left out: it built the model and keeps its heap."""
    process = psutil.Process(child.pid)
    resident = private = 0
    while child.poll() is None:
        try:
            now_resident, now_private = process_tree_memory(process)
        except psutil.NoSuchProcess:
            break
        resident = max(resident, now_resident, peak_rss(child.pid) or 0)
        private = max(private, now_private)
        time.sleep(interval)
    child.wait()
    return {"peak_host_bytes": resident, "peak_host_private_bytes": private}


def _run(command: list[str], log: Path, remeasure: bool) -> tuple[int, float, dict]:
    """Run a slimllm command; returns (exit code, seconds, peaks of its process tree: resident and private).

    The figures are kept beside the log; an unchanged command is not run again unless `remeasure`.
    """
    record = log.with_suffix(".measured.json")
    if record.is_file() and not remeasure:
        kept = json.loads(record.read_text())
        if kept["command"] == command:
            peaks = kept["peak"] if isinstance(kept["peak"], dict) else {"peak_host_bytes": kept["peak"]}
            return kept["code"], kept["seconds"], peaks
    started = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
        peaks = _sample_peaks(child)
    seconds = time.perf_counter() - started
    code = child.returncode
    atomic_write_json(record, {"command": command, "code": code, "seconds": seconds, "peak": peaks})
    return code, seconds, peaks


def _plan(model_dir: Path, flags: list[str]) -> dict[str, dict]:
    """`slimllm plan` for the same model and flags: its estimate per stage."""
    command = [sys.executable, "-m", "slimllm", "plan", str(model_dir), *flags, "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode not in (0, 2):
        raise RuntimeError(f"slimllm plan failed: {completed.stderr.strip()[-500:]}")
    payload = json.loads(completed.stdout[completed.stdout.index("{"):])
    return {stage["stage"]: stage for stage in payload["stages"]}


def compile_flags(name: str, work: Path) -> list[str]:
    """The compile settings measured here: ShortGPT removing a quarter of the layers, no healing, no latency stage,
    no multiple-choice task, four 512-token evaluation windows, 8 x 512 calibration tokens."""
    recipe = work / f"{name}-recipe.toml"
    recipe.write_text(
        "[prune]\n"
        f'calib = "{SHARED / "wikitext2" / "wiki.valid.tokens"}"\n'
        "calib_blocks = 8\nblock_len = 512\nbatch_size = 1\n"
        "[gguf]\nouttypes = [\"f16\", \"q8_0\", \"q4_k_m\"]\n"
    )
    return [
        "--recipe", str(recipe), "--method", "shortgpt", "--remove", str(REMOVE[name]), "--target", "all",
        "--onnx-quant", "int4", "--no-heal", "--profile", "none", "--eval-task", "none", "--eval-windows", "4",
        "--eval-data", str(SHARED / "wikitext2" / "wiki.test.raw"),
    ]


def compile_rows(name: str, model_dir: Path, run_dir: Path, work: Path, remeasure: bool) -> tuple[list[dict], dict]:
    flags = compile_flags(name, work)
    command = [sys.executable, "-m", "slimllm", "compile", str(model_dir), "--out", str(run_dir), *flags, "--json"]
    code, seconds, peak = _run(command, work / f"{name}-compile.log", remeasure)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    plans = _plan(model_dir, flags)
    rows = []
    for stage, entry in manifest["stages"].items():
        rows.append(_row(name, f"compile: {stage}", entry.get("status") == "done", entry.get("seconds"),
                         entry, plans.get(stage)))
    rows.append(_row(name, "compile (whole process)", code == 0, seconds, peak, None))
    return rows, manifest


def prune_row(name: str, model_dir: Path, out: Path, work: Path, remeasure: bool) -> dict:
    """`slimllm prune` with the compile's pruning settings; the estimate is the compile plan's prune stage."""
    flags = compile_flags(name, work)
    prune_flags = ["--recipe", flags[1], "--method", "shortgpt", "--remove", str(REMOVE[name])]
    command = [sys.executable, "-m", "slimllm", "prune", str(model_dir), "--out", str(out), "--force",
               *prune_flags, "--json"]
    code, seconds, peak = _run(command, work / f"{name}-prune.log", remeasure)
    return _row(name, "prune", code == 0, seconds, peak, _plan(model_dir, flags)["prune"])


OFFLOAD_HOST = "2GiB"
"""The host memory `prune-offload` gives accelerate; the layers beyond it are read from the checkpoint as they run."""


def prune_offload_row(name: str, model_dir: Path, out: Path, work: Path, remeasure: bool) -> dict:
    """`slimllm prune` as `prune_row`, with the model spread by `--device-map auto` over `OFFLOAD_HOST` of host
    memory and disk (the least-squares repair edits weights, so `--repair none`); the estimate is the plan's prune
    stage under the same placement."""
    flags = compile_flags(name, work)
    spread = ["--repair", "none", "--device-map", "auto", "--max-memory", f"cpu={OFFLOAD_HOST}"]
    prune_flags = ["--recipe", flags[1], "--method", "shortgpt", "--remove", str(REMOVE[name]), *spread,
                   "--offload-folder", str(work)]
    command = [sys.executable, "-m", "slimllm", "prune", str(model_dir), "--out", str(out), "--force",
               *prune_flags, "--json"]
    code, seconds, peak = _run(command, work / f"{name}-prune-offload.log", remeasure)
    return _row(name, f"prune, offloaded (--device-map auto --max-memory cpu={OFFLOAD_HOST})", code == 0, seconds,
                peak, _plan(model_dir, [*flags, *spread])["prune"])


def _row(model: str, step: str, passed: bool, seconds, peaks: dict, plan: dict | None) -> dict:
    row = {"model": model, "step": step, "passed": passed, "seconds": seconds,
           "peak_host_bytes": peaks.get("peak_host_bytes"),
           "peak_host_private_bytes": peaks.get("peak_host_private_bytes")}
    if plan is not None:
        row["plan_host_bytes"] = plan["host_bytes"]
        row["plan_private_bytes"] = plan["private_bytes"]
        row["plan_time_class"] = plan["time_class"]
        row["plan_ratio"] = _ratio(plan["host_bytes"], row["peak_host_bytes"])
        row["plan_private_ratio"] = _ratio(plan["private_bytes"], row["peak_host_private_bytes"])
    return row


def _ratio(estimate: int | None, measured: int | None) -> float | None:
    return estimate / measured if estimate and measured else None


def onnx_fp32_row(name: str, checkpoint: Path, out: Path, work: Path, remeasure: bool) -> dict:
    flags = ["--eval-data", str(SHARED / "wikitext2" / "wiki.test.raw")]
    command = [sys.executable, "-m", "slimllm", "export", str(checkpoint), "--target", "onnx", "--out", str(out),
               "--force", *flags, "--json"]
    code, seconds, peak = _run(command, work / f"{name}-onnx-fp32.log", remeasure)
    plan = _plan(checkpoint, ["--method", "none", "--no-heal", "--target", "onnx", "--profile", "none",
                              "--eval-task", "none"])
    row = _row(name, "export onnx fp32", code == 0, seconds, peak, plan["export_onnx"])
    files = json.loads((out / "slimllm_export.json").read_text())["files"] if code == 0 else {}
    row["files"] = files
    row["external_data"] = "model.onnx_data" in files
    return row


def plan_rows(name: str, work: Path) -> list[dict]:
    """Estimates alone (the weights are never built) for the same compile settings, on this machine and as if on
    one GPU (the device plan counts what the stages put on it)."""
    config_dir = config_only(name, work / f"{name}-config")
    rows = []
    for stage, plan in _plan(config_dir, compile_flags(name, work)).items():
        rows.append({"model": name, "step": f"plan: {stage}", "passed": None, "seconds": None,
                     "peak_host_bytes": None, "peak_host_private_bytes": None,
                     "plan_host_bytes": plan["host_bytes"], "plan_private_bytes": plan["private_bytes"],
                     "plan_time_class": plan["time_class"], "plan_ratio": None, "plan_private_ratio": None})
    return rows


def weights_bytes(name: str) -> int:
    from slimllm.pipeline.plan import ModelFootprint

    return ModelFootprint.from_config(_config(name)).fp32_bytes


def _cell(value, spec: str = ".2f") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, spec)


def render(result: dict) -> str:
    lines = [
        f"# Scale: {', '.join(result['models'])}",
        "",
        f"Machine: {result['machine'].get('cpu', '')}, {result['machine'].get('cpu_count', '')} cores, "
        f"{result['machine'].get('memory_gib', '')} GiB. Command: `{result['command']}`.",
        "Peaks are RSS of the process and its children (file pages mapped by safetensors and llama.cpp included) and "
        "its private part (RSS less mapped file pages, sampled every 0.1 s). `plan` is `slimllm plan`'s estimate for "
        "the same settings; ratio = estimate / measured.",
        "",
        "| model | step | passed | seconds | peak RSS GiB | × fp32 weights | plan GiB | plan / measured "
        "| private GiB | plan private GiB | plan / measured | plan time |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        weights = result["weights_bytes"][row["model"]]
        peak, private = row.get("peak_host_bytes"), row.get("peak_host_private_bytes")
        plan, plan_private = row.get("plan_host_bytes"), row.get("plan_private_bytes")
        lines.append(
            f"| {row['model']} | {row['step']} | {_cell(row['passed'])} | {_cell(row['seconds'], '.0f')} | "
            f"{_cell(peak and peak / GIB)} | {_cell(peak and peak / weights)} | {_cell(plan and plan / GIB)} | "
            f"{_cell(row.get('plan_ratio'))} | {_cell(private and private / GIB)} | "
            f"{_cell(plan_private and plan_private / GIB)} | {_cell(row.get('plan_private_ratio'))} | "
            f"{row.get('plan_time_class') or '–'} |"
        )
    lines += ["", "fp32 weight sizes: " + ", ".join(
        f"{m} {b / GIB:.2f} GiB" for m, b in result["weights_bytes"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama-3.2-1b",
                        help=f"comma-separated: {', '.join([*EMBEDDED, *MODELS])}")
    parser.add_argument("--steps", default="compile,onnx-fp32",
                        help="compile, prune, prune-offload, onnx-fp32, plan (estimates only)")
    parser.add_argument("--plan-models", default="", help="models given the plan alone (their weights are never built)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--remeasure", action="store_true", help="run steps whose figures are already kept")
    args = parser.parse_args()
    plan_models = [m for m in args.plan_models.split(",") if m]
    models = [*args.models.split(","), *plan_models]
    steps = args.steps.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    sizes: dict[str, int] = {}
    for name in models:
        sizes[name] = weights_bytes(name)
        if "plan" in steps or name in plan_models:
            rows += plan_rows(name, args.work)
        if name in plan_models or not {"compile", "prune", "prune-offload", "onnx-fp32"} & set(steps):
            continue
        model_dir = checkpoint_directory(name) if name in EMBEDDED else build_model(name, args.work / f"{name}-random")
        onnx_source = model_dir
        if "compile" in steps:
            run_dir = args.work / f"{name}-compile"
            compile_result, manifest = compile_rows(name, model_dir, run_dir, args.work, args.remeasure)
            rows += compile_result
            onnx_source = Path(manifest["stages"]["prune"]["outputs"]["path"])
        elif "prune" in steps:
            onnx_source = args.work / f"{name}-pruned"
            rows.append(prune_row(name, model_dir, onnx_source, args.work, args.remeasure))
        if "prune-offload" in steps:
            rows.append(prune_offload_row(name, model_dir, args.work / f"{name}-pruned-offload", args.work,
                                          args.remeasure))
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
    tag = args.tag or "-".join(args.models.split(","))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS_DIR / f"scale-{tag}.json", result)
    atomic_write_text(RESULTS_DIR / f"scale-{tag}.md", render(result))
    print(render(result))


if __name__ == "__main__":
    main()
