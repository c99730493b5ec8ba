"""Every training loop (healing, fine-tuning, TRSP's two stages, DReSS) stops on a non-finite loss term before the
optimizer step, so that no NaN or infinity ever reaches the weights."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_model

import slimllm.recovery.training as training
from slimllm.recovery.training import TrainingDivergedError


def _blocks() -> torch.Tensor:
    return torch.randint(3, 2000, (8, 16), generator=torch.Generator().manual_seed(0))


def _heal(model, teacher):
    from slimllm.recovery.healing import HealSettings, heal_model

    heal_model(model, _blocks(), HealSettings(tokens=4 * 2 * 16, block_len=16, batch_size=2, distill=1.0), teacher)


def _fine_tune(model, teacher):
    training.fine_tune(model, _blocks(), steps=4, lr=1e-3, batch_size=2, teacher=teacher, distill=1.0)


def _trsp(model, teacher):
    from slimllm.pruning.methods.trsp import Stage2Mode, TrspSettings, run_trsp

    settings = TrspSettings(steps_per_round=2, stage2=Stage2Mode.FADE, stage2_steps=4, distill=1.0)
    run_trsp(model, _blocks(), 1, range(3), settings, batch_size=2)


def _dress(model, teacher):
    from slimllm.pruning.methods.dress import DressSettings, regularize

    selected = [list(range(16)) for _ in range(3)]
    regularize(model, _blocks(), selected, DressSettings(reg_lambda=1.0, reg_tokens=4 * 2 * 16, distill=1.0))


LOOPS = {"healing": _heal, "fine-tuning": _fine_tune, "TRSP": _trsp, "DReSS": _dress}


@pytest.mark.parametrize("term", ["CE", "KL"])
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_non_finite_loss_term_stops_training_before_the_weights_change(loop, term, monkeypatch):
    teacher = build_tiny_model("llama", num_layers=3)
    model = copy.deepcopy(teacher).train()
    if term == "CE":
        real_ce = torch.nn.functional.cross_entropy
        monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real_ce(*a, **k) * float("nan"))
    else:
        real_kl = training.distillation_kl
        monkeypatch.setattr(training, "distillation_kl", lambda *a, **k: real_kl(*a, **k) * float("inf"))
    with pytest.raises(TrainingDivergedError, match=term):
        LOOPS[loop](model, teacher)
    poisoned = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not poisoned, f"{loop}: non-finite weights after a non-finite {term}: {poisoned[:3]}"


def test_learning_rate_schedules_warm_up_then_hold_or_decay_to_a_tenth():
    from slimllm.recovery.training import FINAL_LR_FRACTION, LrSchedule, lr_multiplier

    warm = [lr_multiplier(s, 4, 20, LrSchedule.COSINE) for s in range(4)]
    assert warm == [0.25, 0.5, 0.75, 1.0]
    assert [lr_multiplier(s, 4, 20, LrSchedule.CONSTANT) for s in (4, 10, 19)] == [1.0, 1.0, 1.0]
    for schedule in (LrSchedule.COSINE, LrSchedule.LINEAR):
        decay = [lr_multiplier(s, 4, 20, schedule) for s in range(4, 20)]
        assert decay[0] == pytest.approx(1.0) and decay[-1] == pytest.approx(FINAL_LR_FRACTION)
        assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    # Cosine holds the peak longer than linear and falls faster at the end.
    assert lr_multiplier(8, 4, 20, LrSchedule.COSINE) > lr_multiplier(8, 4, 20, LrSchedule.LINEAR)
    assert lr_multiplier(17, 4, 20, LrSchedule.COSINE) < lr_multiplier(17, 4, 20, LrSchedule.LINEAR)


def test_a_decaying_schedule_drives_the_optimizer_and_resumes_where_it_stopped():
    from slimllm.recovery.training import LrSchedule, Optimization

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    optimization = Optimization(model, [optimizer], 2, "--lr", LrSchedule.LINEAR, total_steps=10)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimization.step(model(torch.ones(1, 2)).sum(), "test", {})
    state = optimization.state_dict()
    optimizer2 = torch.optim.SGD(model.parameters(), lr=1.0)
    resumed = Optimization(model, [optimizer2], 2, "--lr", LrSchedule.LINEAR, total_steps=10)
    resumed.load_state_dict(state)
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0]) and rates[3] < rates[2]
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    with pytest.raises(ValueError, match="total steps"):
        Optimization(model, [optimizer], 2, "--lr", LrSchedule.COSINE)
