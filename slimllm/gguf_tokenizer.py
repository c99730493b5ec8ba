"""A fast tokenizer rebuilt from a GGUF file's SentencePiece (`llama` model) vocabulary, tokenizing as llama.cpp does.

    >>> tokenizer = sentencepiece_tokenizer_from_gguf(Path("gemma-3-270m-q4_k_m.gguf"))
    >>> tokenizer("Hello world")["input_ids"]      # the ids llama.cpp gives for the same file and text

llama.cpp's SentencePiece tokenizer starts from single characters and repeatedly merges the adjacent pair whose
concatenation is a vocabulary entry with the highest score (leftmost first on ties); characters outside the
vocabulary fall back to `<0xXX>` byte tokens. That is byte-fallback BPE whose merge ranks follow the merged token's
score, which is what is built here. transformers' GGUF converter (4.57) builds a Unigram model from the same scores
instead; for Gemma 3, whose scores are BPE ranks, it splits most words into pieces (8,777 tokens where llama.cpp
gives 4,513 on the first 20k characters of WikiText-2), which alone multiplied the measured perplexity by five.

Control tokens (`<bos>`, `<start_of_turn>`, ...) become special added tokens; user-defined ones (Gemma's newline
runs, HTML tags) become plain added tokens matched in the raw text before anything else, as llama.cpp matches them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPACE = "\u2581"
"""SentencePiece's visible space."""


@dataclass(frozen=True)
class SentencePieceVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool
    special_ids: dict[str, int]
    """`bos`, `eos`, `unk`, `pad` where the file declares them."""


def read_sentencepiece_vocab(gguf_path: Path) -> SentencePieceVocab:
    from slimllm.gguf_metadata import gguf_special_token_ids, read_gguf_header

    metadata = read_gguf_header(gguf_path).metadata
    add_space_prefix = metadata.get("tokenizer.ggml.add_space_prefix")
    return SentencePieceVocab(
        tokens=list(metadata["tokenizer.ggml.tokens"]),
        scores=[float(score) for score in metadata["tokenizer.ggml.scores"]],
        types=[int(kind) for kind in metadata["tokenizer.ggml.token_type"]],
        # llama.cpp's default for SentencePiece vocabularies is to add the prefix space.
        add_space_prefix=True if add_space_prefix is None else bool(add_space_prefix),
        special_ids=gguf_special_token_ids(gguf_path),
    )


def bpe_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal token into two vocabulary entries, ranked by the merged token's score (highest first).

    A token reachable by several splits gets one merge per split, all at its score: whichever pair the text holds
    produces it, as llama.cpp's bigram lookup would.
    """
    from gguf import TokenType

    vocab = {token: i for i, token in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token_id, (token, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind != TokenType.NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            left_id, right_id = vocab.get(left), vocab.get(right)
            if left_id is not None and right_id is not None:
                ranked.append((-score, token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_tokenizer_from_gguf(gguf_path: Path):
    """A `PreTrainedTokenizerFast` that tokenizes and decodes as llama.cpp does for this file's vocabulary."""
    vocab = read_sentencepiece_vocab(gguf_path)
    return build_sentencepiece_tokenizer(vocab)


def build_sentencepiece_tokenizer(vocab: SentencePieceVocab):
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    unk_id = vocab.special_ids.get("unk")
    model = BPE(
        vocab={token: i for i, token in enumerate(vocab.tokens)},
        merges=bpe_merges(vocab.tokens, vocab.scores, vocab.types),
        unk_token=vocab.tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    backend = Tokenizer(model)
    steps = [normalizers.Replace(" ", SPACE)]
    if vocab.add_space_prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_space_prefix:
        decode.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decode)
    backend.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, kind in zip(vocab.tokens, vocab.types, strict=True)
            if kind == TokenType.USER_DEFINED
        ]
    )
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(vocab.tokens, vocab.types, strict=True)
            if kind == TokenType.CONTROL
        ]
    )
    names = {f"{name}_token": vocab.tokens[i] for name, i in vocab.special_ids.items() if 0 <= i < len(vocab.tokens)}
    # BOS/EOS insertion follows the file's add_bos/add_eos flags: the GGUF loader sets it for every tokenizer.
    return PreTrainedTokenizerFast(tokenizer_object=backend, **names)
