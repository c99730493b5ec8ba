"""Gemma 3 270M, the second embedded model (the `gemma3` extra): loading, tokenizer and exports against llama.cpp on
the original GGUF file."""

import json

import numpy as np
import pytest
from conftest import EVAL_FILE
from test_cli import run_cli

from slimllm.models.gguf_metadata import read_gguf_header, read_gguf_tensor
from slimllm.models.loading import embedded_gguf_path, load_model

pytestmark = pytest.mark.integration

SAMPLES = [
    "Hello  world!\n\n\tTabs, accents (é, ñ), emoji 🤖 and 中文 text.",
    "<start_of_turn>user\nWhat is 2 + 2?<end_of_turn>\n<start_of_turn>model\n",
    "   leading spaces, trailing spaces   ",
    "</div> <br> HTML-ish tags and \n\n\n\n runs of newlines",
    # Runs of one unit: their tokens split several ways at one score (ties that no merge order can rank as llama.cpp
    # does in every arrangement; see slimllm.models.gguf_tokenizer.leftmost_first).
    "=" * 17 + " heading " + "-" * 33 + "|" + "ab" * 9 + " " + "x" * 40 + " hahahahaha ......",
]


@pytest.fixture(scope="module")
def gemma3_gguf():
    return embedded_gguf_path("gemma3-270m")


def test_gemma3_tokenizes_as_llama_cpp(gemma3_gguf):
    """The SentencePiece vocabulary rebuilt from the GGUF gives llama.cpp's ids, BOS included, on every WikiText-2
    test line tried and on special, user-defined and byte-fallback tokens."""
    from llama_cpp import Llama

    tokenizer = load_model("gemma3-270m", device="cpu").tokenizer
    vocab = Llama(str(gemma3_gguf), vocab_only=True, verbose=False)
    lines = [line for line in EVAL_FILE.read_text(encoding="utf-8").splitlines() if line.strip()][:300]
    try:
        for text in SAMPLES + ["\n\n".join(lines)]:
            expected = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            assert tokenizer(text).input_ids == expected, text[:80]
    finally:
        vocab.close()
    assert tokenizer.decode(tokenizer(SAMPLES[0]).input_ids, skip_special_tokens=True) == SAMPLES[0]


def test_gemma3_perplexity_matches_llama_cpp_on_the_original_file(gemma3_gguf):
    """Same text, same windows (768 tokens: past the 512-token window of the local layers): the dequantized
    checkpoint in PyTorch within 1 % of llama.cpp running the original Q4_K_M file."""
    results = {}
    for backend, model in (("torch", "gemma3-270m"), ("llama.cpp", str(gemma3_gguf))):
        result = run_cli("eval", model, "--backend", backend, "--data", str(EVAL_FILE), "--seq-len", "768",
                         "--max-windows", "2", "--json")
        assert result.exit_code == 0, result.output
        results[backend] = json.loads(result.stdout)
    assert results["torch"]["tokens_scored"] == results["llama.cpp"]["tokens_scored"] == 2 * 767
    ratio = results["torch"]["perplexity"] / results["llama.cpp"]["perplexity"]
    assert abs(ratio - 1) < 0.01, results
    assert results["torch"]["perplexity"] < 30  # a wrong tokenizer or a window without BOS lands far above


def test_gemma3_gguf_export_matches_llama_cpps_own_file(gemma3_gguf, tmp_path):
    """Our writer's F16 file of the dequantized checkpoint against the original (written by llama.cpp's converter):
    the same architecture keys, vocabulary and tensors, norms stored as (1 + w); and it passes parity, including
    the graded check past the sliding window."""
    from slimllm.exporters.gguf import GgufExportSettings, export_gguf
    from slimllm.models.loading import checkpoint_directory

    settings = GgufExportSettings(outtypes=["f16"], eval_seq_len=128, eval_windows=1, tokenizer_lines=20,
                                  eval_data=str(EVAL_FILE))
    result = export_gguf(checkpoint_directory("gemma3-270m"), tmp_path / "gguf", settings)
    (name,) = result.files
    checks = {c["name"]: c for c in result.validation["files"][name]["checks"]}
    assert result.validation["passed"], checks
    assert checks["argmax agreement at 1024 tokens (past the 512-token window)"]["passed"]
    ours_path = tmp_path / "gguf" / name
    ours, theirs = read_gguf_header(ours_path), read_gguf_header(gemma3_gguf)
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.freq_base",
                "attention.layer_norm_rms_epsilon", "attention.sliding_window"):
        assert ours.metadata[f"gemma3.{key}"] == pytest.approx(theirs.metadata[f"gemma3.{key}"]), key
    # llama.cpp's default rhythm (5 local, 1 global), written out per layer.
    pattern = ours.metadata["gemma3.attention.sliding_window_pattern"]
    assert pattern == [(i + 1) % 6 != 0 for i in range(18)]
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_space_prefix"):
        assert ours.metadata[key] == theirs.metadata[key], key
    # Scores only order the merges: normal tokens must rank the same.
    types = np.array(theirs.metadata["tokenizer.ggml.token_type"])
    normal = types == 1
    our_scores = np.array(ours.metadata["tokenizer.ggml.scores"])[normal]
    their_scores = np.array(theirs.metadata["tokenizer.ggml.scores"])[normal]
    assert np.array_equal(np.argsort(-our_scores, kind="stable"), np.argsort(-their_scores, kind="stable"))
    our_tensors = {t.name: t for t in ours.tensors}
    their_tensors = {t.name: t for t in theirs.tensors}
    assert our_tensors.keys() == their_tensors.keys()
    for tensor_name, tensor in their_tensors.items():
        assert list(our_tensors[tensor_name].shape) == list(tensor.shape), tensor_name
        if "norm" in tensor_name:  # F32 in both files: the dequantized weight plus one is the original value
            np.testing.assert_allclose(read_gguf_tensor(ours_path, tensor_name),
                                       read_gguf_tensor(gemma3_gguf, tensor_name), rtol=1e-6, atol=1e-6,
                                       err_msg=tensor_name)
