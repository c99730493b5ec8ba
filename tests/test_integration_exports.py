"""The real SmolLM2-135M, dense and with 8 of 30 layers removed, through the real exporters and runtimes."""

import json

import pytest
from conftest import EVAL_FILE

from slimllm.exporters.gguf import GgufExportSettings, export_gguf
from slimllm.exporters.onnx import OnnxExportSettings, export_onnx

pytestmark = pytest.mark.integration

# ShortGPT's choice on WikiText-2 (see bench/results/quality-smollm2-135m-k8.md); fixed here to skip calibration.
REMOVED = [3, 12, 13, 14, 15, 17, 25, 26]


@pytest.fixture(scope="module")
def smollm2_pruned(smollm2_dir, tmp_path_factory):
    from slimllm.models.checkpoints import save_pruned_checkpoint
    from slimllm.models.loading import load_model
    from slimllm.pruning.surgery import remove_layers

    loaded = load_model(str(smollm2_dir), device="cpu")
    pruned, report = remove_layers(loaded.model, REMOVED, inplace=True)
    record = {
        "method": "shortgpt",
        "original_num_layers": 30,
        "removed_layers": REMOVED,
        "kept_layers": report.kept_layers,
    }
    return save_pruned_checkpoint(pruned, loaded.tokenizer, tmp_path_factory.mktemp("smollm2") / "pruned", record)


def test_onnx_fp32_of_the_pruned_model_matches_pytorch_and_a_faulty_layer_does_not(smollm2_pruned, tmp_path):
    """The pruned model takes every step of the export the dense one would: the two differ only in their number of
    layers (the dense model's export parity is measured by bench/export_parity.py)."""
    result = export_onnx(smollm2_pruned, tmp_path / "onnx", OnnxExportSettings())
    checks = {c["name"]: c for c in result.validation["checks"]}
    assert result.validation["passed"], [c for c in checks.values() if not c["passed"]]
    logits = [c for name, c in checks.items() if name.startswith(("prefill", "decode"))]
    # Each bound is derived from PyTorch fp32's own error on the same inputs; a correct export sits well inside it.
    assert len(logits) == 6 and all(c["value"] <= 0.5 * c["bound"] < 2e-3 for c in logits), logits
    assert all(c["details"]["reference_fp32_error"] > 0 for c in logits)
    assert all(c["details"]["argmax_agreement"] == 1.0 for c in logits)
    assert checks["greedy 32 tokens (onnxruntime)"]["metric"] == "identical tokens"
    assert checks["ORTModelForCausalLM load + generate"]["passed"]
    # One layer 2 % off: the export checked against it fails, under the same derived bound.
    import numpy as np
    import torch

    from slimllm.exporters.ort_session import OrtCausalLM
    from slimllm.exporters.parity import PARITY_PROMPTS, TorchReference, compare_logits, hf_token_ids

    faulty = TorchReference.load(smollm2_pruned)
    with torch.no_grad():
        faulty.model.model.layers[10].mlp.down_proj.weight.mul_(1.02)
    ids = np.array([hf_token_ids(faulty.tokenizer, PARITY_PROMPTS[0], True)], dtype=np.int64)
    tolerance = OnnxExportSettings().tolerance_on("cpu")
    check = compare_logits("prefill prompt 0", faulty.forward(ids)[0],
                           OrtCausalLM(tmp_path / "onnx" / "model.onnx", "cpu").forward(ids)[0],
                           tolerance.max_abs_logits, exact=faulty.forward_exact(ids)[0],
                           noise_multiple=tolerance.noise_multiple)
    assert not check.passed and check.value > 10 * check.bound, check


def test_gguf_f32_and_q8_0_in_llama_cpp(smollm2_pruned, tmp_path):
    settings = GgufExportSettings(
        outtypes=["f32", "q8_0"], eval_data=str(EVAL_FILE), eval_seq_len=512, eval_windows=4, tokenizer_lines=200
    )
    result = export_gguf(smollm2_pruned, tmp_path / "gguf", settings)
    assert result.validation["passed"]
    files = {info["type"]: info for info in result.files.values()}
    assert files["F32"]["argmax_agreement"] >= 0.995 and abs(files["F32"]["ppl_ratio"] - 1) <= 0.005
    assert abs(files["Q8_0"]["ppl_ratio"] - 1) <= 0.02
    for report in result.validation["files"].values():
        tokens = next(c for c in report["checks"] if c["name"].startswith("token ids identical"))
        assert tokens["passed"] and tokens["details"]["samples"] >= 200 + 9
    record = json.loads((tmp_path / "gguf" / "slimllm_export.json").read_text())
    assert record["pruning"]["removed_layers"] == REMOVED and record["architecture"] == "llama"
