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
    from slimllm.models.gguf_metadata import gguf_special_token_ids, read_gguf_header

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
    produces it, as llama.cpp's bigram lookup would. Merges of equal score (a tie group) are ordered as llama.cpp
    breaks the tie, by the leftmost pair (`leftmost_first`).
    """
    groups = _tie_groups(tokens, scores, types)
    return [merge for score in sorted(groups, reverse=True) for merge in leftmost_first(groups[score])[0]]


def tie_cycles(tokens: list[str], scores: list[float], types: list[int]) -> int:
    """How many tie groups of a vocabulary no merge order can rank as llama.cpp breaks their ties (see
    `leftmost_first`)."""
    return sum(leftmost_first(group)[1] for group in _tie_groups(tokens, scores, types).values())


Split = tuple[int, int, str, str]
"""(token id, cut, left, right): one way to build a normal token from two vocabulary entries."""


def _tie_groups(tokens: list[str], scores: list[float], types: list[int]) -> dict[float, list[Split]]:
    """Per score, every (token id, cut, left, right) split of a normal token into two vocabulary entries, in token-id
    order."""
    from gguf import TokenType

    vocab = {token: i for i, token in enumerate(tokens)}
    groups: dict[float, list[Split]] = {}
    for token_id, (token, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind != TokenType.NORMAL or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                groups.setdefault(score, []).append((token_id, cut, left, right))
    return groups


def leftmost_first(group: list[Split]) -> tuple[list[tuple[str, str]], bool]:
    """One tie group's merges in the order that reproduces llama.cpp's leftmost rule, and whether the group holds a
    cycle that no order resolves.

    llama.cpp takes, among equal scores, the pair that starts furthest left; a BPE merge list takes the lower rank.
    The two choices differ only where two tied pairs overlap in a text, A = (x, y) just left of B = (y, z): then
    llama.cpp merges A, so A must rank before B whenever A's right symbol is B's left symbol. A topological order of
    that relation gives such a ranking. Where the relation has a cycle (the two splits (a, aa) and (aa, a) of `aaa`
    can each sit left of the other), no ranking matches both arrangements; the cycle's members keep token-id order.
    """
    import heapq

    starting_with: dict[str, list[int]] = {}
    for index, (_, _, left, _) in enumerate(group):
        starting_with.setdefault(left, []).append(index)
    followers = [[j for j in starting_with.get(right, []) if j != i] for i, (*_, right) in enumerate(group)]
    waiting = [0] * len(group)
    for targets in followers:
        for j in targets:
            waiting[j] += 1
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    placed, order, cyclic = [False] * len(group), [], False
    while len(order) < len(group):
        if not ready:  # every remaining merge waits on another: a cycle
            cyclic = True
            ready = [placed.index(False)]
        i = heapq.heappop(ready)
        if placed[i]:
            continue
        placed[i] = True
        order.append(i)
        for j in followers[i]:
            waiting[j] -= 1
            if waiting[j] == 0 and not placed[j]:
                heapq.heappush(ready, j)
    return [(group[i][2], group[i][3]) for i in order], cyclic


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
