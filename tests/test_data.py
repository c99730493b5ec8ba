import json

import pytest
import torch
from conftest import CALIB_FILE, EVAL_FILE

from slimllm.core.data import (
    DataPurpose,
    SelfTextSettings,
    calibration_blocks,
    load_calibration,
    load_corpus,
    tokenize_corpus,
)
from slimllm.core.errors import UserInputError
from slimllm.models.loading import load_model


def test_wikitext_files_read_as_documents():
    evaluation = load_corpus(str(EVAL_FILE), DataPurpose.EVALUATION)
    calibration = load_corpus(str(CALIB_FILE), DataPurpose.CALIBRATION)
    assert evaluation.documents[0] == " = Robert Boulter = "
    assert len(evaluation.documents) == 2891  # every non-blank line, CRLF endings removed
    assert not calibration.documents[0].startswith("\ufeff")  # the byte-order mark is dropped
    assert all(doc.strip() for doc in calibration.documents)
    assert "\n\n" in evaluation.text and "\r" not in evaluation.text


def test_calibration_refuses_a_test_split():
    with pytest.raises(UserInputError, match="refusing to calibrate on wiki.test.raw"):
        load_corpus(str(EVAL_FILE), DataPurpose.CALIBRATION)


def test_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"text": "first document"}, {"text": ""}, {"text": "second document", "id": 2}]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": [r["text"] for r in records]}), parquet)
    for path, kind in ((jsonl, "jsonl"), (parquet, "parquet")):
        corpus = load_corpus(str(path), DataPurpose.CALIBRATION)
        assert corpus.kind == kind
        assert corpus.documents == ("first document", "second document")
        assert corpus.text == "first document\n\nsecond document"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"\n  \n", "holds no text"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json\n', "line 2 is not valid JSON"),
        ("nofield.jsonl", b'{"body": "x"}\n', "has no 'text' field"),
        ("bad.parquet", b"this is not parquet", "not a readable parquet file"),
        ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
        ("data.csv", b"a,b\n", "unsupported data file"),
    ],
)
def test_bad_sources_are_user_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserInputError, match=message):
        load_corpus(str(path), DataPurpose.CALIBRATION)


def test_missing_source_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"), DataPurpose.EVALUATION)


def test_blocks_are_seeded_and_distinct():
    ids = torch.arange(10_000)
    a = calibration_blocks(ids, 8, 128, seed=3)
    b = calibration_blocks(ids, 8, 128, seed=3)
    c = calibration_blocks(ids, 8, 128, seed=4)
    assert a.shape == (8, 128)
    assert torch.equal(a, b) and not torch.equal(a, c)
    starts = a[:, 0].tolist()
    assert len(set(starts)) == 8 and all(s % 128 == 0 for s in starts)
    with pytest.raises(UserInputError, match="fewer than 100 blocks"):
        calibration_blocks(ids, 100, 128, seed=0)


def test_development_slice_is_held_apart_from_calibration(tiny_model_dir, text_file):
    from slimllm.core.data import split_development

    head, tail = split_development(torch.arange(1000), 0.1)
    assert head.numel() == 900 and torch.equal(tail, torch.arange(900, 1000))
    with pytest.raises(UserInputError, match="holdout"):
        split_development(torch.arange(10), 1.0)
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    ids = tokenize_corpus(load_corpus(str(text_file), DataPurpose.CALIBRATION), loaded.tokenizer)
    block_len = 16
    n_blocks = int(0.5 * ids.numel()) // block_len
    calibration = load_calibration(str(text_file), loaded.model, loaded.tokenizer, n_blocks, block_len, 0, holdout=0.5)
    cut = ids.numel() - round(0.5 * ids.numel())
    allowed = ids[:cut]
    for block in calibration.blocks:  # every block comes from the text before the development slice
        assert any(torch.equal(allowed[s : s + block_len], block) for s in range(0, cut - block_len + 1, block_len))


