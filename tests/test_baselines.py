"""Baseline selection methods on tiny models: determinism, protection, and a constructed removable layer."""

import pytest
import torch
from conftest import IDENTITY_LAYER, TINY_ARCHITECTURES, build_tiny_model

from slimllm.core.errors import UserInputError
from slimllm.evaluation.perplexity import causal_lm_loss_sum
from slimllm.models.architectures import decoder_layers
from slimllm.pruning.candidates import candidate_layers, check_removable, layers_to_remove
from slimllm.pruning.choices import BASELINE_METHODS, PruneMethod
from slimllm.pruning.methods.baselines import select_layers
from slimllm.pruning.surgery import remove_layers

SCORE_METHODS = (PruneMethod.SHORTGPT, PruneMethod.ANGULAR, PruneMethod.SLEB)


def _blocks(seed: int = 0, n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(3, 49152, (n, length), generator=torch.Generator().manual_seed(seed))


def _loss(model, blocks) -> float:
    with torch.no_grad():
        total, count = causal_lm_loss_sum(model(blocks).logits, blocks)
    return total / count


@pytest.mark.parametrize("method", SCORE_METHODS)
def test_identity_layer_is_chosen_first(model_with_identity_layer, method):
    model, blocks = model_with_identity_layer
    selection = select_layers(model, method, 1, blocks, candidate_layers(5, 0, 1), batch_size=4)
    assert selection.removed_layers == [IDENTITY_LAYER]
    # Removing it leaves the loss exactly as it was; removing any other layer costs measurably more.
    dense_loss = _loss(model, blocks)
    chosen_loss = _loss(remove_layers(model, [IDENTITY_LAYER])[0], blocks)
    assert chosen_loss == pytest.approx(dense_loss, abs=1e-5)
    for other in (0, 1, 3):
        assert _loss(remove_layers(model, [other])[0], blocks) > chosen_loss + 1e-3


def test_shortgpt_scores_identity_as_zero_influence(model_with_identity_layer):
    model, blocks = model_with_identity_layer
    scores = select_layers(model, PruneMethod.SHORTGPT, 1, blocks, range(4), batch_size=4).scores
    assert scores[str(IDENTITY_LAYER)] == pytest.approx(0.0, abs=1e-6)
    assert min(v for k, v in scores.items() if k != str(IDENTITY_LAYER)) > 1e-4


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_methods_are_deterministic_and_respect_protection(arch_name, method):
    model = build_tiny_model(arch_name, num_layers=6)
    candidates = candidate_layers(6, protect_first=1, protect_last=1)
    first = select_layers(model, method, 2, _blocks(), candidates, batch_size=2, seed=5)
    second = select_layers(model, method, 2, _blocks(), candidates, batch_size=2, seed=5)
    assert first.removed_layers == second.removed_layers
    assert len(first.removed_layers) == 2 and set(first.removed_layers) <= set(candidates)


def test_last_and_random():
    model = build_tiny_model("llama", num_layers=6)
    assert select_layers(model, PruneMethod.LAST, 2, None, candidate_layers(6, 0, 1)).removed_layers == [3, 4]
    draws = {
        tuple(select_layers(model, PruneMethod.RANDOM, 2, None, range(6), seed=s).removed_layers) for s in range(6)
    }
    assert len(draws) > 1


def test_sleb_records_greedy_order(model_with_identity_layer):
    model, blocks = model_with_identity_layer
    selection = select_layers(model, PruneMethod.SLEB, 2, blocks, range(4), batch_size=4)
    order = selection.details["removal_order"]
    assert order[0] == IDENTITY_LAYER and sorted(order) == selection.removed_layers
    first_step = selection.details["step_losses"][0]
    assert min(first_step, key=first_step.get) == str(IDENTITY_LAYER)


@pytest.mark.parametrize(
    ("remove", "ratio", "message"),
    [
        (None, None, "exactly one"),
        (2, 0.5, "exactly one"),
        (-1, None, "positive"),
        (0, None, "positive"),
        (None, 1.0, "between 0 and 1"),
        (None, 0.0, "between 0 and 1"),
        (None, 0.01, "rounds to 0"),
    ],
)
def test_bad_k(remove, ratio, message):
    with pytest.raises(UserInputError, match=message):
        layers_to_remove(30, remove, ratio)


def test_ratio_rounds_to_layers():
    assert layers_to_remove(32, None, 0.25) == 8
    assert layers_to_remove(30, None, 0.25) == 8


def test_k_must_leave_a_candidate():
    candidates = candidate_layers(6, 2, 2)
    assert candidates == [2, 3]
    with pytest.raises(UserInputError, match="only 2 are candidates"):
        check_removable(6, 2, candidates)
    with pytest.raises(UserInputError, match=">= 0"):
        candidate_layers(6, -1, 0)


def test_angular_needs_a_contiguous_run():
    model = build_tiny_model("llama", num_layers=6)
    with pytest.raises(UserInputError, match="consecutive"):
        select_layers(model, PruneMethod.ANGULAR, 3, _blocks(), [0, 1, 3, 4], batch_size=2)


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
def test_block_by_block_scores_equal_whole_model_passes(arch_name):
    """ShortGPT, angular and the FFN-neuron scores run one layer at a time over all calibration blocks; they must
    equal what whole-model passes that keep every layer's stream give."""
    import math

    import torch.nn.functional as F

    from slimllm.models.layer_io import trace_decoder
    from slimllm.pruning.methods.baselines import angular_distances, block_influence
    from slimllm.pruning.width import ffn_neuron_scores, ffn_of

    model = build_tiny_model(arch_name, num_layers=5, seed=3).eval()
    blocks = torch.randint(0, model.config.vocab_size, (5, 24), generator=torch.Generator().manual_seed(0))
    traces = [trace_decoder(model, blocks[i : i + 2]) for i in range(0, 5, 2)]
    num_layers = len(decoder_layers(model))
    cos_sums = [sum(float(F.cosine_similarity(t.stream(i), t.stream(i + 1), dim=-1).sum()) for t in traces)
                for i in range(num_layers)]
    expected_influence = [1 - c / blocks.numel() for c in cos_sums]
    assert block_influence(model, blocks, batch_size=2) == pytest.approx(expected_influence, abs=1e-6)

    last = torch.cat([torch.stack([t.stream(i)[:, -1] for i in range(num_layers + 1)], 1) for t in traces])
    expected_angular = [
        float((torch.arccos(F.cosine_similarity(last[:, s], last[:, s + 2], dim=-1).clamp(-1, 1)) / math.pi).mean())
        for s in range(num_layers - 1)
    ]
    assert angular_distances(model, blocks, 2, batch_size=2) == pytest.approx(expected_angular, abs=1e-6)

    sums = [torch.zeros(ffn_of(layer).down_proj.in_features) for layer in decoder_layers(model)]

    def hook_for(i: int):
        def hook(_module, args) -> None:
            sums[i] += args[0].norm(dim=1).sum(dim=0)

        return hook

    handles = [ffn_of(layer).down_proj.register_forward_pre_hook(hook_for(i))
               for i, layer in enumerate(decoder_layers(model))]
    with torch.no_grad():
        for i in range(0, 5, 2):
            model(input_ids=blocks[i : i + 2], use_cache=False)
    for handle in handles:
        handle.remove()
    for got, want in zip(ffn_neuron_scores(model, blocks, batch_size=2), sums, strict=True):
        torch.testing.assert_close(got, want / 5, rtol=1e-5, atol=1e-6)


def test_the_output_aware_greedy_removes_the_layer_that_changes_no_prediction_first(model_with_identity_layer):
    model, blocks = model_with_identity_layer
    selection = select_layers(model, PruneMethod("sleb-kl"), 2, blocks, range(4), batch_size=4)
    order, first_step = selection.details["removal_order"], selection.details["step_kl"][0]
    assert order[0] == IDENTITY_LAYER and sorted(order) == selection.removed_layers
    # Removing the identity layer leaves every prediction as it was (KL 0 up to the stored top-k's fp16 rounding);
    # any other layer moves them.
    assert first_step[str(IDENTITY_LAYER)] == pytest.approx(0.0, abs=1e-3)
    assert min(v for k, v in first_step.items() if k != str(IDENTITY_LAYER)) > 1e-2
