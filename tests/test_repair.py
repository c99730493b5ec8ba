"""Training-free repair after removal (`--repair lsq`): the fold, the solve, and the prune stage end to end."""

from __future__ import annotations

import json

import pytest
import torch

from slimllm.core.errors import UserInputError
from slimllm.models.architectures import decoder_layers
from slimllm.recovery.repair import (
    RepairMethod,
    _Moments,
    comp_repair,
    contiguous_runs,
    fold_into_down_proj,
    lsq_repair,
    scale_stream_before,
    solve_transform,
    untie_embeddings,
)


@pytest.fixture
def tiny(tiny_model_dir):
    from slimllm.models.loading import load_model

    return load_model(str(tiny_model_dir("llama")), device="cpu")


def _blocks(n: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 49152, (n, length), generator=torch.Generator().manual_seed(0))


def test_contiguous_runs():
    assert contiguous_runs([14, 3, 12, 13, 25]) == [[3], [12, 13, 14], [25]]
    assert contiguous_runs([]) == []


def test_fold_equals_applying_the_transform_through_a_hook(tiny):
    """W ← TᵀW in down_proj gives the logits of multiplying the MLP output by T on the fly."""
    import copy

    transform = torch.eye(64) + 0.05 * torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    hooked = copy.deepcopy(tiny.model)
    decoder_layers(hooked)[2].mlp.register_forward_hook(lambda module, args, out: out @ transform)
    folded = copy.deepcopy(tiny.model)
    fold_into_down_proj(decoder_layers(folded)[2], transform.double())
    ids = _blocks(2)
    with torch.no_grad():
        assert torch.allclose(folded(ids).logits, hooked(ids).logits, atol=1e-4)
        assert not torch.allclose(folded(ids).logits, tiny.model(ids).logits, atol=1e-3)


def test_least_squares_recovers_an_exactly_linear_map():
    """With D = M·T* exactly, the float64 normal equations (no ridge) give T* back to numerical precision, and the
    error after the fold is zero while the error at T = I is not."""
    generator = torch.Generator().manual_seed(2)
    m = torch.randn(3, 50, 16, generator=generator)
    target_map = torch.randn(16, 16, generator=generator, dtype=torch.float64)
    y = torch.randn(3, 50, 16, generator=generator)
    moments = _Moments(torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 16, dtype=torch.float64))
    moments.add(m, y, y + (m.double() @ target_map).float())
    transform = solve_transform(moments, ridge=0.0)
    assert torch.allclose(transform, target_map, atol=1e-4)
    assert moments.error(transform) < 1e-5 < moments.error(None)


def test_a_removed_identity_layer_is_recovered_exactly(tiny):
    """A layer that adds nothing (o_proj and down_proj zero) is exactly linear in the MLP output: T = I, and the
    repaired model without it computes what the model with it computed."""
    from slimllm.pruning.surgery import remove_layers

    model = tiny.model
    with torch.no_grad():
        layer = decoder_layers(model)[3]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    ids = _blocks(2)
    with torch.no_grad():
        expected = model(ids).logits
    runs = lsq_repair(model, [3], _blocks(), batch_size=2, ridge=0.0)
    assert runs[0].folded_into == 2 and runs[0].error_before < 1e-6 and runs[0].error_after < 1e-6
    pruned, _ = remove_layers(model, [3])
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, expected, atol=1e-4)


def test_runs_are_repaired_in_order_and_a_leading_run_is_left_as_removed(tiny):
    runs = lsq_repair(tiny.model, [0, 2, 3], _blocks(), batch_size=2, ridge=1e-3)
    assert [r.removed for r in runs] == [[0], [2, 3]]
    assert runs[0].folded_into is None and "no kept layer" in runs[0].note
    assert runs[1].folded_into == 1 and runs[1].error_after < runs[1].error_before


def test_prune_with_lsq_repair_records_it_and_saves_a_plain_checkpoint(tiny_model_dir, tmp_path, text_file):
    from transformers import AutoModelForCausalLM

    from slimllm.pruning.settings import PruneSettings
    from slimllm.pruning.stage import run_prune

    settings = PruneSettings(method="last", remove=2, calib=str(text_file), calib_blocks=4, block_len=32,
                             repair="lsq")
    source = tiny_model_dir("qwen2")
    run_prune(str(source), settings, tmp_path / "pruned", device="cpu")
    record = json.loads((tmp_path / "pruned" / "slimllm_pruning.json").read_text())
    repair = record["details"]["repair"]
    assert repair["method"] == "lsq" and record["settings"]["repair"] == "lsq"
    assert [run["removed"] for run in repair["runs"]] == [record["removed_layers"]]
    assert repair["runs"][0]["error_after"] < repair["runs"][0]["error_before"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"))
    assert reloaded.config.num_hidden_layers == 4
    original = AutoModelForCausalLM.from_pretrained(str(source))
    kept_fold = record["kept_layers"].index(repair["runs"][0]["folded_into"])
    assert not torch.equal(decoder_layers(reloaded)[kept_fold].mlp.down_proj.weight,
                           decoder_layers(original)[repair["runs"][0]["folded_into"]].mlp.down_proj.weight)


def _without_norm_eps(model):
    """The same model with RMSNorm's eps set to (almost) zero: random tiny weights make hidden states so small that
    the eps term would dominate the comparison the exactness tests make."""
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 1e-20
    return model


def test_comp_fold_is_exact_scaling_of_the_stream_at_the_cut(tiny):
    """Scaling the embedding and the earlier blocks' o_proj/down_proj by α equals multiplying the stream entering
    the layer by α through a hook; the tied LM head is untied first and keeps the original weights."""
    import copy

    original = _without_norm_eps(tiny.model)
    folded = copy.deepcopy(original)
    assert untie_embeddings(folded) and not folded.config.tie_word_embeddings
    scale_stream_before(folded, 3, 1.7)
    hooked = copy.deepcopy(original)
    decoder_layers(hooked)[3].register_forward_pre_hook(
        lambda module, args, kwargs: ((args[0] * 1.7,) + args[1:], kwargs) if args
        else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 1.7}),
        with_kwargs=True,
    )
    ids = _blocks(2)
    with torch.no_grad():
        assert torch.allclose(folded(ids).logits, hooked(ids).logits, atol=1e-4)
        assert torch.equal(folded.lm_head.weight, original.lm_head.weight)
        assert not torch.allclose(folded(ids).logits, original(ids).logits, atol=1e-3)


