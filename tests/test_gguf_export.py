"""GGUF export on tiny random models, checked in real llama.cpp: writer, tokenizer, types, parity and failures."""

import json

import numpy as np
import pytest
import torch
from conftest import CALIB_FILE, EVAL_FILE, TINY_ARCHITECTURES
from test_cli import _assert_user_error, run_cli

import slimllm.exporters.gguf as gguf_exporter
from slimllm.core.errors import ExportError, UserInputError
from slimllm.exporters.checkpoint import inspect_checkpoint
from slimllm.exporters.gguf import VALIDATION_FILE, GgufExportSettings, export_gguf, validate_gguf_files
from slimllm.exporters.gguf_vocab import BPE_PRE_TOKENIZERS, identify_bpe_pre_tokenizer
from slimllm.exporters.gguf_writer import GgufType, permute_for_llama_rope, write_gguf
from slimllm.exporters.llama_cpp_runner import LlamaCppModel
from slimllm.models.gguf_metadata import read_gguf_header, read_gguf_tensor
from slimllm.models.loading import embedded_gguf_path

FAST = {"eval_seq_len": 128, "eval_windows": 2, "tokenizer_lines": 50, "eval_data": str(EVAL_FILE)}


def _checks(validation: dict, file_name: str) -> dict[str, dict]:
    return {c["name"]: c for c in validation["files"][file_name]["checks"]}


def _metadata(path) -> dict:
    metadata = read_gguf_header(path).metadata
    return {name: value for name, value in metadata.items() if not name.startswith("tokenizer.ggml.")}


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
@pytest.mark.parametrize("tied", [True, False])
def test_f32_export_matches_pytorch_in_llama_cpp(tiny_model_dir, tmp_path, arch_name, tied):
    source = tiny_model_dir(arch_name, tied)
    result = export_gguf(source, tmp_path / "gguf", GgufExportSettings(outtypes=["f32"], **FAST))
    name = f"{source.name}-F32.gguf"
    checks = _checks(result.validation, name)
    assert result.validation["passed"], checks
    tokens = next(c for n, c in checks.items() if n.startswith("token ids identical"))
    assert tokens["passed"] and tokens["details"]["samples"] >= 50
    logits = next(c for n, c in checks.items() if n.startswith("logits on"))
    # ggml evaluates GELU (Gemma's FFN) from a table of fp16 inputs, so F32 files of GELU models differ by more.
    assert logits["value"] < (1e-3 if arch_name == "gemma3" else 1e-4)
    assert result.files[name]["argmax_agreement"] >= 0.995
    assert abs(result.files[name]["ppl_ratio"] - 1) < 1e-3
    names = {t.name for t in read_gguf_header(tmp_path / "gguf" / name).tensors}
    assert ("output.weight" in names) == (not tied)
    expected_arch = {"mistral": "llama"}.get(arch_name, arch_name)
    assert _metadata(tmp_path / "gguf" / name)["general.architecture"] == expected_arch


def test_header_reader_matches_gguf_py(tiny_model_dir, tmp_path):
    """slimllm reads GGUF headers itself (gguf-py's reader takes seconds per file); on one file of each kind of
    vocabulary it must give gguf-py's values for every key and every tensor's name, shape, type and offset."""
    from gguf import GGUFReader

    source = tiny_model_dir("qwen3", False)
    result = export_gguf(source, tmp_path / "gguf", GgufExportSettings(outtypes=["q8_0"], **FAST))
    for path in (result.path_of("q8_0"), embedded_gguf_path("smollm2-135m")):
        header, reader = read_gguf_header(path), GGUFReader(str(path))
        expected = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
        assert header.metadata.keys() == expected.keys()
        for name, value in expected.items():
            assert header.metadata[name] == pytest.approx(value) if isinstance(value, float) else \
                header.metadata[name] == value, name
        assert [(t.name, list(t.shape), t.type, t.offset) for t in header.tensors] == [
            (t.name, [int(d) for d in t.shape], t.tensor_type.name, int(t.data_offset) - reader.data_offset)
            for t in reader.tensors
        ]
        assert header.data_offset == reader.data_offset


def test_export_leaves_other_libraries_log_levels_as_they_were(tiny_model_dir, tmp_path):
    """gguf-py logs at INFO and warns about pair templates; slimllm quiets them only while it writes."""
    import logging

    names = ("gguf", "gguf.vocab")
    previous = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.DEBUG)
        write_gguf(inspect_checkpoint(tiny_model_dir("llama")), tmp_path / "m.gguf", GgufType.F32)
        assert {name: logging.getLogger(name).level for name in names} == dict.fromkeys(names, logging.DEBUG)
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


