"""2SSP: the balancing rule, FFN-width scores and surgery, and the greedy attention search (tiny random models)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHITECTURES, build_tiny_model

from slimllm.core.errors import UserInputError
from slimllm.models.architectures import decoder_layers
from slimllm.models.layer_io import attention_skipped
from slimllm.pruning.methods.two_ssp import (
    BlockParameters,
    TwoSspStage,
    WidthRounding,
    balance_budget,
    block_parameters,
    greedy_attention_removal,
)
from slimllm.pruning.width import ffn_neuron_scores, ffn_width, keep_ffn_neurons, top_neurons


def _blocks(n: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 49152, (n, length), generator=torch.Generator().manual_seed(0))


def _mha_params(layers: int, d: int, d_ff: int, kv_heads: int, heads: int, bias: bool = False) -> BlockParameters:
    kv = d * (d // heads) * kv_heads
    attention = 2 * d * d + 2 * kv + ((d + 2 * (d // heads) * kv_heads) if bias else 0)
    ffn = 3 * d * d_ff
    return BlockParameters(attention, ffn, layers * (attention + ffn + 2 * d))


# METHODS.md §1's worked values: (model, layers, d, d_ff, kv heads, heads, bias) -> {s: (N_A, K)}.
WORKED = [
    (32, 4096, 11008, 32, 32, False, {0.25: (5, 7744), 0.375: (9, 6368), 0.5: (13, 4992)}),
    (32, 4096, 14336, 8, 32, False, {0.25: (1, 10005), 0.375: (2, 7893), 0.5: (5, 5994)}),
    (28, 3584, 18944, 4, 28, True, {0.25: (0, 13525), 0.375: (0, 10816), 0.5: (1, 8204)}),
    (30, 576, 1536, 3, 9, False, {0.25: (2, 1058), 0.375: (4, 836), 0.5: (8, 648)}),
]


@pytest.mark.parametrize("layers, d, d_ff, kv, heads, bias, expected", WORKED)
def test_balancing_rule_matches_the_worked_values(layers, d, d_ff, kv, heads, bias, expected):
    params = _mha_params(layers, d, d_ff, kv, heads, bias)
    for sparsity, (n_attention, k) in expected.items():
        budget = balance_budget(params, layers, d_ff, sparsity, rounding=WidthRounding.NONE)
        assert (budget.attention_modules, budget.ffn_kept) == (n_attention, k), sparsity
        assert budget.sparsity == pytest.approx(sparsity, abs=2e-4)


def test_rounding_moves_the_width_to_a_multiple_and_reports_the_achieved_sparsity():
    params = _mha_params(30, 576, 1536, 3, 9)
    exact = balance_budget(params, 30, 1536, 0.267, rounding=WidthRounding.NONE)
    rounded = balance_budget(params, 30, 1536, 0.267, rounding=WidthRounding.M256)
    assert rounded.ffn_kept % 256 == 0 and rounded.ffn_kept_unrounded == exact.ffn_kept
    assert abs(rounded.ffn_kept - exact.ffn_kept) <= 128
    assert (rounded.sparsity > exact.sparsity) == (rounded.ffn_kept < exact.ffn_kept)


def test_attention_modules_take_up_what_rounding_the_width_up_left_of_the_target():
    """SmolLM2-135M's shape at 33 %: K = 911 rounds up to 1024, and seven more attention modules than the rule's
    three bring the sparsity to the target; without filling it stops at 27.5 %. K rounded down keeps the rule's N_A."""
    params = _mha_params(30, 576, 1536, 3, 9)
    filled = balance_budget(params, 30, 1536, 0.33)
    rule = balance_budget(params, 30, 1536, 0.33, fill_rounding=False)
    assert (filled.ffn_kept, filled.ffn_kept_unrounded) == (rule.ffn_kept, rule.ffn_kept_unrounded) == (1024, 911)
    assert (rule.attention_modules, filled.attention_modules) == (3, 10)
    assert rule.sparsity == pytest.approx(0.275, abs=1e-3)
    assert abs(filled.sparsity - 0.33) < 0.5 * params.attention / params.main
    rounded_down = balance_budget(params, 30, 1536, 0.25)
    assert rounded_down.ffn_kept < rounded_down.ffn_kept_unrounded
    assert rounded_down == balance_budget(params, 30, 1536, 0.25, fill_rounding=False)
    assert balance_budget(params, 30, 1536, 0.33, stage=TwoSspStage.WIDTH).attention_modules == 0


