"""Tokenizer metadata for GGUF files, read from a Hugging Face checkpoint's tokenizer files.

    >>> vocab = read_vocab(Path("out/pruned"), n_vocab=49152)
    >>> vocab.add_to(writer)          # tokenizer.ggml.* keys: model, pre, tokens, types, merges, specials, template

Byte-level BPE tokenizers (GPT-2 style, SmolLM, Llama 3, Qwen) are written as llama.cpp's `gpt2` model. llama.cpp
splits text with its own regexes before BPE, chosen by `tokenizer.ggml.pre`, so the pre-tokenizer is identified
from the structure of `tokenizer.json`; one we cannot identify is an error, never a silent default, because a wrong
choice tokenizes some texts differently without any other symptom.
SentencePiece tokenizers (Llama 2, Mistral) are written as llama.cpp's `llama` model, with scores, from their
`tokenizer.model`.
Merges, special-token ids, add_bos/add_eos and the chat template come from gguf-py's `SpecialVocab`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimllm.core.errors import ExportError
from slimllm.core.logs import quiet_loggers
from slimllm.models.gguf_tokenizer import SPACE

_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")

# tokenizers' own split regexes of the families llama.cpp knows; written here as data to recognise them.
_CONTRACTIONS_AND_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_PUNCTUATION_AND_SPACES = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = _CONTRACTIONS_AND_WORDS + r"\p{N}{1,3}" + _PUNCTUATION_AND_SPACES  # numbers in groups of up to 3
QWEN2_SPLIT = _CONTRACTIONS_AND_WORDS + r"\p{N}" + _PUNCTUATION_AND_SPACES  # single digits

# Pre-tokenizer structure (as `_pre_tokenizer_signature` spells it) -> llama.cpp's `tokenizer.ggml.pre` value.
BPE_PRE_TOKENIZERS: dict[tuple[tuple[str, ...], ...], str] = {
    # ByteLevel with its built-in GPT-2 regex and nothing else.
    (("byte_level", "gpt2_regex"),): "gpt-2",
    # Single digits first, then the GPT-2 regex (StarCoder, SmolLM).
    (("digits", "individual"), ("byte_level", "gpt2_regex")): "smollm",
    (("split", LLAMA3_SPLIT), ("byte_level", "no_regex")): "llama-bpe",
    (("split", QWEN2_SPLIT), ("byte_level", "no_regex")): "qwen2",
}


def _components(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    if pre_tokenizer is None:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [c for item in pre_tokenizer.get("pretokenizers", []) for c in _components(item)]
    return [pre_tokenizer]


def _pre_tokenizer_signature(pre_tokenizer: dict[str, Any] | None) -> tuple[tuple[str, ...], ...]:
    signature: list[tuple[str, ...]] = []
    for component in _components(pre_tokenizer):
        kind = component.get("type")
        if kind == "ByteLevel":
            signature.append(("byte_level", "gpt2_regex" if component.get("use_regex", True) else "no_regex"))
        elif kind == "Digits":
            signature.append(("digits", "individual" if component.get("individual_digits") else "grouped"))
        elif kind == "Split":
            pattern = component.get("pattern", {})
            signature.append(("split", pattern.get("Regex", pattern.get("String", ""))))
        else:
            signature.append((str(kind),))
    return tuple(signature)


def identify_bpe_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE `tokenizer.json`; ExportError when unknown."""
    signature = _pre_tokenizer_signature(tokenizer_json.get("pre_tokenizer"))
    name = BPE_PRE_TOKENIZERS.get(signature)
    if name is None:
        described = " + ".join(part[0] for part in signature) or "none"
        raise ExportError(
            f"cannot identify the tokenizer's pre-tokenizer ({described}) as one llama.cpp knows "
            f"({', '.join(sorted(set(BPE_PRE_TOKENIZERS.values())))}); a wrong guess would tokenize some text "
            "differently in llama.cpp, so the GGUF export stops here"
        )
    return name


@dataclass
class GgufVocab:
    """Everything the `tokenizer.ggml.*` keys hold."""

    model: str
    """llama.cpp tokenizer model: `gpt2` (byte-level BPE) or `llama` (SentencePiece)."""
    pre: str | None
    tokens: list[bytes]
    token_types: list[int]
    scores: list[float] | None
    special: Any
    """gguf-py's SpecialVocab (merges, special ids, add_* flags, chat template)."""
    notes: list[str] = field(default_factory=list)
    add_space_prefix: bool | None = None
    """SentencePiece only: whether llama.cpp prepends a space to the text (None: its default, yes)."""

    def add_to(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        self.special.add_to_gguf(writer, quiet=True)


def _pad_vocab(tokens: list[bytes], types: list[int], scores: list[float] | None, n_vocab: int, unused: int):
    """Embedding rows beyond the tokenizer's vocabulary get placeholder tokens, as llama.cpp's converter does."""
    for index in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{index}]".encode())
        types.append(unused)
        if scores is not None:
            scores.append(-1000.0)


