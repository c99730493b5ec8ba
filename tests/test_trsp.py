"""TRSP on tiny models: gates, both stages, resume, recipes."""

import json

import pytest
import torch
from conftest import IDENTITY_LAYER, TINY_ARCHITECTURES, build_tiny_model
from test_cli import _assert_user_error, run_cli

from slimllm.core.errors import UserInputError
from slimllm.models.architectures import decoder_layers
from slimllm.models.checkpoints import PRUNING_RECORD_FILE
from slimllm.pipeline.recipes import build_settings, load_recipe
from slimllm.pruning.gates import GateMode, attach_gates, detach_gates
from slimllm.pruning.methods.trsp import Stage2Mode, TrspSettings, run_trsp
from slimllm.pruning.surgery import remove_layers
from slimllm.recovery.training import distillation_kl, fine_tune, frozen_teacher

IDS = torch.tensor([[7, 300, 25, 4000, 12, 9, 77, 1500]])


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
def test_delta_gate_of_zero_is_removal(arch_name):
    model = build_tiny_model(arch_name, num_layers=5)
    removed, _ = remove_layers(model, [2])
    gates = attach_gates(model, GateMode.DELTA)
    for param in gates.parameters():
        param.requires_grad_(False)
    with torch.no_grad():
        gated_on = model(IDS).logits
        gates.switch_off(2)
        gated_off = model(IDS).logits
        expected_off = removed(IDS).logits
    detach_gates(model)
    with torch.no_grad():
        dense = model(IDS).logits
    assert torch.equal(gated_off, expected_off)
    assert torch.equal(gated_on, dense)  # gates at 1 leave the function unchanged
    assert not torch.allclose(dense, expected_off)
    assert type(decoder_layers(model)[0]).__name__.endswith("DecoderLayer")


def test_gate_forms():
    model = build_tiny_model("llama", num_layers=3)
    layer = decoder_layers(model)[1]
    x = torch.randn(1, 4, 64)
    position = torch.arange(4)[None]
    rotary = model.model.rotary_emb(x, position)
    with torch.no_grad():
        y = layer(x, position_embeddings=rotary, position_ids=position)
    for mode, expected in ((GateMode.DELTA, x + 0.3 * (y - x)), (GateMode.OUTPUT, 0.3 * y)):
        gates = attach_gates(model, mode)
        gates.set_gates([1.0, 0.3, 1.0])
        with torch.no_grad():
            out = decoder_layers(model)[1](x, position_embeddings=rotary, position_ids=position)
        torch.testing.assert_close(out, expected)
        detach_gates(model)


def test_gates_stay_fp32_with_a_bf16_model():
    model = build_tiny_model("qwen3", num_layers=3).to(torch.bfloat16)
    gates = attach_gates(model)
    assert all(p.dtype == torch.float32 for p in gates.parameters())
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in gates.parameters())


@pytest.mark.gpu
def test_gates_stay_fp32_under_cuda_autocast():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: bf16 autocast is only used on CUDA")
    from slimllm.core.device import autocast

    model = build_tiny_model("llama", num_layers=3).cuda()
    gates = attach_gates(model)
    with autocast(torch.device("cuda"), torch.bfloat16):
        loss = model(IDS.cuda(), labels=IDS.cuda()).loss
    loss.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in gates.parameters())


def test_stage1_selects_the_useless_layer(model_with_identity_layer):
    import copy

    model, blocks = model_with_identity_layer
    model = copy.deepcopy(model)
    settings = TrspSettings(stage2=Stage2Mode.NONE, steps_per_round=6, gate_lr=2e-2)
    order, info = run_trsp(model, blocks, 1, range(4), settings, batch_size=4)
    assert order == [IDENTITY_LAYER]
    final_gates = info.gate_trajectory[0]
    assert final_gates[IDENTITY_LAYER] < min(final_gates[i] for i in (0, 1, 3))
    assert final_gates[IDENTITY_LAYER] < 1.0
    assert len(info.stage1_losses) == 6


