import json

import pytest
import torch

from slimllm.core.errors import UserInputError
from slimllm.models.loading import (
    SourceKind,
    embedded_gguf_path,
    gguf_add_special_tokens,
    load_model,
    resolve_model_source,
)

SAMPLE_TEXTS = [
    "Hello world",
    " = Robert Boulter = ",
    "The quick brown fox jumps over the lazy dog. 1234567 + 89 = ?",
    "Ünïcödé, emoji 🚀 and tabs\tand\nnewlines",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def test_source_kinds(tmp_path, tiny_model_dir):
    assert resolve_model_source("smollm2-135m").kind is SourceKind.EMBEDDED
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M").kind is SourceKind.HUB
    assert resolve_model_source(str(tiny_model_dir("llama"))).kind is SourceKind.HF_DIRECTORY
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)).kind is SourceKind.GGUF_FILE


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("./does/not/exist", "does not exist"),
        ("missing.gguf", "does not exist"),
        ("not-a-model", "unknown model 'not-a-model'"),
    ],
)
def test_source_errors(spec, message):
    with pytest.raises(UserInputError, match=message):
        resolve_model_source(spec)


def test_directory_without_config_is_an_error(tmp_path):
    with pytest.raises(UserInputError, match="has no config.json"):
        resolve_model_source(str(tmp_path))


def test_non_gguf_file_is_an_error(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(UserInputError, match="is not a .gguf file"):
        resolve_model_source(str(path))


def test_hub_failure_is_a_user_error(monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE when it is imported; set the flag it consults, so that the test fails
    # at once instead of waiting for the network's timeouts (23 s here).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserInputError, match="could not load 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model", device="cpu")


def test_embedded_gguf_metadata_says_no_bos():
    assert gguf_add_special_tokens(embedded_gguf_path("smollm2-135m"))["add_bos_token"] is False


@pytest.mark.integration
def test_load_from_gguf_file():
    """A .gguf path goes through transformers' dequantization and the BOS fix."""
    loaded = load_model(str(embedded_gguf_path("smollm2-135m")), device="cpu")
    assert loaded.architecture.name == "llama"
    assert loaded.model.config.num_hidden_layers == 30
    assert loaded.model.config.hidden_size == 576
    ids = loaded.tokenizer("The capital of France is").input_ids
    assert ids[0] != loaded.tokenizer.bos_token_id
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()
    assert any("add_bos_token=False" in note for note in loaded.notes)


@pytest.mark.integration
def test_tokenizer_matches_llama_cpp(smollm2_dir):
    """The HF tokenizer and llama.cpp (reading the GGUF metadata) produce identical ids, BOS behaviour included."""
    from llama_cpp import Llama

    loaded = load_model("smollm2-135m", device="cpu")
    vocab = Llama(str(embedded_gguf_path("smollm2-135m")), vocab_only=True, verbose=False)
    try:
        for text in SAMPLE_TEXTS:
            hf_ids = loaded.tokenizer(text).input_ids
            cpp_ids = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            assert hf_ids == cpp_ids, text
    finally:
        vocab.close()
    saved = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert saved["add_bos_token"] is False