def test_comp_before_any_removal_keeps_the_logits_up_to_the_norm_eps(tiny):
    """Scaling the whole stream (before the final norm) changes nothing but RMSNorm's eps term."""
    import copy

    _without_norm_eps(tiny.model)
    scaled = copy.deepcopy(tiny.model)
    untie_embeddings(scaled)
    scale_stream_before(scaled, len(decoder_layers(scaled)), 3.0)
    ids = _blocks(2)
    with torch.no_grad():
        assert torch.allclose(scaled(ids).logits, tiny.model(ids).logits, atol=1e-5)


def test_comp_scale_is_the_mean_channel_magnitude_ratio_across_the_removed_layer(tiny):
    """α for the first removed layer matches a direct trace: mean over channels of mean|x_3| / mean|x_2|; the
    recorded error at α is ‖α·x_2 − x_3‖ / ‖x_3‖."""
    from slimllm.models.layer_io import trace_decoder

    blocks = _blocks()
    trace = trace_decoder(tiny.model, blocks)
    x_in, x_out = trace.layer_inputs[2].double(), trace.layer_inputs[3].double()
    expected = float((x_out.abs().mean((0, 1)) / x_in.abs().mean((0, 1))).mean())
    runs, untied = comp_repair(tiny.model, [2, 3], blocks, batch_size=2)
    assert untied and [r.removed for r in runs] == [[2], [3]]
    assert runs[0].note == f"alpha={expected:.6g}"
    error = float((expected * x_in - x_out).norm() / x_out.norm())
    assert runs[0].error_after == pytest.approx(error, rel=1e-4)
    assert runs[0].error_before == pytest.approx(float((x_in - x_out).norm() / x_out.norm()), rel=1e-4)


def test_repair_settings_errors():
    from slimllm.pruning.settings import PruneSettings

    with pytest.raises(ValueError):
        PruneSettings(remove=1, repair="magic")
    with pytest.raises(UserInputError, match="--repair-ridge"):
        PruneSettings(remove=1, repair_ridge=-1.0)
    # Unset: least squares after a selection that trains nothing, none after TRSP's transfer or for 2SSP.
    assert PruneSettings(remove=1).repair is None
    assert PruneSettings(remove=1, method="shortgpt").resolved_repair() is RepairMethod.LSQ
    assert PruneSettings(remove=1, method="trsp").resolved_repair() is RepairMethod.NONE
    assert PruneSettings(method="2ssp").resolved_repair() is RepairMethod.NONE


@pytest.mark.slow
def test_compile_passes_repair_to_the_prune_stage(tiny_model_dir, tmp_path, text_file):
    from conftest import EVAL_FILE
    from test_cli import run_cli

    out = tmp_path / "run"
    result = run_cli(
        "compile", str(tiny_model_dir("llama")), "--method", "last", "--remove", "2", "--repair", "lsq",
        "--calib", str(text_file), "--no-heal",
        "--eval-data", str(EVAL_FILE), "--eval-seq-len", "32", "--eval-windows", "1",
        "--eval-task", "none", "--target", "onnx", "--profile", "none", "--out", str(out),
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "pruned" / "slimllm_pruning.json").read_text())
    assert record["details"]["repair"]["runs"][0]["folded_into"] == 2


def test_prune_with_comp_saves_an_untied_checkpoint_that_reloads(tiny_model_dir, tmp_path, text_file):
    from transformers import AutoModelForCausalLM

    from slimllm.pruning.settings import PruneSettings
    from slimllm.pruning.stage import run_prune

    settings = PruneSettings(method="last", remove=2, calib=str(text_file), calib_blocks=4, block_len=32,
                             repair="comp")
    run_prune(str(tiny_model_dir("llama")), settings, tmp_path / "pruned", device="cpu")
    record = json.loads((tmp_path / "pruned" / "slimllm_pruning.json").read_text())
    assert record["details"]["repair"]["method"] == "comp" and record["details"]["repair"]["untied_embeddings"]
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"))
    assert not reloaded.config.tie_word_embeddings
    assert not torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight)


def test_repair_after_trsp_stage2_is_refused_before_any_work(tiny_model_dir):
    """Stage 2 trains the kept layers to do without the removed ones; fitting the removed layers' outputs afterwards
    would undo it. TRSP with --stage2 none (gates-only stage 1) may be repaired."""
    from slimllm.models.loading import load_model
    from slimllm.pruning.methods.trsp import TrspSettings
    from slimllm.pruning.settings import PruneSettings
    from slimllm.pruning.stage import prune_in_memory

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu", for_training=True)
    settings = PruneSettings(method="trsp", remove=1, repair="lsq")
    with pytest.raises(UserInputError, match="--repair none"):
        prune_in_memory(loaded, settings, None, method_settings=TrspSettings(stage2="fade"))
    from slimllm.pruning.registry import get_method

    assert not get_method("trsp").transfers_removed_work(TrspSettings(stage2="none", train_scope="gates"))
