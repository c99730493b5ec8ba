"""Stage `evaluate`: perplexity of the dense model, and perplexity and KL-divergence statistics against it of the
pruned checkpoint (PyTorch), the ONNX export (onnxruntime) and every GGUF file (llama.cpp), on the same windows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from slimllm.core.artifacts import atomic_write_json
from slimllm.core.report import Block, heading, table
from slimllm.pipeline.stages import CompileContext, StageSpec, register_stage, source_hash
from slimllm.pipeline.stages.prune import checkpoint_of

DENSE_LABEL = "dense (PyTorch)"


@dataclass(frozen=True)
class EvaluatedModel:
    """One model the compile run measures: a label for the report, what to load, and the backend to run it in."""

    label: str
    spec: str
    backend: str


def evaluated_models(ctx: CompileContext) -> list[EvaluatedModel]:
    """The pruned checkpoint and every export of this run, in report order (the dense model is the reference)."""
    models = [EvaluatedModel("pruned (PyTorch)", str(checkpoint_of(ctx)), "torch")]
    onnx_output = ctx.outputs.get("export_onnx")
    if onnx_output:
        models.append(EvaluatedModel(f"pruned (ONNX {onnx_output['variant']})", onnx_output["path"], "onnxruntime"))
    gguf_output = ctx.outputs.get("export_gguf")
    if gguf_output:
        for gguf_type, path in gguf_output["files"].items():
            models.append(EvaluatedModel(f"pruned (GGUF {gguf_type}, llama.cpp)", path, "llama.cpp"))
    return models


def onnx_device(ctx: CompileContext) -> str:
    """The device an ONNX export is evaluated on: the export's own provider setting."""
    provider = str(getattr(ctx.settings["onnx"], "provider", "auto"))
    return "cuda" if "cuda" in provider.lower() else "cpu" if "cpu" in provider.lower() else ctx.device


def _keyed_by(ctx: CompileContext) -> dict[str, Any]:
    return {
        "dense_sha256": ctx.dense_sha,
        "eval": {
            "data": source_hash(ctx.compile.eval_data),
            "seq_len": ctx.compile.eval_seq_len,
            "windows": ctx.compile.eval_windows,
        },
    }


def _run(ctx: CompileContext) -> tuple[dict[str, Any], dict[str, Any]]:
    from slimllm.evaluation.divergence import divergence_statistics
    from slimllm.evaluation.perplexity import nll_sums_of_windows
    from slimllm.exporters.parity import eval_windows
    from slimllm.exporters.scorers import open_backend

    perplexities: dict[str, float] = {}
    second_halves: dict[str, float] = {}
    divergence: dict[str, dict[str, Any]] = {}
    with open_backend(str(ctx.dense_dir), "torch", ctx.device, "fp32", placement=ctx.placement) as dense:
        windows, source = eval_windows(
            dense.tokenizer, ctx.compile.eval_data, ctx.compile.eval_seq_len, ctx.compile.eval_windows
        )
        dense_sums = nll_sums_of_windows(dense.logits_fn, windows)
        perplexities[DENSE_LABEL] = math.exp(dense_sums.whole / dense_sums.whole_tokens)
        second_halves[DENSE_LABEL] = math.exp(dense_sums.second_half / dense_sums.second_half_tokens)
        # One artifact loaded at a time, the dense logits recomputed for each: a forward pass per artifact buys not
        # holding every runtime's copy of the model at once (per_token_divergences can share one reference pass).
        for model in evaluated_models(ctx):
            device = onnx_device(ctx) if model.backend == "onnxruntime" else ctx.device
            placement = ctx.placement if model.backend == "torch" else None
            with open_backend(model.spec, model.backend, device, "fp32", context=int(windows.shape[1]),
                              placement=placement) as scorer:
                stats = divergence_statistics(scorer.logits_fn, dense.logits_fn, windows)
            perplexities[model.label] = stats["ppl"]
            second_halves[model.label] = stats["second_half"]["ppl"]
            divergence[model.label] = stats | {"backend": scorer.backend}
    result = {
        "data": source,
        "seq_len": int(windows.shape[1]),
        "windows": int(windows.shape[0]),
        "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
        "perplexity": perplexities,
        "perplexity_second_half": second_halves,
        "divergence": divergence,
        "reference": DENSE_LABEL,
    }
    path = ctx.out_dir / "evaluation.json"
    atomic_write_json(path, result)
    return {"path": str(path)}, result


def _report(evaluation: dict[str, Any], _images: dict[str, bytes]) -> list[Block]:
    return _perplexity_blocks(evaluation) + _divergence_blocks(evaluation)


def _perplexity_blocks(evaluation: dict[str, Any]) -> list[Block]:
    if not evaluation:
        return []
    halves = evaluation.get("perplexity_second_half", {})  # absent from an evaluation.json written before it existed
    return [
        heading("Perplexity"),
        {"kind": "p", "text": (
            f"`{evaluation['data']}`, {evaluation['windows']} windows x {evaluation['seq_len']} tokens "
            f"({evaluation['tokens_scored']} tokens scored), the same windows for every row. The second column "
            "scores only each window's second half, as `llama-perplexity` does: compare llama.cpp's figures with it."
        )},
        table(["model", "perplexity (whole windows)", "perplexity (second halves)"],
              [[label, f"{value:.3f}", _maybe(halves.get(label))]
               for label, value in evaluation["perplexity"].items()]),
    ]


def _maybe(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _divergence_blocks(evaluation: dict[str, Any]) -> list[Block]:
    divergence = evaluation.get("divergence")
    if not divergence:
        return []
    rows = [
        [
            label,
            f"{stats['ppl_ratio']:.4f}",
            f"{stats['kld']['mean']:.5f} ± {stats['kld']['stderr']:.5f}",
            f"{stats['kld']['99%']:.4f}",
            f"{stats['kld']['max']:.3f}",
            f"{100 * stats['same_top1']['mean']:.2f} %",
            f"{100 * stats['delta_p']['rms']:.2f} %",
        ]
        for label, stats in divergence.items()
    ]
    return [
        heading("Divergence from the dense model"),
        {"kind": "p", "text": (
            "KL(dense || model) per predicted token on the same windows, as `llama-perplexity --kl-divergence` "
            "reports it; Δp is the model's probability of the actual next token minus the dense model's."
        )},
        table(["model", "PPL ratio", "mean KLD", "KLD 99%", "KLD max", "same top-1", "Δp RMS"], rows),
    ]


EVALUATE = register_stage(
    StageSpec(
        name="evaluate",
        run=_run,
        order=40,
        report=_report,
        reads=("prune", "heal", "export_onnx", "export_gguf"),
        keyed_by=_keyed_by,
        writes=("evaluation.json",),
        version=2,  # 2: KL statistics of every artifact against the dense model
    )
)
