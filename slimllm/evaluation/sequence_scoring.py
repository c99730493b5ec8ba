"""Log-probabilities of candidate sequences that share a prefix (a question and its endings), many groups at once.

    >>> score = torch_shared_prefix_log_probs(model, pad_id)
    >>> [[ending_0, ending_1, ...], ...] = score([SequenceGroup(sequences, shared, score_from), ...])

Each result tensor holds log p(token j | tokens ..j-1) for j = score_from .. len(sequence)-1 of its sequence.
Two engines compute the same values:

- `logits_fn_log_probs`: the whole sequences of every group in one right-padded batch, through any backend's
  `logits_fn` (onnxruntime, llama.cpp); padding never precedes a scored token.
- `torch_shared_prefix_log_probs`: PyTorch runs each group's shared prefix once (the prefixes of all groups
  left-padded into one batch) and the remainders on its key/value cache, so a four-ending task costs its context
  once instead of four times, and short sequences are batched into GEMMs large enough to run near full speed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SequenceGroup:
    """Sequences that share their first `shared` tokens; the log-probs of tokens `score_from`.. are wanted."""

    sequences: list[list[int]]
    shared: int
    score_from: int

    def __post_init__(self) -> None:
        if not 1 <= self.score_from <= self.shared + 1 or any(len(s) <= self.shared for s in self.sequences):
            raise ValueError("need 1 <= score_from <= shared + 1 and at least one token after the shared prefix")


SequenceLogProbs = Callable[[list[SequenceGroup]], list[list[torch.Tensor]]]

MASKABLE_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take an arbitrary 4-D mask; others (flash kernels) score whole sequences."""


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens the sequences share at their start, leaving at least one token of each after it."""
    shortest = min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == sequences[0][length] for s in sequences):
        length += 1
    return length


def gather_log_probs(logits: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """log p(target) at each row of `logits` [n, vocab], in fp32."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, torch.tensor(list(targets), device=log_probs.device)[:, None])[:, 0].cpu()


def logits_fn_log_probs(logits_fn: LogitsFn, pad_id: int) -> SequenceLogProbs:
    """Every sequence of every group, whole, in one right-padded batch through `logits_fn`."""

    def log_probs(groups: list[SequenceGroup]) -> list[list[torch.Tensor]]:
        rows = [(group.score_from, s) for group in groups for s in group.sequences]
        batch = torch.full((len(rows), max(len(s) for _, s in rows)), pad_id, dtype=torch.long)
        for row, (_, sequence) in enumerate(rows):
            batch[row, : len(sequence)] = torch.tensor(sequence)
        logits = logits_fn(batch)
        values = iter(
            gather_log_probs(logits[row, start - 1 : len(s) - 1], s[start:]) for row, (start, s) in enumerate(rows)
        )
        return [[next(values) for _ in group.sequences] for group in groups]

    return log_probs


def torch_shared_prefix_log_probs(model, pad_id: int) -> SequenceLogProbs:
    """PyTorch: every group packed into one row, each shared prefix once, with a mask that lets each token see only
    its own group's prefix and its own sequence; the output head runs only where a log-prob is wanted."""
    from slimllm.core.device import model_autocast
    from slimllm.core.placement import input_device
    from slimllm.evaluation.perplexity import torch_logits_fn

    if getattr(model.config, "_attn_implementation", "sdpa") not in MASKABLE_ATTENTION:
        return logits_fn_log_probs(torch_logits_fn(model), pad_id)
    device = input_device(model)

    @torch.no_grad()
    def log_probs(groups: list[SequenceGroup]) -> list[list[torch.Tensor]]:
        packed = PackedGroups.build(groups)
        with model_autocast(model):
            logits = model(
                input_ids=packed.tokens[None].to(device),
                attention_mask=_attention_mask(model, packed.allowed).to(device),
                position_ids=packed.positions[None].to(device),
                use_cache=False,
                logits_to_keep=packed.wanted.to(device),
            ).logits[0]
        values = gather_log_probs(logits, packed.targets.tolist())
        return [[values[start:end] for start, end in spans] for spans in packed.spans]

    return log_probs


@dataclass
class PackedGroups:
    """Groups packed into one sequence: per group its shared prefix, then the rest of each of its sequences."""

    tokens: torch.Tensor
    positions: torch.Tensor
    """Each token's position within its own sequence."""
    allowed: torch.Tensor
    """[n, n] bool: query i may attend key j (same group, j's tokens precede i's in i's own sequence)."""
    wanted: torch.Tensor
    """Packed indices whose next-token distribution is wanted, in result order."""
    targets: torch.Tensor
    """The token each wanted distribution is scored on."""
    spans: list[list[tuple[int, int]]]
    """Per group, per sequence: its slice of the wanted log-probs."""

    @classmethod
    def build(cls, groups: list[SequenceGroup]) -> PackedGroups:
        tokens: list[int] = []
        positions: list[int] = []
        owner: list[int] = []  # per token: -1 in a shared prefix, else its sequence's index across all groups
        group_of: list[int] = []
        wanted: list[int] = []
        targets: list[int] = []
        spans: list[list[tuple[int, int]]] = []
        sequence_index = 0
        for number, group in enumerate(groups):
            prefix_start = len(tokens)
            tokens += group.sequences[0][: group.shared]
            positions += range(group.shared)
            owner += [-1] * group.shared
            group_of += [number] * group.shared
            spans.append([])
            for sequence in group.sequences:
                rest_start = len(tokens)
                tokens += sequence[group.shared :]
                positions += range(group.shared, len(sequence))
                owner += [sequence_index] * (len(sequence) - group.shared)
                group_of += [number] * (len(sequence) - group.shared)
                # Position p predicts token p + 1: positions score_from - 1 .. len - 2.
                at = [prefix_start + p if p < group.shared else rest_start + p - group.shared
                      for p in range(group.score_from - 1, len(sequence) - 1)]
                spans[-1].append((len(wanted), len(wanted) + len(at)))
                wanted += at
                targets += sequence[group.score_from :]
                sequence_index += 1
        positions_t, owner_t, group_t = torch.tensor(positions), torch.tensor(owner), torch.tensor(group_of)
        same_group = group_t[:, None] == group_t[None, :]
        visible = (owner_t[None, :] == -1) | (owner_t[None, :] == owner_t[:, None])
        allowed = same_group & visible & (positions_t[None, :] <= positions_t[:, None])
        return cls(torch.tensor(tokens), positions_t, allowed, torch.tensor(wanted), torch.tensor(targets), spans)


def _attention_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A 4D mask the model uses as given: boolean for SDPA and flash kernels, additive for eager attention."""
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
    return allowed[None, None]
