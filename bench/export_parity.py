"""Export parity of SmolLM2-135M, dense and with 8 of 30 layers removed: every ONNX variant and GGUF type against
PyTorch, with the figure each check measured and its bound, and where the fp32 reference's own rounding error is
largest (which prompt, which position, how large the hidden states are there).

    python bench/export_parity.py            # about 15 minutes on 2 cores; make bench-export-parity

The pruned model is `slimllm prune --method shortgpt --remove 8` with its default least-squares repair, calibrated
on WikiText-2 validation; every export is validated on WikiText-2 test. Writes
bench/results/export-parity-smollm2-135m.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speed_common import REPO_ROOT as ROOT  # noqa: E402
from speed_common import RESULTS_DIR  # noqa: E402

from slimllm.core.artifacts import atomic_write_json, atomic_write_text, library_versions, machine_info  # noqa: E402
from slimllm.core.data import shared_data_dir  # noqa: E402
from slimllm.core.errors import (
    ValidationError,  # noqa: E402
    first_line,  # noqa: E402
)
from slimllm.models.loading import checkpoint_directory  # noqa: E402

DATA_DIR = shared_data_dir()
ONNX_VARIANTS = {
    # label: (which model, engine, quant)
    "dense, optimum fp32": ("dense", "optimum", "none"),
    "pruned, optimum fp32": ("pruned", "optimum", "none"),
    "pruned, genai fp32": ("pruned", "genai", "none"),
    "pruned, optimum int8": ("pruned", "optimum", "int8"),
    "pruned, optimum int4": ("pruned", "optimum", "int4"),
    "pruned, genai int4": ("pruned", "genai", "int4"),
    "pruned, optimum int8-dynamic": ("pruned", "optimum", "int8-dynamic"),
}
GGUF_TYPES = ["f32", "f16", "q8_0", "q4_k_m", "q4_0"]


def pruned_checkpoint(work: Path, calib: str) -> Path:
    from slimllm.pruning.settings import PruneSettings
    from slimllm.pruning.stage import run_prune

    target = work / "pruned-shortgpt-k8-lsq"
    if not (target / "config.json").is_file():
        run_prune("smollm2-135m", PruneSettings(method="shortgpt", remove=8, calib=calib), target, force=True)
    return target


def onnx_row(label: str, checkpoint: Path, engine: str, quant: str, work: Path, eval_data: str) -> dict[str, Any]:
    from slimllm.exporters.onnx import OnnxExportSettings, export_onnx

    out = work / ("onnx-" + label.replace(", ", "-").replace(" ", "-"))
    settings = OnnxExportSettings(engine=engine, quant=quant, eval_data=eval_data, eval_windows=8)
    started = time.perf_counter()
    try:
        result = export_onnx(checkpoint, out, settings, force=True)
        validation, error, files = result.validation, None, result.files
    except ValidationError as exc:
        import json

        failed = out.with_name(out.name + ".failed") / "validation.json"
        validation = json.loads(failed.read_text()) if failed.is_file() else {"checks": []}
        error, files = first_line(exc), {}
    return {"label": label, "engine": engine, "quant": quant, "passed": error is None, "error": error,
            "megabytes": round(sum(files.values()) / 2**20, 1), "checks": validation.get("checks", []),
            "seconds": round(time.perf_counter() - started, 1)}


def gguf_rows(model: str, checkpoint: Path, work: Path, eval_data: str) -> dict[str, Any]:
    from slimllm.exporters.gguf import GgufExportSettings, export_gguf

    settings = GgufExportSettings(outtypes=GGUF_TYPES, eval_data=eval_data)
    result = export_gguf(checkpoint, work / f"gguf-{model}", settings, force=True)
    return {"model": model, "files": result.files, "validation": result.validation}


def noise_anatomy(checkpoint: Path) -> list[dict[str, Any]]:
    """For each parity prompt: the largest logit, the fp32 reference's own error (against float64), where it is
    largest, and the largest hidden-state magnitude with the layer and position that hold it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimllm.exporters.parity import PARITY_PROMPTS, float64_compute

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    rows = []
    for index, prompt in enumerate(PARITY_PROMPTS):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            fp32 = model(ids, output_hidden_states=True)
            with float64_compute(model):
                exact = model(ids, output_hidden_states=True)
        error = (fp32.logits.double() - exact.logits).abs().amax(-1)[0]
        worst = int(error.argmax())
        rows.append({
            "prompt": index, "tokens": int(ids.shape[1]), "max_abs_logit": float(fp32.logits.abs().max()),
            "reference_fp32_error": float(error.max()), "error_position": worst,
            "error_token": tokenizer.decode(ids[0, worst]),
            "error_by_position": [float(v) for v in error],
            # After each layer, at the position where the logits' error is largest: the hidden state's size and
            # its fp32 error (against float64).
            "layers_at_error_position": [
                {"layer": layer, "max_abs_hidden": float(h64[0, worst].abs().max()),
                 "fp32_error": float((h32[0, worst].double() - h64[0, worst]).abs().max())}
                for layer, (h32, h64) in enumerate(zip(fp32.hidden_states, exact.hidden_states, strict=True))
            ],
        })
    return rows