def test_unreachable_targets_are_one_clear_error():
    params = _mha_params(30, 576, 1536, 3, 9)
    with pytest.raises(UserInputError, match="sparsity"):
        balance_budget(params, 30, 1536, 1.2)
    with pytest.raises(UserInputError, match="first block keeps its attention"):
        balance_budget(params, 30, 1536, 0.5, stage=TwoSspStage.ATTENTION)
    # Attention alone: the whole target from attention modules; width alone: no attention removed.
    assert balance_budget(params, 30, 1536, 0.1, stage=TwoSspStage.ATTENTION).ffn_kept == 1536
    assert balance_budget(params, 30, 1536, 0.1, stage=TwoSspStage.WIDTH).attention_modules == 0


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_block_parameters_count_the_real_modules(arch):
    model = build_tiny_model(arch, num_layers=3)
    params = block_parameters(model)
    layer = decoder_layers(model)[0]
    assert params.attention == sum(p.numel() for p in layer.self_attn.parameters())
    assert params.main == sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters())
    assert params.main > 3 * (params.attention + params.ffn)  # the norms count too


def test_neuron_scores_are_the_mean_sequence_norm_at_the_input_of_down_proj():
    model = build_tiny_model("llama", num_layers=2)
    blocks = _blocks(3)
    scores = ffn_neuron_scores(model, blocks, batch_size=2)
    captured = []
    mlp = decoder_layers(model)[1].mlp
    handle = mlp.down_proj.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        model(input_ids=blocks, use_cache=False)
    handle.remove()
    expected = captured[0].norm(dim=1).mean(dim=0)
    assert torch.allclose(scores[1], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_width_surgery_equals_masking_the_dropped_neurons(arch):
    model = build_tiny_model(arch, num_layers=3)
    width = ffn_width(model)
    keep = [sorted(torch.randperm(width, generator=torch.Generator().manual_seed(i))[: width // 2].tolist())
            for i in range(3)]
    masks = []
    for layer, kept in zip(decoder_layers(model), keep, strict=True):
        mask = torch.zeros(width)
        mask[kept] = 1.0
        masks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda _m, a, m=mask: (a[0] * m,)))
    ids = _blocks(2)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    for handle in masks:
        handle.remove()
    pruned = keep_ffn_neurons(model, keep)
    with torch.no_grad():
        logits = pruned(input_ids=ids).logits
    assert torch.allclose(logits, masked, atol=1e-5)
    assert pruned.config.intermediate_size == width // 2 and ffn_width(model) == width  # the input is untouched
    assert all(layer.mlp.gate_proj.weight.shape[0] == width // 2 for layer in decoder_layers(pruned))


def test_width_surgery_round_trips_through_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model("qwen2", num_layers=2)
    pruned = keep_ffn_neurons(model, top_neurons(ffn_neuron_scores(model, _blocks(), 2), k=32))
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _blocks(1)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=1e-5)
    assert reloaded.config.intermediate_size == 32


def test_width_surgery_refuses_uneven_or_bad_indices():
    model = build_tiny_model("llama", num_layers=2)
    with pytest.raises(UserInputError, match="same number"):
        keep_ffn_neurons(model, [[0, 1], [0]])
    with pytest.raises(UserInputError, match="distinct"):
        keep_ffn_neurons(model, [[0, 0], [0, 1]])
    with pytest.raises(UserInputError, match="cannot keep"):
        top_neurons([torch.ones(4)], k=5)


def test_top_neurons_keeps_the_highest_scores():
    assert top_neurons([torch.tensor([0.1, 3.0, 2.0, 0.5])], k=2) == [[1, 2]]


def test_skipping_an_attention_equals_zeroing_its_output_projection():
    model = build_tiny_model("llama", num_layers=3)
    ids = _blocks(2)
    with torch.no_grad(), attention_skipped(model, [1]):
        skipped = model(input_ids=ids).logits
    layer = decoder_layers(model)[1]
    saved = layer.self_attn.o_proj.weight.detach().clone()
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        zeroed = model(input_ids=ids).logits
        layer.self_attn.o_proj.weight.copy_(saved)
        full = model(input_ids=ids).logits
    assert torch.allclose(skipped, zeroed, atol=1e-5)
    assert not torch.allclose(skipped, full, atol=1e-3)


def test_greedy_attention_search_picks_the_cheapest_removal_each_round():
    model = build_tiny_model("llama", num_layers=4)
    blocks = _blocks(2)
    search = greedy_attention_removal(model, blocks, count=2, candidates=[1, 2, 3], batch_size=2)
    assert len(search.removed) == 2 and 0 not in search.removed
    first = search.perplexities[0]
    assert search.removed[0] == int(min(first, key=first.get))
    # The recorded perplexity is that of the model with that attention removed, run whole.
    chosen = search.removed[0]
    with torch.no_grad(), attention_skipped(model, [chosen]):
        logits = model(input_ids=blocks).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    assert first[str(chosen)] == pytest.approx(float(nll.exp()), rel=1e-4)
    assert set(search.perplexities[1]) == {str(c) for c in (1, 2, 3) if c != chosen}
