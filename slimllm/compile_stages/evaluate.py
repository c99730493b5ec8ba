"""Stage `evaluate`: perplexity of dense and pruned in PyTorch, of the ONNX export in onnxruntime, and of every
GGUF file (measured by its export stage in llama.cpp), on the same windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimllm.artifacts import atomic_write_json
from slimllm.compile_stages import CompileContext, StageSpec, register_stage, source_hash
from slimllm.compile_stages.prune import checkpoint_of


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
    from slimllm.exporters.parity import TorchReference, eval_windows, perplexity

    pruned = TorchReference.load(checkpoint_of(ctx))
    windows, source = eval_windows(
        pruned.tokenizer, ctx.compile.eval_data, ctx.compile.eval_seq_len, ctx.compile.eval_windows
    )
    rows: dict[str, Any] = {}
    dense = TorchReference.load(ctx.dense_dir)
    rows["dense (PyTorch)"] = perplexity(dense.logits_fn(), windows)
    del dense
    rows["pruned (PyTorch)"] = perplexity(pruned.logits_fn(), windows)
    onnx_output = ctx.outputs.get("export_onnx")
    if onnx_output:
        from slimllm.exporters.ort_session import OrtCausalLM

        runner = OrtCausalLM(Path(onnx_output["path"]) / "model.onnx", ctx.settings["onnx"].provider)
        label = f"pruned (ONNX {onnx_output['variant']}, {runner.provider_used})"
        rows[label] = perplexity(runner.logits_fn(), windows)
    if ctx.outputs.get("export_gguf"):
        for info in ctx.results["export_gguf"]["files"].values():
            rows[f"pruned (GGUF {info['type']}, llama.cpp)"] = info["ppl"]
    result = {
        "data": source,
        "seq_len": int(windows.shape[1]),
        "windows": int(windows.shape[0]),
        "tokens_scored": int(windows.shape[0] * (windows.shape[1] - 1)),
        "perplexity": rows,
    }
    path = ctx.out_dir / "evaluation.json"
    atomic_write_json(path, result)
    return {"path": str(path)}, result


EVALUATE = register_stage(
    StageSpec(
        name="evaluate",
        run=_run,
        reads=("prune", "export_onnx", "export_gguf"),
        keyed_by=_keyed_by,
        writes=("evaluation.json",),
    )
)