# gguf-py reads add_bos/add_eos from the post-processor and warns about a pair template it does not model
# (`<bos> A <bos> B`, transformers' own for BOS tokenizers); pairs are never written to GGUF, the flags are right.
@quiet_loggers("gguf.vocab")
def read_vocab(checkpoint_dir: Path, n_vocab: int) -> GgufVocab:
    """Tokenizer metadata for a checkpoint whose embedding has `n_vocab` rows."""
    import gguf

    checkpoint_dir = Path(checkpoint_dir)
    tokenizer_file = checkpoint_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ExportError(
            f"{checkpoint_dir} has no tokenizer.json; GGUF export needs the fast tokenizer files "
            "(save the tokenizer with save_pretrained)"
        )
    tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    decoder_types = {c.get("type") for c in _components_of_decoder(tokenizer_json.get("decoder"))}
    byte_level = "ByteLevel" in decoder_types or any(
        c.get("type") == "ByteLevel" for c in _components(tokenizer_json.get("pre_tokenizer"))
    )
    if model.get("type") == "BPE" and byte_level:
        return _bpe_vocab(checkpoint_dir, tokenizer_json, n_vocab, gguf)
    if (checkpoint_dir / "tokenizer.model").is_file():
        return _sentencepiece_vocab(checkpoint_dir, tokenizer_json, n_vocab, gguf)
    if model.get("type") == "BPE" and model.get("byte_fallback") and _escapes_spaces(tokenizer_json):
        return _sentencepiece_bpe_vocab(checkpoint_dir, tokenizer_json, n_vocab, gguf)
    raise ExportError(
        f"the tokenizer in {checkpoint_dir} is neither byte-level BPE nor SentencePiece (a tokenizer.model, or "
        "byte-fallback BPE over '▁'-escaped text); slimllm writes GGUF vocabularies for those kinds only"
    )


def _normalizer_steps(tokenizer_json: dict[str, Any]) -> list[dict[str, Any]]:
    normalizer = tokenizer_json.get("normalizer") or {}
    return list(normalizer.get("normalizers", [])) if normalizer.get("type") == "Sequence" else [normalizer]


def _escapes_spaces(tokenizer_json: dict[str, Any]) -> bool:
    """SentencePiece-style text handling: spaces become '▁' before BPE (a normalizer or a Metaspace step)."""
    replaces = any(
        step.get("type") == "Replace" and step.get("content") == SPACE and step.get("pattern", {}).get("String") == " "
        for step in _normalizer_steps(tokenizer_json)
    )
    metaspace = any(c.get("type") == "Metaspace" for c in _components(tokenizer_json.get("pre_tokenizer")))
    return replaces or metaspace


def _adds_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    prepends = any(
        step.get("type") == "Prepend" and step.get("prepend") == SPACE for step in _normalizer_steps(tokenizer_json)
    )
    metaspace = any(
        c.get("type") == "Metaspace" and c.get("prepend_scheme", "always") != "never"
        for c in _components(tokenizer_json.get("pre_tokenizer"))
    )
    return prepends or metaspace


def sentencepiece_scores(vocab: dict[str, int], merges: list) -> dict[int, float]:
    """SentencePiece scores that make llama.cpp merge in the order of `merges`: a token produced by a merge scores
    minus its rank among the merged tokens (first production counts); tokens no merge produces score below all."""
    scores: dict[int, float] = {}
    for merge in merges:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token_id = vocab.get(left + right)
        if token_id is not None and token_id not in scores:
            scores[token_id] = -float(len(scores))
    rank = len(scores)
    for token_id in sorted(vocab.values()):
        if token_id not in scores:
            scores[token_id] = -float(rank)
            rank += 1
    return scores


