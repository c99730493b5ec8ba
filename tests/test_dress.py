"""DReSS: the group penalty and its proximal step, regularization, resume, and the prune stage (tiny models)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import CALIB_FILE, build_tiny_model
from test_cli import _assert_user_error, run_cli

from slimllm.core.errors import UserInputError
from slimllm.models.architectures import decoder_layers
from slimllm.pruning.methods.dress import (
    DressSettings,
    NeuronScore,
    RegSchedule,
    group_norms,
    group_penalty,
    kept_width,
    neuron_scores,
    regularize,
    shrink_groups,
    shrink_per_step,
)
from slimllm.pruning.methods.trsp import RegNorm
from slimllm.pruning.methods.two_ssp import WidthRounding
from slimllm.pruning.width import keep_ffn_neurons
from slimllm.recovery.training import TrainingCheckpoints

IDS = torch.randint(3, 49152, (2, 16), generator=torch.Generator().manual_seed(5))


def _blocks(n: int = 8, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 49152, (n, length), generator=torch.Generator().manual_seed(3))


def _selection(model, count: int = 32) -> list[list[int]]:
    return [list(range(i % 3, 128, 4))[:count] for i in range(len(decoder_layers(model)))]


def _complement(selected: list[list[int]], width: int = 128) -> list[list[int]]:
    return [sorted(set(range(width)) - set(s)) for s in selected]


def test_group_penalty_by_hand():
    model = build_tiny_model("llama", num_layers=2)
    selected = [[1, 5], [7]]
    reference = group_norms(model)
    assert group_penalty(model, selected, reference) == pytest.approx(3.0)
    mlp = decoder_layers(model)[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[5] *= 0.5
        mlp.up_proj.weight[5] *= 0.5
        mlp.down_proj.weight[:, 5] *= 0.5
        mlp.gate_proj.weight[1, 0] += 3.0
    gate, up, down = mlp.gate_proj.weight[1], mlp.up_proj.weight[1], mlp.down_proj.weight[:, 1]
    by_hand_l2 = torch.cat([gate, up, down]).detach().norm() / reference[0][1]
    assert group_penalty(model, selected, reference) == pytest.approx(float(by_hand_l2) + 0.5 + 1.0, rel=1e-5)
    reference_l1 = group_norms(build_tiny_model("llama", num_layers=2), RegNorm.L1)
    by_hand_l1 = torch.cat([gate, up, down]).detach().abs().sum() / reference_l1[0][1]
    assert group_penalty(model, selected, reference_l1, RegNorm.L1) == pytest.approx(float(by_hand_l1) + 1.5, rel=1e-5)


@pytest.mark.parametrize("norm", [RegNorm.L2, RegNorm.L1])
def test_the_proximal_step_shrinks_only_the_selected_groups_and_stops_at_zero(norm):
    model = build_tiny_model("llama", num_layers=2)
    selected = [[0, 3], [2]]
    reference = group_norms(model, norm)
    untouched = copy.deepcopy(model)
    shrink_groups(model, selected, reference, 0.25, norm)
    now = group_norms(model, norm)
    if norm is RegNorm.L2:  # the group keeps its direction and loses a quarter of its starting norm
        assert float(now[0][3]) == pytest.approx(0.75 * float(reference[0][3]), rel=1e-5)
    else:  # each weight moves toward zero by the same amount, so the sum drops by at most a quarter
        assert reference[0][3] * 0.75 - 1e-4 <= now[0][3] < reference[0][3]
    others = [i for i in range(128) if i not in (0, 3)]
    torch.testing.assert_close(now[0][others], reference[0][others])
    torch.testing.assert_close(decoder_layers(model)[0].self_attn.q_proj.weight,
                               decoder_layers(untouched)[0].self_attn.q_proj.weight)
    shrink_groups(model, selected, reference, 5.0, norm)
    assert float(group_norms(model, norm)[1][2]) == 0.0


def test_schedules_spread_lambda_over_the_steps():
    ramp = shrink_per_step(DressSettings(reg_lambda=1.5, schedule=RegSchedule.RAMP), 4)
    assert sum(ramp) == pytest.approx(1.5) and ramp == sorted(ramp) and ramp[0] == pytest.approx(0.15)
    assert shrink_per_step(DressSettings(reg_lambda=1.0, schedule=RegSchedule.CONSTANT), 4) == [0.25] * 4


def test_regularized_neurons_are_near_zero_and_their_removal_costs_less():
    """After a strong penalty the selected neurons hold little: removing them moves the logits less than removing
    the same neurons from the untrained model."""
    blocks = _blocks()
    dense = build_tiny_model("llama", num_layers=3)
    model = copy.deepcopy(dense)
    selected = _selection(model)
    settings = DressSettings(reg_lambda=3.0, reg_tokens=8 * 16 * 2, lr=1e-3, distill=1.0)
    info = regularize(model, blocks, selected, settings, batch_size=2)
    assert info.steps == 8 and info.training_tokens == 8 * 2 * 16
    assert info.selected_norm_after < 1e-6 and info.share_after < 1e-6 < info.share_before
    keep = _complement(selected)
    with torch.no_grad():
        cost_trained = (keep_ffn_neurons(model, keep)(IDS).logits - model(IDS).logits).abs().mean()
        cost_untrained = (keep_ffn_neurons(dense, keep)(IDS).logits - dense(IDS).logits).abs().mean()
    assert cost_trained < 1e-4 < cost_untrained


class _Interrupt(Exception):
    pass


def test_resume_equals_an_uninterrupted_run(tmp_path):
    blocks = _blocks()
    settings = DressSettings(reg_lambda=1.0, reg_tokens=6 * 2 * 16, save_every=2)
    reference = build_tiny_model("llama", num_layers=3)
    selected = _selection(reference)
    reference_info = regularize(reference, blocks, selected, settings, batch_size=2)

    def stop(done, total, **_):
        if done == 3:
            raise _Interrupt

    checkpoints = TrainingCheckpoints(tmp_path / "work", "same-run", "DReSS")
    with pytest.raises(_Interrupt):
        regularize(build_tiny_model("llama", num_layers=3), blocks, selected, settings, 2, 0, checkpoints,
                   progress=stop)
    resumed = build_tiny_model("llama", num_layers=3)
    info = regularize(resumed, blocks, selected, settings, 2, 0, checkpoints, resume=True)
    assert info.resumed_from_step == 2
    assert info.losses == pytest.approx(reference_info.losses)
    with torch.no_grad():
        torch.testing.assert_close(resumed(IDS).logits, reference(IDS).logits)


def test_scores_choose_what_they_say():
    model = build_tiny_model("llama", num_layers=2)
    magnitude = neuron_scores(model, NeuronScore.MAGNITUDE, _blocks(), 2, seed=0)
    torch.testing.assert_close(magnitude[1], group_norms(model)[1])
    first, again = (neuron_scores(model, NeuronScore.RANDOM, _blocks(), 2, seed=s) for s in (0, 0))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(neuron_scores(model, NeuronScore.RANDOM, _blocks(), 2, seed=1)[0], first[0])


def test_kept_width_rounds_and_refuses_targets_that_keep_nothing_or_remove_nothing():
    assert kept_width(1536, 0.25, WidthRounding.M64) == 1152
    assert kept_width(1536, 0.5, WidthRounding.M256) == 768
    with pytest.raises(UserInputError, match="leaves no FFN neuron"):
        kept_width(1536, 0.95, WidthRounding.M256)
    with pytest.raises(UserInputError, match="removes no FFN neuron"):
        kept_width(1000, 0.05, WidthRounding.M256)


def test_dress_prune_writes_a_standard_checkpoint_with_its_record(tiny_model_dir, tmp_path):
    """`--sparsity` (a flag 2SSP shares) reaches DReSS; the output is the original architecture, narrower."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "p"
    result = run_cli("prune", str(tiny_model_dir("llama")), "--method", "dress", "--sparsity", "0.5",
                     "--width-multiple", "none", "--reg-tokens", "128", "--reg-norm", "l1", "--calib",
                     str(CALIB_FILE), "--calib-blocks", "4", "--block-len", "32", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "FFN width 128 -> 64" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["intermediate_size"] == 64
    record = json.loads((out / "slimllm_pruning.json").read_text())
    details = record["details"]
    assert details["steps"] == 2 and details["training_tokens"] == 128
    assert details["dress_settings"]["reg_norm"] == "l1" and details["achieved_width_sparsity"] == 0.5
    assert len(details["removed_neurons"]["0"]) == 64 and details["share_after"] < details["share_before"]
    assert record["removed_layers"] == []
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(IDS[:, :8]).logits.shape[-1] == config["vocab_size"]


def test_dress_bad_input_is_one_line(tiny_model_dir, tmp_path):
    source = str(tiny_model_dir("llama"))
    _assert_user_error(run_cli("prune", source, "--method", "dress", "--sparsity", "0.99", "--calib",
                               str(CALIB_FILE), "--out", str(tmp_path / "a")), "leaves no FFN neuron")
    _assert_user_error(run_cli("prune", source, "--method", "dress", "--lr", "0", "--calib", str(CALIB_FILE),
                               "--out", str(tmp_path / "b")), "--lr must be positive")
    _assert_user_error(run_cli("prune", source, "--method", "dress", "--remove", "2", "--calib", str(CALIB_FILE),
                               "--out", str(tmp_path / "c")), "drop --remove")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_healing_trains_a_model_an_earlier_stage_left_frozen():
    """DReSS (like healing itself) leaves its weights frozen; the recovery fine-tune must still train every one."""
    from slimllm.recovery.healing import HealSettings, heal_model

    model = build_tiny_model("llama", num_layers=2)
    regularize(model, _blocks(), _selection(model), DressSettings(reg_tokens=32), batch_size=2)
    assert not any(p.requires_grad for p in model.parameters())
    before = decoder_layers(model)[1].mlp.up_proj.weight.clone()
    healed, result = heal_model(model, _blocks(), HealSettings(tokens=64, block_len=16, distill=0.0))
    assert result.trainable_params == sum(p.numel() for p in healed.parameters())
    assert not torch.equal(decoder_layers(healed)[1].mlp.up_proj.weight, before)