def test_stage2_regularizer_shrinks_the_selected_layers():
    model = build_tiny_model("llama", num_layers=5)
    blocks = torch.randint(3, 49152, (8, 32), generator=torch.Generator().manual_seed(0))
    settings = TrspSettings(
        stage2=Stage2Mode.REGULARIZE, steps_per_round=2, stage2_steps=16, lambda2=5.0, stage2_lr=3e-3
    )
    order, info = run_trsp(model, blocks, 2, range(4), settings, batch_size=2)
    assert len(order) == 2
    for layer in order:
        assert info.delta_after_stage2[str(layer)] < 0.8 * info.delta_before_stage2[str(layer)]


def test_fade_leaves_the_selected_layers_removable():
    """After the fade the kept layers do the selected layers' work: removing them costs less than it did before."""
    from slimllm.pruning.surgery import remove_layers

    model = build_tiny_model("qwen2", num_layers=5)
    untouched = build_tiny_model("qwen2", num_layers=5)
    blocks = torch.randint(3, 49152, (8, 32), generator=torch.Generator().manual_seed(1))
    settings = TrspSettings(stage2=Stage2Mode.FADE, steps_per_round=2, stage2_steps=8, stage2_lr=1e-3)
    order, info = run_trsp(model, blocks, 2, range(4), settings, batch_size=2)
    assert info.training_tokens == (2 * 2 + 8) * 2 * 32
    assert len(info.stage2_losses) == 8
    assert type(decoder_layers(model)[0]).__name__ == "Qwen2DecoderLayer"  # gates detached

    def loss_without_selected(network) -> float:
        pruned, _ = remove_layers(network, order)
        with torch.no_grad():
            return float(pruned(blocks, labels=blocks).loss)

    assert loss_without_selected(model) < loss_without_selected(untouched) - 0.05


