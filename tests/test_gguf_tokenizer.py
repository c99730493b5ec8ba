"""The tokenizer rebuilt from a GGUF SentencePiece vocabulary against llama.cpp reading the same file, on a
vocabulary whose merges tie (equal scores), where llama.cpp merges the leftmost pair first."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimllm.models.gguf_tokenizer import leftmost_first, sentencepiece_tokenizer_from_gguf, tie_cycles

SPACE = "\u2581"
# (token, score). "ab", "bc" and "cd" tie; by token id "bc" would be merged before "ab" wherever both could merge.
NORMAL = [(SPACE, -1.0), ("a", -2.0), ("b", -2.0), ("c", -2.0), ("d", -2.0), ("x", -2.0), ("bc", -5.0),
          ("ab", -5.0), ("cd", -5.0), ("xx", -6.0), ("xxx", -7.0), (SPACE + "ab", -8.0)]


def _write_vocab_gguf(path: Path, normal: list[tuple[str, float]]) -> Path:
    """A llama-architecture GGUF holding hyperparameters and a SentencePiece vocabulary only (what llama.cpp reads
    with vocab_only): <unk>, <s>, </s>, the 256 byte tokens, then `normal`."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in normal]
    scores = [0.0] * 259 + [score for _, score in normal]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * len(normal)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("text", ["abc", "abcd", "bcd", "cabc", "ab abc bcd", "xxxx", "xxxxx", "dabcab", "a b c"])
def test_tied_merges_tokenize_as_llama_cpp(tmp_path, text):
    from llama_cpp import Llama

    from slimllm.models.loading import set_special_token_insertion

    path = _write_vocab_gguf(tmp_path / "ties.gguf", NORMAL)
    tokenizer = sentencepiece_tokenizer_from_gguf(path)
    set_special_token_insertion(tokenizer, add_bos=True)  # as loading does, from the file's add_bos_token
    vocab = Llama(str(path), vocab_only=True, verbose=False)
    try:
        expected = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    finally:
        vocab.close()
    assert tokenizer(text).input_ids == expected


def test_a_tie_group_ranks_the_pair_that_can_sit_left_first():
    # "ab" ends with what "bc" starts with, so in "abc" both can merge and llama.cpp takes "ab" (further left).
    group = [(265, 1, "b", "c"), (266, 1, "a", "b"), (267, 1, "c", "d")]
    order, cyclic = leftmost_first(group)
    assert order.index(("a", "b")) < order.index(("b", "c")) < order.index(("c", "d")) and not cyclic
    # The two splits of "aaa" can each sit left of the other: no order resolves both, and it is said.
    assert leftmost_first([(7, 1, "a", "aa"), (7, 2, "aa", "a")])[1]
    tokens = [t for t, _ in NORMAL]
    assert tie_cycles(tokens, [s for _, s in NORMAL], [1] * len(NORMAL)) == 1  # "xxx": (x, xx) and (xx, x)
