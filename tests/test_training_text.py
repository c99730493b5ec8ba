"""Healing's training text: the calibration text, the teacher's own samples, or a mix, and the prompts they start
from."""

from __future__ import annotations

import pytest
import torch

from slimllm.core.data import DataPurpose, load_corpus, tokenize_corpus
from slimllm.core.errors import UserInputError
from slimllm.models.loading import load_model
from slimllm.recovery.healing import HealSettings
from slimllm.recovery.training_text import TeacherText, teacher_prompts, training_text


@pytest.fixture
def writer(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLLM_CACHE_DIR", str(tmp_path / "cache"))
    return load_model(str(tiny_model_dir("llama")), device="cpu")


def _is_slice_of(block: torch.Tensor, ids: torch.Tensor) -> bool:
    n = block.numel()
    return any(torch.equal(ids[s : s + n], block) for s in range(0, ids.numel() - n + 1))


def test_a_mix_cuts_the_given_share_of_blocks_from_the_teachers_samples(writer, text_file):
    calib_ids = tokenize_corpus(load_corpus(str(text_file), DataPurpose.CALIBRATION), writer.tokenizer)
    plain = training_text(str(text_file), writer.tokenizer, 8 * 32, 32, 2, 0, None)
    assert plain.blocks.shape == (8, 32) and plain.teacher_blocks == 0
    assert all(_is_slice_of(block, calib_ids) for block in plain.blocks)
    mixed = training_text(str(text_file), writer.tokenizer, 8 * 32, 32, 2, 0, writer.model,
                          TeacherText(fraction=0.5, prompts="calibration"))
    assert mixed.blocks.shape == (8, 32) and mixed.teacher_blocks == 4
    assert all(_is_slice_of(block, calib_ids) for block in mixed.blocks[:4])
    assert not any(_is_slice_of(block, calib_ids) for block in mixed.blocks[4:])  # the teacher wrote these
    assert "teacher text (calibration prompts" in mixed.source and mixed.sha256 != plain.sha256
    again = training_text(str(text_file), writer.tokenizer, 8 * 32, 32, 2, 0, writer.model,
                          TeacherText(fraction=0.5, prompts="calibration"))
    assert torch.equal(again.blocks, mixed.blocks)  # seeded sampling, cached samples


def test_calibration_prompts_are_pieces_of_the_training_text(writer, text_file):
    calib_ids = tokenize_corpus(load_corpus(str(text_file), DataPurpose.CALIBRATION), writer.tokenizer)
    prompts = teacher_prompts(TeacherText(prompts="calibration").prompts, writer.tokenizer, calib_ids, 0)
    text = " ".join(text_file.read_text().split())
    assert len(prompts) > 32 and sum(" ".join(p.split()) in text for p in prompts) > 0.8 * len(prompts)
    assert teacher_prompts(TeacherText(prompts="none").prompts, writer.tokenizer, calib_ids, 0) == ("",)
    with pytest.raises(UserInputError, match="calibration needs a training text"):
        teacher_prompts(TeacherText(prompts="calibration").prompts, writer.tokenizer, None, 0)


@pytest.mark.parametrize("overrides, match", [
    ({"teacher_text": 1.5}, "--teacher-text"),
    ({"teacher_prompts": "wiki"}, "--teacher-prompts"),
    ({"teacher_temperature": 0.0}, "--teacher-temperature"),
    ({"lr_schedule": "step"}, "--lr-schedule"),
])
def test_bad_training_text_settings_are_refused(overrides, match):
    with pytest.raises(UserInputError, match=match):
        HealSettings(**overrides)