def test_calibration_from_text_file(tiny_model_dir, text_file):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    calibration = load_calibration(str(text_file), loaded.model, loaded.tokenizer, n_blocks=4, block_len=64, seed=0)
    assert calibration.blocks.shape == (4, 64)
    assert calibration.describe()["tokens"] == 256
    corpus_ids = tokenize_corpus(load_corpus(str(text_file), DataPurpose.CALIBRATION), loaded.tokenizer)
    first = calibration.blocks[0]
    # every block is a contiguous slice of the tokenized source
    assert any(torch.equal(corpus_ids[s : s + 64], first) for s in range(0, corpus_ids.numel() - 63, 64))


def test_self_text_is_seeded_and_cached(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLLM_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    settings = SelfTextSettings(n_samples=4, max_new_tokens=24, batch_size=2, seed=7)
    def write(settings: SelfTextSettings):
        return load_corpus("self", DataPurpose.CALIBRATION, model=loaded.model, tokenizer=loaded.tokenizer,
                           self_settings=settings)

    first = write(settings)
    cached = list((tmp_path / "cache" / "self-text").glob("*.json"))
    assert len(cached) == 1
    cached[0].unlink()
    again = write(settings)
    assert first.documents == again.documents  # regenerated with the same seed: identical
    assert len(first.documents) == 4 and first.kind == "self"
    other = write(SelfTextSettings(n_samples=4, max_new_tokens=24, batch_size=2, seed=8))
    assert other.documents != first.documents
    blocks = load_calibration("self", loaded.model, loaded.tokenizer, n_blocks=2, block_len=32, seed=0)
    assert blocks.blocks.shape == (2, 32) and blocks.kind == "self"


def test_more_self_text_continues_the_cached_batches_and_less_is_their_prefix(tiny_model_dir, tmp_path, monkeypatch):
    from slimllm.core.data import generate_self_text

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    small, large = (SelfTextSettings(n_samples=n, max_new_tokens=16, batch_size=2, seed=3) for n in (2, 6))
    monkeypatch.setenv("SLIMLLM_CACHE_DIR", str(tmp_path / "scratch"))
    from_scratch = generate_self_text(loaded.model, loaded.tokenizer, large)
    monkeypatch.setenv("SLIMLLM_CACHE_DIR", str(tmp_path / "grown"))
    first = generate_self_text(loaded.model, loaded.tokenizer, small)
    grown = generate_self_text(loaded.model, loaded.tokenizer, large)  # continues after the small request's batch
    assert first == from_scratch[:2] and grown == from_scratch and len(grown) == 6
    cache = next((tmp_path / "grown" / "self-text").glob("*.json"))
    stamp = cache.stat().st_mtime_ns
    assert generate_self_text(loaded.model, loaded.tokenizer, small) == first  # a prefix, nothing written
    assert cache.stat().st_mtime_ns == stamp


def test_self_text_is_not_for_evaluation():
    with pytest.raises(UserInputError, match="calibration only"):
        load_corpus("self", DataPurpose.EVALUATION)


def test_a_text_is_tokenized_once_per_tokenizer(tiny_model_dir, text_file, monkeypatch):
    """The ids of one text under one tokenizer are reused within a process; a tokenizer that inserts BOS (another
    post-processor) or another text is tokenized anew."""
    from transformers import AutoTokenizer

    import slimllm.core.data
    from slimllm.core.data import DataPurpose, load_corpus, tokenize_corpus
    from slimllm.models.loading import set_special_token_insertion

    monkeypatch.setattr(slimllm.core.data, "_TOKENIZED", {})  # what earlier tests tokenized
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    corpus = load_corpus(str(text_file), DataPurpose.CALIBRATION)
    calls = []
    real_call = type(tokenizer).__call__

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real_call(self, *args, **kwargs)

    type(tokenizer).__call__ = counted
    try:
        first = tokenize_corpus(corpus, tokenizer)
        first[:5] = -1  # a caller changing its copy does not change what the next caller gets
        again = tokenize_corpus(corpus, AutoTokenizer.from_pretrained(tiny_model_dir("llama")))
        assert len(calls) == 1 and again.min() >= 0
        with_bos = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
        set_special_token_insertion(with_bos, add_bos=True)
        bos_ids = tokenize_corpus(corpus, with_bos)
        assert len(calls) == 2 and bos_ids[0] == with_bos.bos_token_id and torch.equal(bos_ids[1:], again)
    finally:
        type(tokenizer).__call__ = real_call