def _check(row: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    return next((c for c in row["checks"] if c["name"].startswith(prefix)), None)


def _pair(check: dict[str, Any] | None) -> str:
    return f"{check['value']:.2e} / {check['bound']:.2e}" if check else ""


def markdown(payload: dict[str, Any]) -> str:
    lines = ["# Export parity: SmolLM2-135M, dense and with 8 of 30 layers removed (`python bench/export_parity.py`)",
             "", f"Command: `{payload['command']}`  ",
             f"Machine: {payload['machine']['cpu']}, {payload['machine']['cpu_count']} cores. Versions: "
             + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()) + ".", "",
             "ONNX in onnxruntime (CPU EP) against PyTorch fp32. For fp32 exports each logits bound is "
             f"{payload['noise_multiple']:g} × the reference's own fp32 error on the same inputs (PyTorch fp32 "
             f"against the same model in float64) + {payload['floor']:g}.", "",
             "| export | worst prefill \\|Δ\\| / bound | share of bound | decode \\|Δ\\| / bound | greedy 32 "
             "| PPL ratio | MiB | passed |", "|---|---:|---:|---:|---|---:|---:|---|"]
    for row in payload["onnx"]:
        prefills = [c for c in row["checks"] if c["name"].startswith("prefill")]
        worst = max(prefills, key=lambda c: c["value"] / c["bound"], default=None)
        decode, greedy, ppl = _check(row, "decode"), _check(row, "greedy"), _check(row, "perplexity")
        asserted = greedy is not None and "informational" not in greedy["metric"]
        cells = [row["label"], _pair(worst), f"{worst['value'] / worst['bound']:.2f}" if worst else "",
                 _pair(decode), ("identical" if greedy["passed"] else "differs") if asserted else "not asserted",
                 f"{ppl['value']:.3f}" if ppl else "", str(row["megabytes"] or ""), str(row["passed"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per prefill check of the fp32 exports (Δ: export against PyTorch fp32; the reference's error: "
              "PyTorch fp32 against float64):", "", "| export | check | max \\|logit\\| | reference fp32 error | "
              "\\|Δ\\| | bound | Δ / bound |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in payload["onnx"]:
        for check in row["checks"]:
            noise = check.get("details", {}).get("reference_fp32_error")
            if noise is None:
                continue
            lines.append(f"| {row['label']} | {check['name']} | {check['details']['reference_abs_max']:.1f} | "
                         f"{noise:.2e} | {check['value']:.2e} | {check['bound']:.2e} | "
                         f"{check['value'] / check['bound']:.2f} |")
    anatomy = payload["noise_anatomy"]
    lines += ["", "Where the pruned model's fp32 error comes from (per parity prompt, at the position where the "
              "logits' error is largest):", "",
              "| prompt | tokens | max \\|logit\\| | reference fp32 error | at position (token) "
              "| largest \\|hidden\\| there (after layer) |", "|---:|---:|---:|---:|---|---:|"]
    for row in anatomy:
        peak = max(row["layers_at_error_position"], key=lambda r: r["max_abs_hidden"])
        lines.append(f"| {row['prompt']} | {row['tokens']} | {row['max_abs_logit']:.1f} | "
                     f"{row['reference_fp32_error']:.2e} | {row['error_position']} ({row['error_token']!r}) | "
                     f"{peak['max_abs_hidden']:.0f} ({peak['layer']}) |")
    noisiest = max(anatomy, key=lambda r: r["reference_fp32_error"])
    quietest = min(anatomy, key=lambda r: r["reference_fp32_error"])
    lines += ["", f"Layer by layer at that position, the noisiest prompt ({noisiest['prompt']}) against the quietest "
              f"({quietest['prompt']}):", "", "| after layer | \\|hidden\\| max, noisiest | fp32 error | "
              "\\|hidden\\| max, quietest | fp32 error |", "|---:|---:|---:|---:|---:|"]
    for a, b in zip(noisiest["layers_at_error_position"], quietest["layers_at_error_position"], strict=True):
        lines.append(f"| {a['layer']} | {a['max_abs_hidden']:.1f} | {a['fp32_error']:.1e} | {b['max_abs_hidden']:.1f} "
                     f"| {b['fp32_error']:.1e} |")
    lines += ["", "GGUF in llama.cpp against PyTorch:", "",
              "| type | dense PPL ratio | pruned PPL ratio | pruned argmax agreement | pruned MiB |",
              "|---|---:|---:|---:|---:|"]
    dense, pruned = ({info["type"]: info for info in g["files"].values()} for g in payload["gguf"])
    for gguf_type in (t.upper() for t in GGUF_TYPES):
        d, p = dense.get(gguf_type, {}), pruned.get(gguf_type, {})
        agreement = p.get("argmax_agreement")
        shown = f"{100 * agreement:.1f} %" if agreement is not None else ""
        lines.append(f"| {gguf_type} | {d.get('ppl_ratio', float('nan')):.4f} | "
                     f"{p.get('ppl_ratio', float('nan')):.4f} | {shown} | {p.get('bytes', 0) / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from slimllm.exporters.onnx import GENAI_FP32_TOLERANCE, TOLERANCES, OnnxDType, OnnxQuant

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench" / "export-parity")
    parser.add_argument("--calib", default=str(DATA_DIR / "wiki.valid.tokens"))
    parser.add_argument("--eval-data", default=str(DATA_DIR / "wiki.test.raw"))
    args = parser.parse_args()
    started = time.perf_counter()
    checkpoints = {"dense": checkpoint_directory("smollm2-135m"),
                   "pruned": pruned_checkpoint(args.work_dir, args.calib)}
    onnx = [onnx_row(label, checkpoints[model], engine, quant, args.work_dir, args.eval_data)
            for label, (model, engine, quant) in ONNX_VARIANTS.items()]
    gguf = [gguf_rows(model, checkpoints[model], args.work_dir, args.eval_data) for model in ("dense", "pruned")]
    fp32 = TOLERANCES[(OnnxDType.FP32, OnnxQuant.NONE)]
    payload = {
        "benchmark": "export-parity-smollm2-135m",
        "command": shlex.join(["python", *sys.argv]),
        "machine": machine_info(),
        "versions": library_versions(),
        "noise_multiple": fp32.noise_multiple,
        "floor": fp32.max_abs_logits,
        "genai_fp32_tolerance": {"max_abs": GENAI_FP32_TOLERANCE.max_abs_logits,
                                 "relative": GENAI_FP32_TOLERANCE.relative_logits},
        "onnx": onnx,
        "gguf": gguf,
        "noise_anatomy": noise_anatomy(checkpoints["pruned"]),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS_DIR / "export-parity-smollm2-135m.json", payload)
    text = markdown(payload)
    atomic_write_text(RESULTS_DIR / "export-parity-smollm2-135m.md", text)
    print(text)


if __name__ == "__main__":
    main()
