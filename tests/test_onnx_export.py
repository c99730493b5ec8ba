"""ONNX export on tiny random models: optimum and genai engines, quantization, parity and its failure path."""

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import TINY_ARCHITECTURES
from test_cli import _assert_user_error, run_cli

import slimllm.exporters.onnx as onnx_exporter
from slimllm.core.errors import UserInputError
from slimllm.exporters.onnx import (
    EXPORT_RECORD_FILE,
    VALIDATION_FILE,
    OnnxExportSettings,
    export_onnx,
    materialize_transposed_weights,
)
from slimllm.exporters.ort_session import OrtCausalLM, resolve_provider


def _check(validation: dict, prefix: str) -> dict:
    return next(c for c in validation["checks"] if c["name"].startswith(prefix))


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
@pytest.mark.parametrize("tied", [True, False])
def test_optimum_export_matches_pytorch(tiny_model_dir, tmp_path, arch_name, tied):
    out = tmp_path / "onnx"
    result = export_onnx(tiny_model_dir(arch_name, tied), out, OnnxExportSettings())
    validation = json.loads((out / VALIDATION_FILE).read_text())
    assert validation["passed"] and result.provider == "CPUExecutionProvider"
    for prefix in ("prefill prompt", "prefill padded batch", "decode 4 steps"):
        check = _check(validation, prefix)
        assert check["passed"] and check["value"] <= 1e-4 and check["details"]["argmax_agreement"] == 1.0
    assert _check(validation, "greedy 32 tokens")["metric"] == "identical tokens"
    assert _check(validation, "ORTModelForCausalLM")["passed"]
    record = json.loads((out / EXPORT_RECORD_FILE).read_text())
    assert record["variant"] == "optimum-fp32" and record["source_sha256"]
    session = OrtCausalLM(out / "model.onnx")
    assert session.num_layers == 6


def test_pruned_checkpoint_exports_with_its_layer_count(tiny_model_dir, tmp_path):
    from slimllm.models.checkpoints import save_pruned_checkpoint
    from slimllm.models.loading import load_model
    from slimllm.pruning.surgery import remove_layers

    loaded = load_model(str(tiny_model_dir("qwen2")), device="cpu")
    pruned, report = remove_layers(loaded.model, [1, 4])
    checkpoint = save_pruned_checkpoint(pruned, loaded.tokenizer, tmp_path / "pruned", {"method": "test"})
    result = export_onnx(checkpoint, tmp_path / "onnx")
    assert result.validation["passed"]
    assert OrtCausalLM(result.model_file).num_layers == 4


@pytest.mark.parametrize("quant", ["int8", "int8-dynamic", "int4"])
def test_quantized_export_covers_the_tied_lm_head(tiny_model_dir, tmp_path, quant):
    out = tmp_path / quant
    result = export_onnx(tiny_model_dir("llama", True), out, OnnxExportSettings(quant=quant))
    perplexity = _check(result.validation, "perplexity")
    assert perplexity["passed"] and perplexity["bound"] == onnx_exporter.TOLERANCES[("fp32", quant)].max_ppl_ratio
    assert any("tied LM head" in note for note in result.notes)
    graph = onnx.load(str(out / "model.onnx"))
    ops = {node.op_type for node in graph.graph.node}
    assert ("MatMulInteger" if quant == "int8-dynamic" else "MatMulNBits") in ops
    lm_head = [n for n in graph.graph.node if "lm_head" in n.name]
    assert lm_head and all(n.op_type != "MatMul" for n in lm_head), "the LM head stayed in float"
    bits = {
        next((a.i for a in n.attribute if a.name == "bits"), None)
        for n in graph.graph.node
        if n.op_type == "MatMulNBits"
    }
    assert bits == {"int8": {8}, "int8-dynamic": set(), "int4": {4, 8}}[quant]
    if quant == "int4":
        assert "GatherBlockQuantized" in ops and next(
            a.i for n in lm_head for a in n.attribute if a.name == "bits"
        ) == 8, "the LM head should be quantized at 8 bits"
        fp32_size = (tiny_model_dir("llama", True) / "model.safetensors").stat().st_size
        assert (out / "model.onnx").stat().st_size < 0.6 * fp32_size


