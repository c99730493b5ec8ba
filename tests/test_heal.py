"""Healing (`slimllm heal`, the compile `heal` stage): the loss, LoRA merging, resume, precision and bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from slimllm.pruning.surgery import remove_layers
from slimllm.recovery.healing import (
    HealScope,
    HealSettings,
    add_lora_adapters,
    heal_model,
    layers_next_to_cuts,
    merge_lora_adapters,
)
from slimllm.recovery.training import distillation_kl


def _blocks(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(3, 2000, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def teacher_and_student(tiny_model_dir):
    from slimllm.models.loading import load_model

    teacher = load_model(str(tiny_model_dir("llama")), device="cpu", for_training=True).model
    student, _ = remove_layers(copy.deepcopy(teacher), [2, 3])
    return teacher.eval(), student


def _kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(distillation_kl(student(ids).logits, teacher(ids).logits))


def _settings(**overrides) -> HealSettings:
    values = dict(tokens=8 * 32, block_len=32, batch_size=2, lr=3e-3, distill=1.0)
    return HealSettings(**(values | overrides))


def test_healing_with_kl_lowers_the_kl_to_the_teacher(teacher_and_student):
    """A random tiny model's CE gradient is noise (uniform predictions), so the KL term is weighted up here."""
    teacher, student = teacher_and_student
    blocks = _blocks()
    before = _kl(student, teacher, blocks)
    healed, result = heal_model(student, blocks, _settings(distill=100.0, lr=1e-3), teacher)
    assert result.steps == 4 and result.tokens == 256 and len(result.kl) == 4
    assert _kl(healed, teacher, blocks) < 0.8 * before


def test_lora_merged_checkpoint_equals_the_unmerged_model_and_reloads(teacher_and_student, tmp_path):
    from transformers import AutoModelForCausalLM

    _, student = teacher_and_student
    adapted = add_lora_adapters(student, _settings(scope="lora", lora_rank=4))
    with torch.no_grad():  # LoRA's B starts at zero; give the adapters a non-zero update to merge
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ids = _blocks(2)
    with torch.no_grad():
        unmerged = adapted(ids).logits
        merged = merge_lora_adapters(adapted)
        assert type(merged).__name__ == "LlamaForCausalLM"
        assert not any("lora" in name for name, _ in merged.named_parameters())
        assert torch.allclose(merged(ids).logits, unmerged, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, unmerged, atol=1e-4)


def test_lora_healing_trains_only_adapters_and_returns_a_plain_model(teacher_and_student):
    teacher, student = teacher_and_student
    embed_before = student.model.embed_tokens.weight.detach().clone()
    healed, result = heal_model(student, _blocks(), _settings(scope="lora", lora_rank=4), teacher)
    assert result.scope == "lora" and 0 < result.trainable_params < 20_000
    assert not any("lora" in name for name, _ in healed.named_parameters())
    assert torch.equal(healed.model.embed_tokens.weight, embed_before)