def test_distillation_kl_is_the_kl_of_next_token_distributions():
    student = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    teacher = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1))
    p_teacher = teacher.softmax(-1)
    expected = (p_teacher * (p_teacher.log() - student.log_softmax(-1))).sum(-1).mean()
    assert float(distillation_kl(student, teacher)) == pytest.approx(float(expected), rel=1e-5)
    assert float(distillation_kl(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def _kl_to(teacher, model, ids) -> float:
    with torch.no_grad():
        return float(distillation_kl(model(ids).logits, teacher(ids).logits))


def test_distilling_stage2_keeps_the_pruned_model_closer_to_the_unpruned_one():
    blocks = torch.randint(3, 49152, (8, 32), generator=torch.Generator().manual_seed(4))
    dense = build_tiny_model("llama", num_layers=5)
    kls = {}
    for distill in (0.0, 5.0):
        model = build_tiny_model("llama", num_layers=5)
        settings = TrspSettings(
            stage2=Stage2Mode.FADE, steps_per_round=1, stage2_steps=12, stage2_lr=3e-3, distill=distill
        )
        order, info = run_trsp(model, blocks, 2, range(4), settings, batch_size=2)
        assert len(info.stage2_kl) == (12 if distill else 0)
        pruned, _ = remove_layers(model, order, inplace=True)
        kls[distill] = _kl_to(dense, pruned, blocks[:4])
    assert kls[5.0] < 0.7 * kls[0.0]


def test_healing_by_distillation_stays_closer_to_the_teacher():
    blocks = torch.randint(3, 49152, (8, 32), generator=torch.Generator().manual_seed(5))
    dense = build_tiny_model("qwen2", num_layers=5)
    kls = {}
    for distill in (0.0, 5.0):
        pruned, _ = remove_layers(build_tiny_model("qwen2", num_layers=5), [1, 2], inplace=True)
        teacher = frozen_teacher(dense) if distill else None
        log = fine_tune(pruned, blocks, steps=12, lr=3e-3, batch_size=2, teacher=teacher, distill=distill)
        assert log.steps == 12
        kls[distill] = _kl_to(dense, pruned, blocks[:4])
    assert kls[5.0] < 0.7 * kls[0.0]
    assert not any(p.requires_grad for p in frozen_teacher(dense).parameters())


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    "stop_at, distill, scope",
    # inside stage 1 (round 3 of 3), inside stage 2, inside a distilling stage 2; both stage-1 training scopes
    [(5, 0.0, "full"), (9, 0.0, "full"), (9, 1.0, "full"), (5, 0.0, "gates"), (9, 0.0, "gates")],
)
def test_resume_equals_an_uninterrupted_run(tmp_path, stop_at, distill, scope):
    blocks = torch.randint(3, 49152, (10, 32), generator=torch.Generator().manual_seed(2))
    settings = TrspSettings(
        stage2=Stage2Mode.FADE, steps_per_round=2, stage2_steps=6, train_scope=scope, distill=distill
    )

    reference_model = build_tiny_model("llama", num_layers=6)
    reference_order, reference_info = run_trsp(reference_model, blocks, 3, range(5), settings, batch_size=2)

    def stop(done, total, **_):
        if done == stop_at:
            raise _Interrupt

    work = tmp_path / "work"
    model = build_tiny_model("llama", num_layers=6)
    with pytest.raises(_Interrupt):
        run_trsp(model, blocks, 3, range(5), settings, batch_size=2, work_dir=work, progress=stop)
    resumed_model = build_tiny_model("llama", num_layers=6)  # a fresh process would start from the dense model
    order, info = run_trsp(resumed_model, blocks, 3, range(5), settings, batch_size=2, work_dir=work, resume=True)
    assert info.resumed_from is not None
    assert order == reference_order
    flat = [v for row in info.gate_trajectory for v in row]
    assert flat == pytest.approx([v for row in reference_info.gate_trajectory for v in row])
    with torch.no_grad():
        torch.testing.assert_close(resumed_model(IDS).logits, reference_model(IDS).logits)


def test_misspelled_recipe_keys_are_errors(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[prune]\nremov = 3\n\n[trsp]\nlamda1 = 0.1\nlambda2 = 0.5\n\n[trainer]\nx = 1\n")
    with pytest.raises(UserInputError) as error:
        load_recipe(recipe)
    message = str(error.value)
    assert "prune.remov" in message and "trsp.lamda1" in message and "[trainer]" in message
    assert "lambda2" not in message.replace("trsp.lamda1", "")


def test_flags_override_recipe(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[trsp]\nlambda1 = 0.1\nstage2 = "regularize"\n')
    settings = build_settings(TrspSettings, load_recipe(recipe)["trsp"], {"lambda1": 0.2, "lambda2": None})
    assert settings.lambda1 == 0.2 and settings.stage2 is Stage2Mode.REGULARIZE and settings.lambda2 == 1e-3
    with pytest.raises(UserInputError, match="unknown --stage2 .melt.; use one of"):
        build_settings(TrspSettings, {"stage2": "melt"}, {})


def test_cli_trsp_with_recipe(tiny_model_dir, text_file, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        "[prune]\nremove = 2\ncalib_blocks = 6\nblock_len = 32\n\n"
        "[trsp]\nsteps_per_round = 2\nstage2_steps = 4\nlambda1 = 0.05\ndistill = 2.0\n"
    )
    out = tmp_path / "pruned"
    result = run_cli(
        "prune",
        str(tiny_model_dir("mistral")),
        "--method",
        "trsp",
        "--calib",
        str(text_file),
        "--recipe",
        str(recipe),
        "--lambda1",
        "0.01",
        "--distill",
        "0.5",
        "--out",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / PRUNING_RECORD_FILE).read_text())
    assert record["method"] == "trsp" and len(record["removed_layers"]) == 2
    details = record["details"]
    assert details["trsp_settings"]["lambda1"] == 0.01 and details["trsp_settings"]["steps_per_round"] == 2
    assert details["trsp_settings"]["distill"] == 0.5 and len(details["stage2_kl"]) == 4
    assert len(details["gate_trajectory"]) == 2 and len(details["gate_trajectory"][0]) == 6
    assert sorted(details["selection_order"]) == record["removed_layers"]
    assert set(details["delta_before_stage2"]) == {str(i) for i in record["removed_layers"]}
    assert not (tmp_path / "pruned.partial").exists()


def test_cli_recipe_typo_is_exit_2(tiny_model_dir, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[trsp]\nsteps_per_rond = 3\n")
    result = run_cli(
        "prune", str(tiny_model_dir("llama")), "--remove", "1", "--recipe", str(recipe), "--out", str(tmp_path / "o")
    )
    _assert_user_error(result, "trsp.steps_per_rond")


def test_cli_resume_without_state_is_exit_2(tiny_model_dir, tmp_path):
    result = run_cli("prune", str(tiny_model_dir("llama")), "--remove", "1", "--resume", "--out", str(tmp_path / "o"))
    _assert_user_error(result, "nothing to resume")


@pytest.mark.parametrize("change", ["k", "lambda1", "seed", "data"])
def test_resume_with_other_settings_or_data_is_refused(tmp_path, change):
    """A checkpoint holds the hash of the run that wrote it; resuming another run is one clear error."""
    blocks = torch.randint(3, 49152, (10, 32), generator=torch.Generator().manual_seed(2))
    settings = TrspSettings(stage2=Stage2Mode.FADE, steps_per_round=2, stage2_steps=6)

    def stop(done, total, **_):
        if done == 3:
            raise _Interrupt

    work = tmp_path / "work"
    with pytest.raises(_Interrupt):
        run_trsp(build_tiny_model("llama"), blocks, 3, range(5), settings, batch_size=2, work_dir=work, progress=stop)
    k, seed = 3, 0
    if change == "k":
        k = 2
    elif change == "lambda1":
        settings = TrspSettings(stage2=Stage2Mode.FADE, steps_per_round=2, stage2_steps=6, lambda1=0.5)
    elif change == "seed":
        seed = 1
    else:
        blocks = blocks.flip(0)
    with pytest.raises(UserInputError, match="other settings, calibration data or model"):
        run_trsp(build_tiny_model("llama"), blocks, k, range(5), settings, batch_size=2, seed=seed, work_dir=work,
                 resume=True)


def test_training_keeps_fp32_master_weights_and_computes_in_the_requested_dtype(tiny_model_dir):
    """--dtype bf16 for TRSP: weights stay fp32 (updates do not round away), the forward runs under bf16 autocast."""
    from slimllm.core.device import autocast_dtype, model_autocast
    from slimllm.models.loading import load_model

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu", dtype="bf16", for_training=True)
    model = loaded.model
    assert loaded.dtype == torch.bfloat16 and autocast_dtype(model) == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad(), model_autocast(model):
        assert model(IDS).logits.dtype == torch.bfloat16
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    blocks = torch.randint(3, 49152, (4, 32), generator=torch.Generator().manual_seed(5))
    settings = TrspSettings(stage2=Stage2Mode.FADE, steps_per_round=1, stage2_steps=4, stage2_lr=1e-4)
    run_trsp(model, blocks, 1, range(5), settings, batch_size=2)
    changed = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert changed and all(p.dtype == torch.float32 for p in model.parameters())


def test_inference_in_fp32_runs_without_autocast(tiny_model_dir):
    from slimllm.core.device import autocast_dtype, model_autocast
    from slimllm.models.loading import load_model

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu", dtype="fp32")
    assert autocast_dtype(loaded.model) is None
    with torch.no_grad(), model_autocast(loaded.model):
        assert loaded.model(IDS).logits.dtype == torch.float32


def test_training_refuses_half_precision_weights():
    model = build_tiny_model("llama", num_layers=3).to(torch.bfloat16)
    blocks = torch.randint(3, 49152, (4, 32), generator=torch.Generator().manual_seed(5))
    with pytest.raises(UserInputError, match="must be held in fp32"):
        run_trsp(model, blocks, 1, range(2), TrspSettings(), batch_size=2)


@pytest.mark.gpu
def test_cuda_bf16_training_changes_fp32_weights_and_eval_fp32_uses_no_autocast(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: bf16 autocast over fp32 master weights is the CUDA training path")
    from slimllm.core.device import model_autocast
    from slimllm.models.loading import load_model

    loaded = load_model(str(tiny_model_dir("llama")), device="cuda", for_training=True)
    model = loaded.model
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    blocks = torch.randint(3, 49152, (4, 32), generator=torch.Generator().manual_seed(5))
    info = run_trsp(model, blocks, 1, range(5), TrspSettings(steps_per_round=2, stage2_steps=8), batch_size=2)[1]
    assert info.stage2_losses[-1] < info.stage2_losses[0]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    evaluated = load_model(str(tiny_model_dir("llama")), device="cuda", dtype="fp32")
    with torch.no_grad(), model_autocast(evaluated.model):
        assert evaluated.model(IDS.cuda()).logits.dtype == torch.float32