def test_materialize_transposed_weights_is_exact(tiny_model_dir, tmp_path):
    export_onnx(tiny_model_dir("llama", True), tmp_path / "onnx")
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    created = materialize_transposed_weights(model)
    assert created == ["model.embed_tokens.weight_transposed"]
    onnx.save(model, str(tmp_path / "materialized.onnx"))
    ids = np.array([[5, 17, 300, 4000, 12]])
    before, _ = OrtCausalLM(tmp_path / "onnx" / "model.onnx").forward(ids)
    after, _ = OrtCausalLM(tmp_path / "materialized.onnx").forward(ids)
    np.testing.assert_array_equal(before, after)


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int4"])
def test_genai_engine_builds_fused_attention(tiny_model_dir, tmp_path, quant):
    out = tmp_path / f"genai-{quant}"
    result = export_onnx(tiny_model_dir("llama", True), out, OnnxExportSettings(engine="genai", quant=quant))
    assert (out / "genai_config.json").is_file()
    ops = {node.op_type for node in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops
    greedy = _check(result.validation, "greedy 32 tokens (onnxruntime-genai)")
    if quant == "none":
        assert greedy["metric"] == "identical tokens"
        assert _check(result.validation, "prefill prompt 0")["value"] <= 1e-4
    else:
        assert "MatMulNBits" in ops and _check(result.validation, "perplexity")["passed"]


def test_damaged_weight_fails_the_command_and_leaves_no_valid_output(tiny_model_dir, tmp_path, monkeypatch):
    """A wrong weight in the exported graph is caught by our parity check; the CLI exits 1 and nothing valid remains."""
    real_export = onnx_exporter._export_with_optimum

    def export_then_damage(checkpoint, out, settings, provider):
        real_export(checkpoint, out, settings, provider)
        model = onnx.load(str(out / "model.onnx"))
        node = next(n for n in model.graph.node if n.name == "/model/layers.2/mlp/down_proj/MatMul")
        target = next(i for i in model.graph.initializer if i.name == node.input[1])
        values = onnx.numpy_helper.to_array(target).copy()
        values[0, :] += 0.5
        target.CopyFrom(onnx.numpy_helper.from_array(values, target.name))
        onnx.save(model, str(out / "model.onnx"))

    monkeypatch.setattr(onnx_exporter, "_export_with_optimum", export_then_damage)
    out = tmp_path / "onnx"
    result = run_cli("export", str(tiny_model_dir("llama", True)), "--target", "onnx", "--out", str(out))
    assert result.exit_code == 1, result.output
    assert "ONNX parity check (optimum-fp32) failed" in result.stderr and "max_abs_logits" in result.stderr
    assert not out.exists()
    failed = tmp_path / "onnx.failed"
    validation = json.loads((failed / VALIDATION_FILE).read_text())
    assert not validation["passed"] and not _check(validation, "prefill prompt 0")["passed"]


def test_export_cli_json(tiny_model_dir, tmp_path):
    out = tmp_path / "onnx"
    result = run_cli("export", str(tiny_model_dir("mistral", False)), "--target", "onnx", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["variant"] == "optimum-fp32" and payload["validation"]["passed"]
    # A second export into the same directory is refused without --force, and the first one is kept.
    again = run_cli("export", str(tiny_model_dir("mistral", False)), "--target", "onnx", "--out", str(out))
    _assert_user_error(again, "already exists")
    assert (out / "model.onnx").is_file()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--target", "tflite"], "--target must be onnx or gguf"),
        (["--target", "onnx", "--dtype", "fp16"], "--dtype fp16 needs a CUDA device"),
        (["--target", "onnx", "--engine", "genai", "--quant", "int8"], "genai engine builds fp32, fp16 or int4"),
        (["--target", "onnx", "--quant", "int3"], "unknown --quant 'int3'; use one of none, int8, int8-dynamic, int4"),
        (["--target", "onnx", "--block-size", "48"], "--block-size must be"),
        (["--target", "onnx", "--outtype", "q8_0"], "--outtype is a GGUF option"),
        (["--target", "gguf", "--quant", "int4"], "--quant is an ONNX option"),
    ],
)
def test_export_user_errors(tiny_model_dir, tmp_path, args, fragment):
    out = tmp_path / "x"
    _assert_user_error(run_cli("export", str(tiny_model_dir("llama")), *args, "--out", str(out)), fragment)
    assert not out.exists()


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path):
    _assert_user_error(
        run_cli("export", str(tmp_path / "nope"), "--target", "onnx", "--out", str(tmp_path / "o")),
        "does not exist",
    )