def test_resume_reaches_the_weights_of_an_uninterrupted_run(teacher_and_student, tmp_path):
    teacher, student = teacher_and_student
    settings = _settings(save_every=2)
    uninterrupted, _ = heal_model(copy.deepcopy(student), _blocks(), settings, teacher)

    def stop_after_three(done, total, **_):
        if done == 3:
            raise KeyboardInterrupt

    interrupted = copy.deepcopy(student)
    with pytest.raises(KeyboardInterrupt):
        heal_model(interrupted, _blocks(), settings, teacher, stop_after_three, tmp_path / "work", state_key="k")
    assert (tmp_path / "work" / "state.pt").is_file()
    resumed, result = heal_model(copy.deepcopy(student), _blocks(), settings, teacher, None, tmp_path / "work",
                                 resume=True, state_key="k")
    assert result.resumed_from_step == 2 and len(result.losses) == 4
    for (name, a), (_, b) in zip(resumed.named_parameters(), uninterrupted.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_layers_next_to_cuts_are_the_kept_neighbours_of_every_removed_run():
    # SmolLM2's demo cut: 3, 12-15, 17, 25-26 removed from 30 layers
    kept = [i for i in range(30) if i not in (3, 12, 13, 14, 15, 17, 25, 26)]
    assert [kept[i] for i in layers_next_to_cuts(kept, 30)] == [2, 4, 11, 16, 18, 24, 27]
    assert layers_next_to_cuts([0, 1, 2], 4) == [2]  # the last layer removed: its predecessor
    assert layers_next_to_cuts([1, 2, 3], 4) == [0]
    assert layers_next_to_cuts([0, 1, 2], 3) == []


def test_cuts_scope_trains_only_the_layers_next_to_the_cuts_and_the_final_norm(teacher_and_student):
    from slimllm.core.errors import UserInputError

    teacher, student = teacher_and_student  # layers 2 and 3 of 6 removed: kept 0, 1, 4, 5
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(UserInputError, match="--scope cuts"):
        heal_model(copy.deepcopy(student), _blocks(), _settings(scope="cuts"), teacher)
    healed, result = heal_model(student, _blocks(), _settings(scope="cuts"), teacher,
                                trainable_layers=layers_next_to_cuts([0, 1, 4, 5], 6))
    changed = {name for name, value in healed.state_dict().items() if not torch.equal(value, before[name])}
    assert changed and all(name.startswith(("model.layers.1.", "model.layers.2.", "model.norm.")) for name in changed)
    assert any(name.startswith("model.layers.1.") for name in changed)
    assert any(name.startswith("model.layers.2.") for name in changed) and "model.norm.weight" in changed
    layer = sum(p.numel() for p in healed.model.layers[1].parameters())
    assert result.trainable_params == 2 * layer + healed.model.norm.weight.numel()


def test_weights_loaded_in_bf16_keep_fp32_master_copies_that_change(tiny_model_dir):
    """--dtype bf16 on CPU: the trainer computes under bf16 autocast but updates fp32 master weights, so updates far
    below bf16's resolution (2^-8 relative) still land; stored in bf16 they would round away."""
    from slimllm.core.device import autocast_dtype
    from slimllm.models.loading import load_model

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu", dtype="bf16", for_training=True)
    model = loaded.model
    assert autocast_dtype(model) == torch.bfloat16
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    healed, _ = heal_model(model, _blocks(), _settings(lr=1e-5, distill=0.0))
    weight = dict(healed.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    start = before["model.layers.0.mlp.down_proj.weight"]
    assert weight.dtype == torch.float32
    change = (weight - start).abs()
    assert bool((change > 0).any())
    tiny = change[change > 0] < start.abs()[change > 0] * 2**-9
    assert tiny.float().mean() > 0.5  # most updates are smaller than half a bf16 step
    rounded = (weight.to(torch.bfloat16) != start.to(torch.bfloat16)).float().mean()
    assert rounded < (change > 0).float().mean()


@pytest.mark.gpu
def test_cuda_bf16_healing_changes_fp32_master_weights(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: bf16 autocast over fp32 master weights is the CUDA training path")
    from slimllm.models.loading import load_model

    loaded = load_model(str(tiny_model_dir("llama")), device="cuda", for_training=True)
    start = loaded.model.model.layers[0].mlp.down_proj.weight.detach().clone()
    healed, result = heal_model(loaded.model, _blocks(), _settings(lr=1e-5, distill=0.0))
    weight = healed.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.float32 and not torch.equal(weight, start)
    assert result.peak_memory_gib is not None


def test_fp16_compute_scales_the_loss_and_bf16_does_not(tiny_model_dir):
    from slimllm.core.device import set_compute_dtype
    from slimllm.models.loading import load_model
    from slimllm.recovery.training import MixedPrecisionStepper

    model = load_model(str(tiny_model_dir("llama")), device="cpu", for_training=True).model
    optimizer = torch.optim.AdamW(model.parameters())
    set_compute_dtype(model, torch.float16)
    assert MixedPrecisionStepper(model, optimizer).enabled
    set_compute_dtype(model, torch.bfloat16)
    assert not MixedPrecisionStepper(model, optimizer).enabled


def test_settings_refuse_an_empty_budget():
    from slimllm.core.errors import UserInputError

    with pytest.raises(UserInputError, match="--tokens"):
        HealSettings(tokens=0)
    assert HealSettings(tokens=1025, block_len=512, batch_size=2).steps == 2
    assert HealSettings(scope="lora").learning_rate > HealSettings().learning_rate
    assert HealSettings(scope="lora").scope is HealScope.LORA


@pytest.fixture
def pruned_dir(tiny_model_dir, tmp_path_factory, text_file):
    from slimllm.pruning.settings import PruneSettings
    from slimllm.pruning.stage import run_prune

    out = tmp_path_factory.mktemp("pruned") / "pruned"
    # A text file to calibrate the repair on: the default, text the tiny model writes itself, takes 20 s.
    run_prune(str(tiny_model_dir("llama")), PruneSettings(method="last", remove=2, calib=str(text_file)), out,
              device="cpu")
    return out


def test_resume_is_keyed_by_the_checkpoints_content_not_its_path(pruned_dir, tiny_model_dir, tmp_path, text_file):
    """A rerun of pruning rewrites the same directory with other weights: the old healing state must not be restored
    into it. `slimllm heal --resume` refuses it; compile (restart_stale) starts healing again."""
    import shutil

    from slimllm.core.errors import UserInputError
    from slimllm.pruning.settings import PruneSettings
    from slimllm.pruning.stage import run_prune
    from slimllm.recovery.healing import run_heal

    checkpoint = tmp_path / "pruned"
    shutil.copytree(pruned_dir, checkpoint)
    settings = _settings(calib=str(text_file), save_every=1, distill=0.0)
    out = tmp_path / "healed"

    def stop_after_two(done, total, **_):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_heal(checkpoint, settings, out, device="cpu", progress=stop_after_two)
    rewritten = PruneSettings(method="last", remove=3, calib=str(text_file))
    run_prune(str(tiny_model_dir("llama")), rewritten, checkpoint, device="cpu", force=True)
    with pytest.raises(UserInputError, match="other settings, calibration data or model"):
        run_heal(checkpoint, settings, out, device="cpu", resume=True)
    result = run_heal(checkpoint, settings, out, device="cpu", resume=True, restart_stale=True)
    assert result.resumed_from_step == 0 and len(result.losses) == settings.steps


def test_heal_command_writes_a_plain_checkpoint_with_both_records(pruned_dir, tmp_path, text_file):
    from test_cli import run_cli
    from transformers import AutoModelForCausalLM

    out = tmp_path / "healed"
    result = run_cli("heal", str(pruned_dir), "--calib", str(text_file), "--tokens", "128", "--block-len", "32",
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "slimllm_healing.json").read_text())
    assert record["teacher"] == json.loads((pruned_dir / "slimllm_pruning.json").read_text())["source_model"]
    assert record["result"]["tokens"] == 128 and len(record["result"]["kl"]) == 2
    assert (out / "slimllm_pruning.json").is_file() and not (tmp_path / "healed.partial").exists()
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_hidden_layers == 4


def test_heal_command_with_cuts_scope_reads_the_cuts_from_the_pruning_record(pruned_dir, tmp_path, text_file):
    from test_cli import run_cli
    from transformers import AutoModelForCausalLM

    record = json.loads((pruned_dir / "slimllm_pruning.json").read_text())
    near = layers_next_to_cuts(record["kept_layers"], record["original_num_layers"])
    assert near and len(near) < len(record["kept_layers"])
    out = tmp_path / "healed"
    result = run_cli("heal", str(pruned_dir), "--calib", str(text_file), "--tokens", "128", "--block-len", "32",
                     "--scope", "cuts", "--lr", "1e-2", "--out", str(out))
    assert result.exit_code == 0, result.output
    before = AutoModelForCausalLM.from_pretrained(str(pruned_dir)).state_dict()
    after = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    trained = {name.split(".")[2] for name in changed if name.startswith("model.layers.")}
    assert trained == {str(i) for i in near}
    assert all(name.startswith(("model.layers.", "model.norm.")) for name in changed)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokens", "0"], "--tokens must be a positive"),
        (["--scope", "half"], "--scope"),
    ],
)
def test_heal_bad_settings_are_one_line_and_exit_2(pruned_dir, tmp_path, text_file, args, message):
    from test_cli import run_cli

    result = run_cli("heal", str(pruned_dir), "--calib", str(text_file), "--out", str(tmp_path / "h"), *args)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "h").exists()