def _sentencepiece_bpe_vocab(checkpoint_dir: Path, tokenizer_json: dict, n_vocab: int, gguf) -> GgufVocab:
    """A SentencePiece vocabulary stored as byte-fallback BPE in tokenizer.json (Gemma's, or one slimllm rebuilt
    from a GGUF file), written as llama.cpp's `llama` model with scores derived from the merge order."""
    bpe = tokenizer_json["model"]
    vocab: dict[str, int] = {token: int(i) for token, i in bpe["vocab"].items()}
    scores_by_id = sentencepiece_scores(vocab, bpe.get("merges", []))
    added = {int(a["id"]): a for a in tokenizer_json.get("added_tokens", [])}
    id_to_token = {i: t for t, i in vocab.items()} | {i: a["content"] for i, a in added.items()}
    size = max(id_to_token) + 1
    if size > n_vocab:
        raise ExportError(f"the tokenizer has {size} tokens but the embedding only {n_vocab} rows")
    tokens: list[bytes] = []
    types: list[int] = []
    scores: list[float] = []
    for token_id in range(size):
        text = id_to_token.get(token_id)
        entry = added.get(token_id)
        if text is None:
            tokens.append(f"[PAD{token_id}]".encode())
            types.append(int(gguf.TokenType.UNUSED))
            scores.append(-1000.0)
            continue
        tokens.append(text.encode("utf-8"))
        if entry is not None:
            types.append(int(gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED))
            scores.append(-1000.0)
        elif _BYTE_TOKEN.fullmatch(text):
            types.append(int(gguf.TokenType.BYTE))
            scores.append(0.0)
        else:
            types.append(int(gguf.TokenType.NORMAL))
            scores.append(scores_by_id[token_id])
    _pad_vocab(tokens, types, scores, n_vocab, int(gguf.TokenType.UNUSED))
    special = gguf.SpecialVocab(checkpoint_dir, load_merges=False, n_vocab=n_vocab)
    return GgufVocab(
        "llama", "default", tokens, types, scores, special, add_space_prefix=_adds_space_prefix(tokenizer_json)
    )


def _components_of_decoder(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    if decoder is None:
        return []
    if decoder.get("type") == "Sequence":
        return list(decoder.get("decoders", []))
    return [decoder]


def _bpe_vocab(checkpoint_dir: Path, tokenizer_json: dict, n_vocab: int, gguf) -> GgufVocab:
    pre = identify_bpe_pre_tokenizer(tokenizer_json)
    id_to_token: dict[int, str] = {int(i): t for t, i in tokenizer_json["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in tokenizer_json.get("added_tokens", [])}
    for token_id, entry in added.items():
        id_to_token[token_id] = entry["content"]
    size = max(id_to_token) + 1
    if size > n_vocab:
        raise ExportError(f"the tokenizer has {size} tokens but the embedding only {n_vocab} rows")
    tokens: list[bytes] = []
    types: list[int] = []
    for token_id in range(size):
        text = id_to_token.get(token_id)
        if text is None:
            tokens.append(f"[PAD{token_id}]".encode())
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text.encode("utf-8"))
        entry = added.get(token_id)
        if entry is None:
            types.append(gguf.TokenType.NORMAL)
        else:
            # Special added tokens are control tokens; others are user-defined (matched verbatim in text).
            types.append(gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED)
    _pad_vocab(tokens, types, None, n_vocab, gguf.TokenType.UNUSED)
    special = gguf.SpecialVocab(checkpoint_dir, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise ExportError(f"the BPE tokenizer in {checkpoint_dir} has no merges; llama.cpp cannot use it")
    return GgufVocab("gpt2", pre, tokens, [int(t) for t in types], None, special)


def _sentencepiece_vocab(checkpoint_dir: Path, tokenizer_json: dict, n_vocab: int, gguf) -> GgufVocab:
    try:
        vocab = gguf.SentencePieceVocab(checkpoint_dir)
    except Exception as exc:  # noqa: BLE001 - sentencepiece raises plain RuntimeErrors for bad files
        raise ExportError(f"{checkpoint_dir / 'tokenizer.model'} is not a SentencePiece model ({exc})") from exc
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(token_type))
    # Tokens added on top of the SentencePiece vocabulary live in tokenizer.json in current checkpoints.
    for entry in sorted(tokenizer_json.get("added_tokens", []), key=lambda a: int(a["id"])):
        token_id = int(entry["id"])
        token_type = gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED
        if token_id < len(tokens):
            if entry.get("special"):
                types[token_id] = int(gguf.TokenType.CONTROL)
            continue
        if token_id != len(tokens):
            raise ExportError(f"added token ids are not contiguous after the SentencePiece vocabulary ({token_id})")
        tokens.append(entry["content"].encode("utf-8"))
        scores.append(-1000.0)
        types.append(int(token_type))
    if len(tokens) > n_vocab:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows")
    _pad_vocab(tokens, types, scores, n_vocab, int(gguf.TokenType.UNUSED))
    special = gguf.SpecialVocab(checkpoint_dir, load_merges=False, n_vocab=n_vocab)
    return GgufVocab("llama", "default", tokens, types, scores, special)
