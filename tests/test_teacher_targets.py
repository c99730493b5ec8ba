"""Stored teacher targets: the top-k KL against the full KL, the cache, and healing on them."""

from __future__ import annotations

import copy

import pytest
import torch

from slimllm.pruning.surgery import remove_layers
from slimllm.recovery.healing import HealSettings, heal_model
from slimllm.recovery.teacher_targets import cached_teacher_targets, compute_teacher_targets, log1mexp
from slimllm.recovery.training import distillation_kl


@pytest.fixture
def pair(tiny_model_dir):
    from slimllm.models.loading import load_model

    teacher = load_model(str(tiny_model_dir("llama")), device="cpu", for_training=True).model.eval()
    student, _ = remove_layers(copy.deepcopy(teacher), [2, 3])
    with torch.no_grad():  # a sharper teacher than random init, so that its top-k holds most of its mass
        teacher.lm_head.weight.mul_(8.0)
    blocks = torch.randint(3, 2000, (4, 24), generator=torch.Generator().manual_seed(0))
    return teacher, student, blocks


def _logits(model, blocks):
    with torch.no_grad():
        return model(blocks).logits[:, :-1].float()


def test_top_k_kl_is_the_full_kl_on_the_whole_vocabulary_and_a_close_lower_bound_below_it(pair):
    teacher, student, blocks = pair
    student_logits, rows = _logits(student, blocks), [2, 0]
    full = float(distillation_kl(student_logits[rows], _logits(teacher, blocks)[rows]))
    whole = compute_teacher_targets(teacher, blocks, top_k=teacher.config.vocab_size)
    assert float(whole.kl(student_logits[rows], rows)) == pytest.approx(full, rel=2e-3)
    top = compute_teacher_targets(teacher, blocks, top_k=256)
    kept_mass = 1 - top.tail_log_mass.exp()
    assert top.log_probs.dtype == torch.float16 and top.indices.dtype == torch.int32 and top.indices.shape[-1] == 256
    assert 0.0 < float(kept_mass.min()) and float(kept_mass.max()) < 1.0
    bound = float(top.kl(student_logits[rows], rows))
    finer = float(compute_teacher_targets(teacher, blocks, top_k=8192).kl(student_logits[rows], rows))
    # Merging outcomes never increases a divergence: the more tokens kept, the closer to the full KL from below.
    assert 0.0 < bound < finer <= full * 1.002


def test_log1mexp_is_accurate_at_both_ends():
    x = torch.tensor([-1e-8, -0.1, -0.7, -5.0, -40.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    assert float(log1mexp(torch.tensor(0.0))) == float("-inf")


def test_the_store_is_computed_once_and_keyed_by_content(pair, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLLM_CACHE_DIR", str(tmp_path / "cache"))
    teacher, _, blocks = pair
    first = cached_teacher_targets(teacher, blocks, 32, teacher_key="teacher-a")
    again = cached_teacher_targets(teacher, blocks, 32, teacher_key="teacher-a")
    assert first.seconds > 0 and again.seconds == 0.0  # read back, not recomputed
    assert torch.equal(first.indices, again.indices) and torch.equal(first.log_probs, again.log_probs)
    assert len(list((tmp_path / "cache" / "teacher-targets").iterdir())) == 1
    other_blocks = blocks.flip(0)
    assert cached_teacher_targets(teacher, other_blocks, 32, teacher_key="teacher-a").seconds > 0
    assert cached_teacher_targets(teacher, blocks, 32, teacher_key="teacher-b").seconds > 0
    assert len(list((tmp_path / "cache" / "teacher-targets").iterdir())) == 3


def test_healing_on_stored_targets_follows_healing_with_the_teacher(pair, tmp_path, monkeypatch):
    """On the whole vocabulary the stored pass is the teacher's (to fp16 rounding): the same training, nearly the
    same weights; the store is read, not the teacher run, on every step."""
    monkeypatch.setenv("SLIMLLM_CACHE_DIR", str(tmp_path / "cache"))
    teacher, student, blocks = pair
    settings = dict(tokens=8 * 24, block_len=24, batch_size=2, lr=5e-3, distill=10.0)
    before = float(distillation_kl(_logits(student, blocks), _logits(teacher, blocks)))
    live, live_result = heal_model(copy.deepcopy(student), blocks, HealSettings(**settings), teacher)
    stored, stored_result = heal_model(copy.deepcopy(student), blocks,
                                       HealSettings(**settings, teacher_top_k=teacher.config.vocab_size), teacher)
    assert stored_result.teacher_seconds > 0 and live_result.teacher_seconds == 0
    assert stored_result.kl == pytest.approx(live_result.kl, rel=2e-2)
    after_live = float(distillation_kl(_logits(live, blocks), _logits(teacher, blocks)))
    after_stored = float(distillation_kl(_logits(stored, blocks), _logits(teacher, blocks)))
    assert after_live < 0.8 * before
    assert after_stored == pytest.approx(after_live, rel=2e-2)


def test_bad_top_k_is_refused():
    from slimllm.core.errors import UserInputError

    with pytest.raises(UserInputError, match="--teacher-top-k"):
        HealSettings(teacher_top_k=-1)
