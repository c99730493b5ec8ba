"""Blocks without attention (2SSP's depth stage): the model class, its checkpoint, and the prune stage end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CALIB_FILE, TINY_ARCHITECTURES, build_tiny_model
from test_cli import _assert_user_error, run_cli

from slimllm.core.errors import UserInputError
from slimllm.models.architectures import decoder_layers
from slimllm.models.attention_free import attention_free_layers, remove_attention
from slimllm.models.layer_io import attention_skipped
from slimllm.pruning.surgery import remove_layers


def _ids(n: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, 49152, (n, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_a_block_without_attention_equals_zeroing_its_attention(arch):
    model = build_tiny_model(arch, num_layers=4)
    ids = _ids()
    with torch.no_grad(), attention_skipped(model, [1, 3]):
        expected = model(input_ids=ids).logits
    slim = remove_attention(model, [3, 1]).eval()
    assert attention_free_layers(slim.config) == [1, 3]
    assert not hasattr(decoder_layers(slim)[1], "self_attn") and hasattr(decoder_layers(slim)[2], "self_attn")
    with torch.no_grad():
        assert torch.allclose(slim(input_ids=ids).logits, expected, atol=1e-5)
    # Generation with the KV cache (which only the attention blocks use) equals recomputing every step.
    prompt = ids[:1, :5]
    generated = slim.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    tokens = prompt
    for _ in range(6):
        with torch.no_grad():
            tokens = torch.cat([tokens, slim(input_ids=tokens, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert generated.tolist() == tokens.tolist()


def test_checkpoint_loads_in_plain_transformers_with_remote_code_and_in_slimllm_without(tmp_path, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    from slimllm.models.loading import load_model

    slim = remove_attention(build_tiny_model("llama", num_layers=4), [2]).eval()
    slim.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "slimllm_llama" and config["attention_free_layers"] == [2]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_slimllm.SlimLlamaForCausalLM"
    assert (tmp_path / "modeling_slimllm.py").is_file()
    ids = _ids()
    with torch.no_grad():
        expected = slim(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
        assert type(plain).__module__.startswith("transformers_modules")  # the file shipped in the checkpoint
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-6)
        loaded = load_model(str(tmp_path), device="cpu")
        assert torch.allclose(loaded.model(input_ids=ids).logits, expected, atol=1e-6)


def test_first_block_keeps_its_attention():
    model = build_tiny_model("llama", num_layers=4)
    with pytest.raises(UserInputError, match="first block"):
        remove_attention(model, [0])
    slim = remove_attention(model, [1])
    with pytest.raises(UserInputError, match="first block without attention"):
        remove_layers(slim, [0])
    cut, _ = remove_layers(slim, [2])  # indices of blocks without attention follow the cut
    assert attention_free_layers(cut.config) == [1]


def _save_slim(arch: str, path, tokenizer, hidden: int = 64):
    slim = remove_attention(build_tiny_model(arch, num_layers=4, hidden=hidden), [1, 3])
    slim.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_gguf_writes_blocks_without_attention_as_deci_and_llama_cpp_agrees(arch, tmp_path, smollm2_tokenizer):
    from slimllm.exporters.gguf import GgufExportSettings, export_gguf
    from slimllm.models.gguf_metadata import read_gguf_header

    source = _save_slim(arch, tmp_path / "slim", smollm2_tokenizer, hidden=256 if arch == "llama" else 64)
    types = ["f32", "q4_k_m"] if arch == "llama" else ["f32"]
    result = export_gguf(source, tmp_path / "gguf", GgufExportSettings(outtypes=types, eval_seq_len=64,
                                                                       eval_windows=1, tokenizer_lines=0))
    assert result.validation["passed"], result.validation
    checks = {c["name"]: c for c in result.validation["files"]["slim-F32.gguf"]["checks"]}
    assert checks["logits on 4 prompts"]["passed"]
    header = read_gguf_header(tmp_path / "gguf" / "slim-F32.gguf")
    assert header.metadata["deci.attention.head_count"] == [4, 0, 4, 0]
    assert not any(t.name.startswith("blk.1.attn") for t in header.tensors)
    assert any(t.name == "blk.1.ffn_down.weight" for t in header.tensors)


@pytest.mark.slow
@pytest.mark.parametrize("arch, window", [("llama", None), ("qwen3", None), ("mistral", 8), ("gemma3", 8)])
def test_onnx_exports_blocks_without_attention_from_the_module(arch, window, tmp_path, smollm2_tokenizer):
    """Past key/values only for the blocks with attention; prefill, padded batch, cached decode and greedy match."""
    import onnx

    from slimllm.exporters.onnx import OnnxExportSettings, export_onnx

    slim = remove_attention(build_tiny_model(arch, num_layers=4, sliding_window=window), [1, 3])
    slim.save_pretrained(tmp_path / "slim")
    smollm2_tokenizer.save_pretrained(tmp_path / "slim")
    result = export_onnx(tmp_path / "slim", tmp_path / "onnx", OnnxExportSettings(eval_seq_len=32, eval_windows=1))
    assert result.validation["passed"], result.validation
    names = {check["name"] for check in result.validation["checks"]}
    assert {"prefill padded batch of 4", "decode 4 steps with KV cache (padded batch)"} <= names
    if window is not None:  # logits compared on text well past the window (the built-in paragraph, repeated)
        assert "logits at 264 tokens (past the 8-token window)" in names
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    assert sorted(i.name for i in graph.input if i.name.startswith("past_key_values.")) == [
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]


def test_exporters_refuse_what_they_cannot_write_in_one_line(tmp_path, smollm2_tokenizer):
    _save_slim("qwen3", tmp_path / "qwen3", smollm2_tokenizer)
    _assert_user_error(run_cli("export", str(tmp_path / "qwen3"), "--target", "gguf", "--out", str(tmp_path / "g")),
                       "no q/k norm")
    _assert_user_error(run_cli("export", str(tmp_path / "qwen3"), "--target", "onnx", "--engine", "genai", "--out",
                               str(tmp_path / "o")), "assumes identical blocks")
    assert not (tmp_path / "g").exists() and not (tmp_path / "o").exists()


def test_2ssp_prune_stage_records_both_stages(tiny_model_dir, tmp_path):
    from slimllm.pruning.methods.two_ssp import TwoSspSettings
    from slimllm.pruning.stage import PruneSettings, run_prune

    source = tiny_model_dir("qwen2")
    settings = PruneSettings(method="2ssp", calib=str(CALIB_FILE), calib_blocks=4, block_len=32)
    result = run_prune(str(source), settings, tmp_path / "p", device="cpu",
                       method_settings=TwoSspSettings(sparsity=0.4, width_multiple="64"))
    record = json.loads((tmp_path / "p" / "slimllm_pruning.json").read_text())
    details = record["details"]
    assert details["ffn_kept"] == 64 and details["ffn_kept_unrounded"] != 64
    assert len(details["attention_removed"]) == details["attention_modules_removed"] >= 1
    assert 0 not in details["attention_removed"]
    assert details["achieved_sparsity"] == pytest.approx(1 - _block_params(tmp_path / "p") / details["block_params"])
    assert "FFN width 128 -> 64" in result.summary and record["summary"] == result.summary
    assert result.removed_layers == []


def _block_params(checkpoint) -> int:
    from slimllm.models.loading import load_model

    model = load_model(str(checkpoint), device="cpu").model
    return sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())


@pytest.mark.slow
def test_2ssp_width_only_is_a_standard_checkpoint_every_exporter_takes(tiny_model_dir, tmp_path):
    """`--stage width` keeps the original architecture: GGUF in llama.cpp and ONNX in onnxruntime pass parity."""
    from slimllm.exporters.gguf import GgufExportSettings, export_gguf
    from slimllm.exporters.onnx import OnnxExportSettings, export_onnx

    source = tiny_model_dir("llama", hidden=256)
    result = run_cli("prune", str(source), "--method", "2ssp", "--stage", "width", "--sparsity", "0.3",
                     "--calib", str(CALIB_FILE), "--calib-blocks", "2", "--block-len", "32", "--out",
                     str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == 256  # 512 -> 358 -> 256
    gguf = export_gguf(tmp_path / "p", tmp_path / "gguf", GgufExportSettings(outtypes=["f32"], eval_seq_len=32,
                                                                             eval_windows=1, tokenizer_lines=0))
    assert gguf.validation["passed"]
    onnx = export_onnx(tmp_path / "p", tmp_path / "onnx", OnnxExportSettings(eval_seq_len=32, eval_windows=1))
    assert onnx.validation["passed"]


def test_2ssp_bad_input_is_one_line(tiny_model_dir, tmp_path):
    source = str(tiny_model_dir("llama"))
    _assert_user_error(run_cli("prune", source, "--method", "2ssp", "--remove", "2", "--calib", str(CALIB_FILE),
                               "--out", str(tmp_path / "a")), "drop --remove")
    _assert_user_error(run_cli("prune", source, "--method", "2ssp", "--sparsity", "1.5", "--calib",
                               str(CALIB_FILE), "--out", str(tmp_path / "b")), "--sparsity must be between 0 and 1")
    _assert_user_error(run_cli("prune", source, "--method", "2ssp", "--repair", "lsq", "--calib", str(CALIB_FILE),
                               "--out", str(tmp_path / "c")), "removes none")
    _assert_user_error(run_cli("prune", source, "--method", "2ssp", "--stage", "attention", "--sparsity", "0.9",
                               "--calib", str(CALIB_FILE), "--out", str(tmp_path / "d")), "first block keeps")
    assert not any((tmp_path / name).exists() for name in "abcd")
