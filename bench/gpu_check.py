"""`make gpu-check`: the CUDA paths on a machine with one NVIDIA GPU, in one run, ending with one summary table.

    python bench/gpu_check.py [--out runs/gpu-check]

Steps (each timed; a failed step is reported and the others still run):
1. the GPU-marked tests (`pytest -m gpu`);
2. a short bf16 TRSP on SmolLM2-135M: fp32 master weights under bf16 autocast, the loss falling and weights changing;
3. ONNX export of the pruned model validated on the CUDA execution provider (TF32 bound for fp32);
4. the `cuda` latency profile, dense against pruned.
Exit code 1 if any step failed. A step whose packages the machine lacks (onnxruntime's CUDA EP, optimum) is reported
as skipped with what it needs, so the check also runs where only torch has CUDA (bench/gpu_machine.sh). Written for
the 8-minute budget: 2 rounds of 4 steps, 16 stage-2 steps.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from slimllm.core.data import shared_data_dir  # noqa: E402
from slimllm.core.errors import first_line  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = shared_data_dir()


def _pytest_gpu() -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True,
    )
    last = completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else completed.stderr[-200:]
    if completed.returncode != 0 or "skipped" in last and "passed" not in last:
        raise RuntimeError(last)
    return last


def _missing(step: str) -> str | None:
    """What the machine lacks for a step, or None."""
    import importlib.util

    needs = {"onnx": ["optimum", "onnx"], "profile": ["onnx"]}.get(step, [])
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if step in ("onnx", "profile"):
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            missing.append("onnxruntime-gpu (the CUDA execution provider)")
    return ", ".join(missing) or None


def _trsp(out: Path, model_spec: str) -> str:
    import torch

    from slimllm.core.data import load_calibration
    from slimllm.models.checkpoints import save_pruned_checkpoint
    from slimllm.models.loading import load_model
    from slimllm.pruning.methods.trsp import TrspSettings, run_trsp
    from slimllm.pruning.surgery import remove_layers

    loaded = load_model(model_spec, device="cuda", for_training=True)
    model = loaded.model
    assert loaded.dtype in (torch.bfloat16, torch.float16) and next(model.parameters()).dtype == torch.float32
    calib = load_calibration(str(DATA / "wiki.valid.tokens"), model, loaded.tokenizer, 16, 512, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    settings = TrspSettings(steps_per_round=4, stage2_steps=16, distill=0.0)
    order, info = run_trsp(model, calib.blocks, 2, range(29), settings, batch_size=4)
    changed = sum(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    losses = info.stage2_losses
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    if not (last < first and changed):
        raise RuntimeError(f"stage-2 loss {first:.3f} -> {last:.3f}, {changed} tensors changed")
    pruned, _ = remove_layers(model, order, inplace=True)
    save_pruned_checkpoint(pruned, loaded.tokenizer, out / "pruned", {"method": "trsp", "gpu_check": True}, force=True)
    return f"removed {sorted(order)}; stage-2 loss {first:.3f} -> {last:.3f}; {changed} fp32 tensors changed"


def _onnx_cuda(out: Path) -> str:
    from slimllm.exporters.onnx import OnnxExportSettings, export_onnx

    settings = OnnxExportSettings(provider="cuda", eval_data=str(DATA / "wiki.test.raw"), eval_windows=2)
    result = export_onnx(out / "pruned", out / "onnx", settings, force=True)
    worst = max((c for c in result.validation["checks"] if c.get("value") is not None), key=lambda c: c["value"])
    return f"{result.provider}: passed; worst {worst['name']} {worst['value']:.3g} (bound {worst['bound']})"


def _profile(out: Path, model_spec: str) -> str:
    from slimllm.latency.profiler import ModelArtifacts, run_profile
    from slimllm.latency.profiles import load_profile
    from slimllm.models.loading import checkpoint_directory

    profile = load_profile("cuda")
    profile.repeats, profile.warmup = 2, 1
    result = run_profile(
        ModelArtifacts(checkpoint_directory(model_spec)),
        ModelArtifacts(out / "pruned", onnx={}),
        profile,
        out / "latency",
        eval_data=str(DATA / "wiki.test.raw"),
        force=True,
    )
    return "; ".join(
        f"{label} decode x{entry['speedups'][f'tg{profile.generate_tokens}']['measured']:.2f}"
        for label, entry in result.summary.items()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-check")
    parser.add_argument("--model", default="smollm2-135m", help="The model, or its .gguf file.")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU; none is visible (install with `make install-gpu` on a GPU machine)")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, str, Callable[[], str]]] = [
        ("GPU-marked tests", "tests", _pytest_gpu),
        ("bf16 TRSP on SmolLM2-135M", "trsp", lambda: _trsp(args.out, args.model)),
        ("ONNX parity on the CUDA EP", "onnx", lambda: _onnx_cuda(args.out)),
        ("cuda latency profile", "profile", lambda: _profile(args.out, args.model)),
    ]
    rows, failed = [], False
    for name, kind, step in steps:
        started = time.perf_counter()
        if (missing := _missing(kind)) is not None:
            rows.append((name, "skipped", "0", f"needs {missing}, which this machine lacks"))
            continue
        try:
            outcome, detail = "passed", step()
        except Exception as exc:  # noqa: BLE001 - every failure is reported in the table
            outcome, detail, failed = "FAILED", f"{type(exc).__name__}: {first_line(exc)}"[:200], True
        rows.append((name, outcome, f"{time.perf_counter() - started:.0f}", detail))
    print(f"\ngpu-check on {torch.cuda.get_device_name(0)}\n")
    print("| step | outcome | s | detail |\n|---|---|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