def test_heal_missing_checkpoint_is_a_user_error(tmp_path, text_file):
    from test_cli import run_cli

    result = run_cli("heal", str(tmp_path / "nowhere"), "--calib", str(text_file), "--out", str(tmp_path / "h"))
    assert result.exit_code == 2 and "does not exist" in result.output


def test_heal_refuses_a_teacher_with_another_tokenizer(pruned_dir, tmp_path, text_file, tiny_model_dir):
    import shutil

    from test_cli import run_cli
    from transformers import AutoTokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir("llama"), teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens(["<a-token-the-student-lacks>"])
    tokenizer.save_pretrained(teacher)
    result = run_cli("heal", str(pruned_dir), "--teacher", str(teacher), "--calib", str(text_file),
                     "--out", str(tmp_path / "h"))
    assert result.exit_code == 2 and "another tokenizer" in result.output
    assert not (tmp_path / "h").exists()


def test_heal_refuses_a_teacher_with_another_vocabulary(pruned_dir, tmp_path, text_file, tiny_model_dir):
    from test_cli import run_cli
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = tmp_path / "teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    model.resize_token_embeddings(1000)
    model.save_pretrained(teacher)
    AutoTokenizer.from_pretrained(tiny_model_dir("llama")).save_pretrained(teacher)
    result = run_cli("heal", str(pruned_dir), "--teacher", str(teacher), "--calib", str(text_file),
                     "--out", str(tmp_path / "h"))
    assert result.exit_code == 2 and "predicts 1000 tokens" in result.output


@pytest.mark.slow
def test_compile_heals_before_exporting(tiny_model_dir, tmp_path, text_file):
    from conftest import EVAL_FILE
    from test_cli import run_cli

    out = tmp_path / "run"
    args = ["compile", str(tiny_model_dir("llama")), "--method", "last", "--remove", "2", "--calib", str(text_file),
            "--heal-tokens", "128", "--eval-data", str(EVAL_FILE), "--eval-seq-len", "32", "--eval-windows", "1",
            "--eval-task", "none", "--target", "onnx", "--profile", "none", "--out", str(out)]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run_stages"][:3] == ["prune", "heal", "export_onnx"]
    assert manifest["stages"]["heal"]["result"]["tokens"] >= 128 and (out / "healed" / "slimllm_healing.json").is_file()
    assert "healed (full)" in result.output
    again = run_cli(*args)
    assert again.exit_code == 0 and "reused finished stages: prune, heal, export_onnx" in again.output