def test_all_types_in_one_call(tiny_model_dir, tmp_path):
    # 256-wide rows split into K-quant super-blocks, so Q4_K_M is a real K-quant, not llama.cpp's Q5_0 fallback.
    source = tiny_model_dir("llama", True, hidden=256)
    types = ["f16", "bf16", "q8_0", "q4_0", "q4_k_m"]
    result = export_gguf(source, tmp_path / "gguf", GgufExportSettings(outtypes=types, **FAST))
    assert sorted(info["type"] for info in result.files.values()) == sorted(t.upper() for t in types)
    assert not list((tmp_path / "gguf").glob(".intermediate*")), "the F32 intermediate of the K-quant is left over"
    tensor_types = {
        info["type"]: {t.name: t.type for t in read_gguf_header(tmp_path / "gguf" / name).tensors}
        for name, info in result.files.items()
    }
    assert tensor_types["Q8_0"]["blk.0.attn_q.weight"] == "Q8_0"
    assert tensor_types["Q4_0"]["blk.0.ffn_down.weight"] == "Q4_0"
    assert tensor_types["Q4_0"]["token_embd.weight"] == "Q8_0"  # tied: it is also the output projection
    assert tensor_types["F16"]["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay F32
    assert tensor_types["BF16"]["blk.0.attn_k.weight"] == "BF16"
    assert tensor_types["Q4_K_M"]["blk.0.attn_q.weight"] == "Q4_K"
    assert "Q5_0" not in set(tensor_types["Q4_K_M"].values())
    for name, info in result.files.items():
        tolerance = gguf_exporter.TOLERANCES[GgufType(info["type"].lower())]
        assert info["passed"] and info["ppl_ratio"] <= tolerance.max_ppl_ratio
        # Every type is held to an argmax bound, not only F32: perplexity alone misses a wrong attention pattern.
        agreement = _checks(result.validation, name)["argmax agreement on evaluation windows"]
        assert agreement["bound"] == tolerance.min_argmax_agreement > 0 and agreement["passed"]
        assert agreement["value"] >= tolerance.min_argmax_agreement
    sizes = {info["type"]: info["bytes"] for info in result.files.values()}
    assert sizes["Q4_0"] < sizes["Q8_0"] < sizes["F16"]


def test_rows_that_do_not_split_into_blocks_stay_f16(tmp_path, smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    directory = tmp_path / "odd"
    LlamaForCausalLM(config).save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    result = export_gguf(directory, tmp_path / "gguf", GgufExportSettings(outtypes=["q8_0"], **FAST))
    types = {t.name: t.type for t in read_gguf_header(tmp_path / "gguf" / "odd-Q8_0.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "F16"  # rows of 48 do not split into blocks of 32
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80
    assert result.validation["passed"]


def test_missing_rope_permutation_is_caught(tiny_model_dir, tmp_path):
    """A llama-arch file written without the Q/K permutation loads and runs, but the parity check rejects it."""
    checkpoint = inspect_checkpoint(tiny_model_dir("llama", True))
    path = tmp_path / "unpermuted.gguf"
    write_gguf(checkpoint, path, GgufType.F32, permute_qk=False)
    reports, files, _ = validate_gguf_files({GgufType.F32: path}, checkpoint.path, GgufExportSettings(**FAST))
    report = reports[path.name]
    assert not report.passed
    failed = {c.name for c in report.failures()}
    assert "logits on 4 prompts" in failed and "argmax agreement on evaluation windows" in failed


def test_permutation_matches_interleaved_rope():
    """Row 2i/2i+1 of a permuted head are rows i and i + d/2 of the original (rotate-half -> adjacent pairs)."""
    weight = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads of dim 8, 3 input features
    permuted = permute_for_llama_rope(weight, n_heads=2)
    for head in range(2):
        for i in range(4):
            np.testing.assert_array_equal(permuted[head * 8 + 2 * i], weight[head * 8 + i])
            np.testing.assert_array_equal(permuted[head * 8 + 2 * i + 1], weight[head * 8 + i + 4])


def test_failed_parity_fails_the_command_and_leaves_no_valid_output(tiny_model_dir, tmp_path, monkeypatch):
    real_write = gguf_exporter.write_gguf
    monkeypatch.setattr(gguf_exporter, "write_gguf", lambda c, p, t: real_write(c, p, t, permute_qk=False))
    out = tmp_path / "gguf"
    result = run_cli(
        "export", str(tiny_model_dir("llama", True)), "--target", "gguf", "--outtype", "f32", "--out", str(out),
        "--eval-seq-len", "128", "--eval-windows", "2",
    )
    assert result.exit_code == 1, result.output
    assert "GGUF parity check failed" in result.stderr and "max_abs_logits" in result.stderr
    assert not out.exists()
    validation = json.loads((tmp_path / "gguf.failed" / VALIDATION_FILE).read_text())
    assert not validation["passed"]


def _with_pre_tokenizer(source, target, pre_tokenizer):
    import shutil

    shutil.copytree(source, target)
    tokenizer_json = json.loads((target / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = pre_tokenizer
    (target / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return target


def _pre_tokenizer_json(signature) -> dict:
    parts = []
    for component in signature:
        if component[0] == "byte_level":
            parts.append(
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": component[1] == "gpt2_regex"}
            )
        elif component[0] == "digits":
            parts.append({"type": "Digits", "individual_digits": True})
        else:
            parts.append({"type": "Split", "pattern": {"Regex": component[1]}, "behavior": "Isolated", "invert": False})
    return {"type": "Sequence", "pretokenizers": parts}


TRICKY_TEXTS = [
    "In 2024, 12345 people paid $3.50 each -- that's 43,207.5 dollars!",
    "They'll say it's fine; we'd RATHER not.\n\n\nTabs\tand   spaces   ",
    "naïve café déjà vu 東京 ok?? ...",
    "x=10;y=200\nfor(i=0;i<1000;i++){}",
]


@pytest.mark.parametrize("pre_name", sorted(set(BPE_PRE_TOKENIZERS.values())))
def test_each_known_pre_tokenizer_tokenizes_like_hugging_face(tiny_model_dir, tmp_path, pre_name):
    """For every pre-tokenizer in our table, llama.cpp's splitting equals the Hugging Face tokenizer's."""
    from transformers import AutoTokenizer

    signature = next(s for s, name in BPE_PRE_TOKENIZERS.items() if name == pre_name)
    source = _with_pre_tokenizer(tiny_model_dir("llama", True), tmp_path / "model", _pre_tokenizer_json(signature))
    assert identify_bpe_pre_tokenizer(json.loads((source / "tokenizer.json").read_text())) == pre_name
    path = tmp_path / "model.gguf"
    write_gguf(inspect_checkpoint(source), path, GgufType.F32)
    assert read_gguf_header(path).metadata["tokenizer.ggml.pre"] == pre_name
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = LlamaCppModel(path, n_ctx=64, vocab_only=True)
    try:
        for text in TRICKY_TEXTS:
            assert model.tokenize(text, add_special=False) == tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        model.close()


def test_unknown_pre_tokenizer_is_a_clear_error(tiny_model_dir, tmp_path):
    source = _with_pre_tokenizer(
        tiny_model_dir("llama", True), tmp_path / "model", {"type": "Whitespace"}
    )
    with pytest.raises(ExportError, match="cannot identify the tokenizer's pre-tokenizer"):
        write_gguf(inspect_checkpoint(source), tmp_path / "x.gguf", GgufType.F32)
    result = run_cli("export", str(source), "--target", "gguf", "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "cannot identify the tokenizer's pre-tokenizer" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def sentencepiece_model_dir(tmp_path_factory):
    """A tiny Mistral with a real SentencePiece tokenizer trained on WikiText (Llama 2 / Mistral style)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer, LlamaTokenizerFast, MistralConfig, MistralForCausalLM
    from transformers.convert_slow_tokenizer import LlamaConverter

    directory = tmp_path_factory.mktemp("spm")
    lines = [line for line in CALIB_FILE.read_text(encoding="utf-8-sig").splitlines()[:3000] if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(directory / "sp"), vocab_size=1000, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        num_threads=1, minloglevel=2,
    )
    slow = LlamaTokenizer(str(directory / "sp.model"), legacy=True)
    fast = LlamaTokenizerFast(
        tokenizer_object=LlamaConverter(slow).converted(), vocab_file=str(directory / "sp.model"),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", legacy=True, add_bos_token=True,
    )
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, sliding_window=None,
    )
    model_dir = directory / "model"
    MistralForCausalLM(config).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return model_dir


def test_sentencepiece_tokenizer_is_written_as_llama_model(sentencepiece_model_dir, tmp_path):
    result = export_gguf(sentencepiece_model_dir, tmp_path / "gguf", GgufExportSettings(outtypes=["f32"], **FAST))
    assert result.validation["passed"]
    name = next(iter(result.files))
    metadata = read_gguf_header(tmp_path / "gguf" / name).metadata
    assert metadata["tokenizer.ggml.model"] == "llama"
    assert len(metadata["tokenizer.ggml.scores"]) == 1000


def test_pruning_metadata_and_inspect(tiny_model_dir, tmp_path):
    from slimllm.models.checkpoints import save_pruned_checkpoint
    from slimllm.models.loading import load_model
    from slimllm.pruning.surgery import remove_layers

    loaded = load_model(str(tiny_model_dir("qwen3")), device="cpu")
    pruned, _ = remove_layers(loaded.model, [0, 3])
    record = {"method": "shortgpt", "original_num_layers": 6, "removed_layers": [0, 3], "kept_layers": [1, 2, 4, 5]}
    checkpoint = save_pruned_checkpoint(pruned, loaded.tokenizer, tmp_path / "pruned", record)
    result = export_gguf(checkpoint, tmp_path / "gguf", GgufExportSettings(outtypes=["q8_0"], **FAST))
    path = result.path_of("q8_0")
    metadata = _metadata(path)
    assert metadata["qwen3.block_count"] == 4
    assert metadata["general.slimllm.original_block_count"] == 6
    assert list(metadata["general.slimllm.removed_layers"]) == [0, 3]
    assert "2 of 6 transformer layers removed" in metadata["general.description"]
    shown = run_cli("inspect", str(path))
    assert shown.exit_code == 0 and "general.slimllm.removed_layers = [0, 3]" in shown.output
    assert "qwen3.block_count = 4" in shown.output
    revalidated = run_cli("validate", str(path), "--json")
    assert revalidated.exit_code == 0, revalidated.output
    assert json.loads(revalidated.stdout)["passed"]
    other, _ = remove_layers(loaded.model, [1, 2])  # the checkpoint rewritten in place by another prune
    save_pruned_checkpoint(other, loaded.tokenizer, tmp_path / "pruned", record | {"removed_layers": [1, 2]},
                           force=True)
    stale = run_cli("validate", str(path))
    assert stale.exit_code == 2 and "exported from another checkpoint" in stale.output, stale.output


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
    ],
)
def test_rope_scaling_is_carried_over(tmp_path, smollm2_tokenizer, rope_scaling):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rope_scaling=rope_scaling, rope_theta=10000.0,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "lm_head" not in name:
                param.normal_(0.0, 0.08)
    directory = tmp_path / "rope"
    model.save_pretrained(directory)
    smollm2_tokenizer.save_pretrained(directory)
    result = export_gguf(directory, tmp_path / "gguf", GgufExportSettings(outtypes=["f32"], **FAST))
    assert result.validation["passed"]
    names = {t.name for t in read_gguf_header(result.path_of("f32")).tensors}
    assert ("rope_freqs.weight" in names) == (rope_scaling["rope_type"] == "llama3")


def test_unsupported_rope_scaling_is_an_export_error(tmp_path, smollm2_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    smollm2_tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ExportError, match="rope scaling 'dynamic' is not supported"):
        write_gguf(inspect_checkpoint(tmp_path / "m"), tmp_path / "x.gguf", GgufType.F32)


def test_gguf_cli_writes_several_types(tiny_model_dir, tmp_path):
    out = tmp_path / "gguf"
    result = run_cli(
        "export", str(tiny_model_dir("qwen2", False)), "--target", "gguf", "--outtype", "f16,q8_0",
        "--outtype", "q4_k_m", "--out", str(out), "--eval-seq-len", "128", "--eval-windows", "2", "--json",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert sorted(i["type"] for i in payload["files"].values()) == ["F16", "Q4_K_M", "Q8_0"]
    assert {p.name for p in out.glob("*.gguf")} == set(payload["files"])


def test_unknown_outtype_is_a_user_error(tiny_model_dir, tmp_path):
    result = run_cli(
        "export", str(tiny_model_dir("llama")), "--target", "gguf", "--outtype", "q3_x", "--out", str(tmp_path / "o")
    )
    _assert_user_error(result, "unknown --outtype 'q3_x'")


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_gguf_py_quantizers_match_llama_cpp(tiny_model_dir, tmp_path, outtype):
    """Our Q8_0/Q4_0 files hold the same bytes as llama.cpp's own quantizer makes from the F32 file."""
    import ctypes

    import gguf
    import llama_cpp

    checkpoint = inspect_checkpoint(tiny_model_dir("llama", False))
    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    write_gguf(checkpoint, f32, GgufType.F32)
    write_gguf(checkpoint, ours, GgufType(outtype))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{outtype.upper()}"])
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    our_tensors = {t.name: t for t in read_gguf_header(ours).tensors}
    compared = 0
    for tensor in read_gguf_header(theirs).tensors:
        mine = our_tensors[tensor.name]
        if tensor.type != mine.type:
            # llama.cpp's mixes keep output.weight at Q6_K in Q4_0 files (we keep it at Q8_0); the rest must agree.
            assert tensor.name == "output.weight", (tensor.name, tensor.type, mine.type)
            continue
        assert np.array_equal(read_gguf_tensor(theirs, tensor.name), read_gguf_tensor(ours, tensor.name)), tensor.name
        compared += 1
    assert compared >= 6 * 9  # every layer's matrices and norms


def test_sliding_window_model_exports_only_with_full_attention_allowed(tiny_model_dir, tmp_path):
    """Mistral with a 32-token window: llama.cpp's llama graph has none, so the export is refused unless
    --allow-full-attention, which is recorded, and measured past the window against the real model."""
    source = tiny_model_dir("mistral", sliding_window=32)
    with pytest.raises(UserInputError, match="sliding window of 32 tokens"):
        export_gguf(source, tmp_path / "refused", GgufExportSettings(outtypes=["f32"], **FAST))
    assert not (tmp_path / "refused").exists()
    settings = GgufExportSettings(outtypes=["f32"], allow_full_attention=True, **FAST)
    result = export_gguf(source, tmp_path / "gguf", settings)
    validation = json.loads((tmp_path / "gguf" / "validation.json").read_text())
    attention = validation["attention"]
    assert attention["sliding_window"] == 32 and "full attention" in attention["exported_as"]
    (name,) = result.files
    beyond = next(c for c in validation["files"][name]["checks"] if "beyond the sliding window" in c["name"])
    assert beyond["details"]["context"] == 64
    # The F32 file matches the full-attention model exactly, and so departs from the windowed one past 32 tokens.
    assert result.files[name]["argmax_agreement"] >= 0.995 and beyond["value"] < 0.99


def test_gemma3_windowed_layers_after_pruning_match_llama_cpp(tmp_path, smollm2_tokenizer):
    """Removing a global layer breaks the 2 local : 1 global rhythm; the file names each layer's kind, so llama.cpp
    applies the 8-token window to exactly the layers transformers does, at 128 tokens."""
    from conftest import build_tiny_model

    from slimllm.models.checkpoints import save_pruned_checkpoint
    from slimllm.pruning.surgery import remove_layers

    dense = build_tiny_model("gemma3", num_layers=6, sliding_window=8)
    pruned, _ = remove_layers(dense, [2])
    assert pruned.config.layer_types == ["sliding_attention"] * 4 + ["full_attention"]
    source = save_pruned_checkpoint(pruned, smollm2_tokenizer, tmp_path / "pruned", {"method": "test",
                                                                                      "removed_layers": [2]})
    result = export_gguf(source, tmp_path / "gguf", GgufExportSettings(outtypes=["f32"], **FAST))
    (name,) = result.files
    assert result.validation["passed"], _checks(result.validation, name)
    assert result.files[name]["argmax_agreement"] >= 0.995
    metadata = _metadata(tmp_path / "gguf" / name)
    assert metadata["gemma3.attention.sliding_window"] == 8
    assert metadata["gemma3.attention.sliding_window_pattern"] == [True, True, True, True, False]
    assert metadata["gemma3.rope.freq_base_swa"] == pytest.approx(pruned.config.rope_local_base_freq)
    path = tmp_path / "gguf" / name
    norms = {t.name: read_gguf_tensor(path, t.name) for t in read_gguf_header(path).tensors if "norm" in t.name}
    # llama.cpp multiplies by the stored weight; Gemma by (1 + weight).
    expected = pruned.model.layers[0].input_layernorm.weight.detach().numpy() + 1
    np.testing.assert_allclose(norms["blk.0.attn_norm.weight"], expected, rtol=1e-6)