def test_cuda_provider_without_a_gpu_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; this checks the message shown without one")
    with pytest.raises(UserInputError, match="--provider cuda requested"):
        resolve_provider("cuda")


@pytest.mark.gpu
def test_fp16_export_on_cuda(tiny_model_dir, tmp_path):
    if resolve_provider("auto").value != "cuda":
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU (make install-gpu)")
    result = export_onnx(tiny_model_dir("llama", True), tmp_path / "fp16", OnnxExportSettings(dtype="fp16"))
    assert result.provider == "CUDAExecutionProvider" and result.validation["passed"]



def test_bound_decoding_keeps_the_cache_on_the_device_and_decodes_like_the_numpy_path(tiny_model_dir, tmp_path):
    """IOBinding decode (what the latency profile times) produces the same tokens as feeding numpy arrays."""
    out = tmp_path / "onnx"
    export_onnx(tiny_model_dir("llama"), out, OnnxExportSettings(eval_seq_len=32, eval_windows=1))
    session = OrtCausalLM(out / "model.onnx", "cpu")
    expected, token, past = [], 1, None
    mask = np.ones((1, 0), dtype=np.int64)
    for _ in range(6):
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        logits, past = session.forward(np.array([[token]], dtype=np.int64), mask, past)
        token = int(logits[0, -1].argmax())
        expected.append(token)
    assert session.decode_bound(1, 6) == expected


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "int8", "int8-dynamic", "int4"])
def test_large_model_path_keeps_tensors_outside_the_graph(tiny_model_dir, tmp_path, monkeypatch, quant):
    """Above the size threshold (protobuf's 2 GB, lowered here to zero) the export, its quantization and the parity
    checks all go through external data, and the directory still loads in optimum."""
    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / quant
    result = export_onnx(tiny_model_dir("llama", True), out, OnnxExportSettings(quant=quant))
    assert result.validation["passed"]
    graph_file, data_file = out / "model.onnx", out / "model.onnx_data"
    assert data_file.is_file() and data_file.stat().st_size > graph_file.stat().st_size
    assert set(result.files) >= {"model.onnx", "model.onnx_data"}
    assert not list(out.glob("*.tmp")) and not list(out.glob("model.fp32*"))
    graph = onnx.load(str(graph_file), load_external_data=False)
    locations = {
        entry.value for init in graph.graph.initializer for entry in init.external_data if entry.key == "location"
    }
    assert locations == {"model.onnx_data"}
    assert _check(result.validation, "ORTModelForCausalLM")["passed"]
    if quant == "none":  # the tied LM head is stored once, as the embedding (optimum cannot share it above 2 GB)
        vocab_sized = [init.name for init in graph.graph.initializer if 49152 in init.dims]
        assert len(vocab_sized) == 1, vocab_sized
        assert any(node.name == "slimllm_tied_lm_head" for node in graph.graph.node)
