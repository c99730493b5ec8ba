"""`--device-map`: models spread by accelerate over devices, host memory and disk score, prune and heal as a whole
model does, and what a spread model cannot do is refused in one line before any work.

There is no GPU in CI, so the spread here is host memory plus disk: a `--max-memory cpu=...` below the model's
size sends the last layers to disk, where accelerate keeps them on `meta` and loads them for each forward. That is
the offload path of a model larger than its GPUs; several GPUs add only device moves, which the hooks make.
"""

import gc
import json

import pytest
import torch
from conftest import CALIB_FILE, EVAL_FILE, TINY_COMPILE_SECTION, TINY_GGUF_SECTION
from safetensors.torch import load_file
from test_cli import _assert_user_error, run_cli

from slimllm.core.errors import UserInputError
from slimllm.core.placement import (
    DeviceMap,
    Placement,
    device_map_of,
    execution_device,
    input_device,
    offloaded_entries,
    parse_max_memory,
    parse_size,
)
from slimllm.models.loading import load_model
from slimllm.pipeline.plan import MachineMemory, StagePlan, check_fits
from slimllm.pruning.methods.trsp import TrspSettings
from slimllm.pruning.stage import PruneSettings, run_prune

GIB = 2**30


def _half_on_disk(directory) -> Placement:
    """A host budget that holds the embedding and about half of the layers; the rest go to disk."""
    weights = load_file(directory / "model.safetensors")
    total = sum(t.numel() * t.element_size() for t in weights.values())
    layer = sum(t.numel() * t.element_size() for name, t in weights.items() if ".layers.0." in name)
    return Placement(DeviceMap.AUTO, {"cpu": total - 3 * layer})


@pytest.fixture
def offload_root(tmp_path, monkeypatch):
    """slimllm's cache in the test's own directory, so that the offload folders it makes can be checked."""
    monkeypatch.setenv("SLIMLLM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "offload"


def test_sizes_and_memory_limits_parse():
    assert parse_size("20GiB") == 20 * GIB and parse_size("500MB") == 500 * 10**6 and parse_size("1024") == 1024
    assert parse_max_memory("cpu=1.5GiB") == {"cpu": int(1.5 * GIB)}
    assert parse_max_memory(None) is None
    for text, fragment in (("cpu:5GB", "DEVICE=SIZE"), ("cpu=lots", "cannot read"), ("npu=1GiB", "unknown device")):
        with pytest.raises(UserInputError, match=fragment):
            parse_max_memory(text)
    if torch.cuda.device_count() == 0:
        with pytest.raises(UserInputError, match="has 0 CUDA GPU"):
            parse_max_memory("0=20GiB,cpu=1GiB")


def test_placement_flags_that_contradict_each_other_are_refused():
    assert Placement.parse(None) == Placement() and not Placement.parse("none").spread
    assert Placement.parse("auto", "cpu=1GiB").max_memory == {"cpu": GIB}
    with pytest.raises(UserInputError, match="add --device-map auto"):
        Placement.parse(None, max_memory="cpu=1GiB")
    with pytest.raises(UserInputError, match="drop --device cpu"):
        Placement.parse("auto", device="cpu")
    with pytest.raises(UserInputError, match="unknown --device-map 'everywhere'"):
        Placement.parse("everywhere")


def test_an_offloaded_model_computes_what_the_whole_model_computes(tiny_model_dir, offload_root):
    directory = tiny_model_dir("llama")
    whole = load_model(str(directory), device="cpu")
    spread = load_model(str(directory), placement=_half_on_disk(directory))
    on_disk = offloaded_entries(spread.model)
    assert on_disk and set(on_disk.values()) == {"disk"} and "cpu" in device_map_of(spread.model).values()
    assert any("model.layers" in name for name in on_disk)
    last = spread.model.model.layers[-1]
    assert last.mlp.down_proj.weight.device.type == "meta"  # not resident: loaded for each forward
    assert execution_device(last) == torch.device("cpu") and input_device(spread.model) == torch.device("cpu")
    assert any("placed with device_map=auto" in note for note in spread.notes)
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(spread.model(ids).logits, whole.model(ids).logits, atol=1e-5)
    folders = list(offload_root.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("slimllm-offload-")
    del spread
    gc.collect()
    assert not any(offload_root.iterdir())  # slimllm removes the offload folder it made once the model is freed


def test_block_by_block_scoring_reads_each_offloaded_layer_once(tiny_model_dir, offload_root, monkeypatch):
    """Every calibration minibatch goes through a layer in turn; an offloaded layer is read from disk once for all of
    them (not once per minibatch), then dropped again, and the stream is what the whole model computes."""
    from accelerate.utils.offload import OffloadedWeightsLoader

    from slimllm.models.layer_io import stream_layers

    directory = tiny_model_dir("llama")
    reads: dict[str, int] = {}
    original = OffloadedWeightsLoader.__getitem__

    def counted(self, key):
        reads[key] = reads.get(key, 0) + 1
        return original(self, key)

    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__", counted)
    spread = load_model(str(directory), placement=_half_on_disk(directory))
    whole = load_model(str(directory), device="cpu")
    blocks = torch.randint(0, 49152, (4, 32), generator=torch.Generator().manual_seed(0))
    outputs: dict[str, list[torch.Tensor]] = {"spread": [], "whole": []}
    reads.clear()
    stream_layers(spread.model, blocks, 1, lambda i, b, x_in, x_out: outputs["spread"].append(x_out.clone()))
    stream_layers(whole.model, blocks, 1, lambda i, b, x_in, x_out: outputs["whole"].append(x_out.clone()))
    offloaded_layer_weights = [key for key in reads if ".layers." in key]
    assert offloaded_layer_weights and all(reads[key] == 1 for key in offloaded_layer_weights)
    assert spread.model.model.layers[-1].mlp.down_proj.weight.device.type == "meta"  # offloaded again after
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outputs["spread"], outputs["whole"], strict=True))


@pytest.mark.parametrize("method", ["shortgpt", "sleb"])  # block by block; a greedy search re-running suffixes
def test_pruning_an_offloaded_model_matches_the_whole_model(method, tiny_model_dir, tmp_path, offload_root):
    directory = tiny_model_dir("llama")
    settings = PruneSettings(method=method, remove=2, calib=str(CALIB_FILE), calib_blocks=4, block_len=64,
                             repair="none")
    spread = run_prune(str(directory), settings, tmp_path / "spread", placement=_half_on_disk(directory))
    whole = run_prune(str(directory), settings, tmp_path / "whole", device="cpu")
    assert spread.removed_layers == whole.removed_layers
    assert json.dumps(spread.scores, sort_keys=True) == json.dumps(whole.scores, sort_keys=True)
    a, b = load_file(tmp_path / "spread" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[name], b[name]) for name in a)  # offloaded layers saved too
    record = json.loads((tmp_path / "spread" / "slimllm_pruning.json").read_text())
    assert "disk" in record["device_map"].values()


def test_trsp_gate_training_on_an_offloaded_model_matches_the_whole_model(tiny_model_dir, tmp_path, offload_root):
    directory = tiny_model_dir("llama")
    settings = PruneSettings(method="trsp", remove=2, calib=str(CALIB_FILE), calib_blocks=4, block_len=64,
                             repair="none")
    gates_only = TrspSettings(stage2="none", steps_per_round=2)
    spread = run_prune(str(directory), settings, tmp_path / "spread", placement=_half_on_disk(directory),
                       method_settings=gates_only)
    whole = run_prune(str(directory), settings, tmp_path / "whole", device="cpu", method_settings=gates_only)
    assert spread.removed_layers == whole.removed_layers
    trajectory = spread.details["gate_trajectory"]
    assert trajectory and trajectory != [[1.0] * 6] * len(trajectory)  # the gates did train
    assert torch.allclose(torch.tensor(trajectory), torch.tensor(whole.details["gate_trajectory"]), atol=1e-6)


def test_what_an_offloaded_model_cannot_do_is_refused_before_any_work(tiny_model_dir, tmp_path, offload_root):
    directory = tiny_model_dir("llama")
    placement = _half_on_disk(directory)
    repairing = PruneSettings(method="shortgpt", remove=2, calib=str(CALIB_FILE), calib_blocks=4, block_len=64)
    with pytest.raises(UserInputError, match="edits weights, and .* offloaded to disk; .*--repair none"):
        run_prune(str(directory), repairing, tmp_path / "a", placement=placement)
    with pytest.raises(UserInputError, match="trsp trains weights.*--stage2 none"):
        run_prune(str(directory), PruneSettings(method="trsp", remove=2, calib=str(CALIB_FILE)), tmp_path / "b",
                  placement=placement)
    with pytest.raises(UserInputError, match="2ssp edits weights"):
        run_prune(str(directory), PruneSettings(method="2ssp", calib=str(CALIB_FILE)), tmp_path / "c",
                  placement=placement)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_spread_model_with_every_layer_resident_repairs_and_heals_with_lora(tiny_model_dir, tmp_path,
                                                                                offload_root):
    from slimllm.recovery.healing import HealSettings, run_heal

    directory = tiny_model_dir("llama")
    settings = PruneSettings(method="shortgpt", remove=2, calib=str(CALIB_FILE), calib_blocks=4, block_len=64)
    spread = Placement(DeviceMap.AUTO)  # nothing offloaded: the least-squares repair edits resident weights
    run_prune(str(directory), settings, tmp_path / "spread", placement=spread)
    run_prune(str(directory), settings, tmp_path / "whole", device="cpu")
    a, b = load_file(tmp_path / "spread" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)
    heal = HealSettings(tokens=256, block_len=64, batch_size=2, scope="lora", lora_rank=4, calib=str(CALIB_FILE),
                        distill=0.0)
    healed = run_heal(tmp_path / "whole", heal, tmp_path / "healed-spread", placement=spread)
    reference = run_heal(tmp_path / "whole", heal, tmp_path / "healed-whole", device="cpu")
    assert healed.losses == pytest.approx(reference.losses, rel=1e-5)
    a = load_file(tmp_path / "healed-spread" / "model.safetensors")
    b = load_file(tmp_path / "healed-whole" / "model.safetensors")
    assert any(not torch.equal(a[name], c) for name, c in load_file(tmp_path / "whole" / "model.safetensors").items())
    assert all(torch.allclose(a[name], b[name], atol=1e-5) for name in a)
    with pytest.raises(UserInputError, match="healing with --scope full trains weights.*--scope lora"):
        run_heal(tmp_path / "whole", HealSettings(tokens=256, block_len=64, calib=str(CALIB_FILE), distill=0.0),
                 tmp_path / "full", placement=spread)


def test_cli_eval_with_a_device_map_scores_as_the_whole_model(tiny_model_dir, offload_root):
    directory = tiny_model_dir("llama")
    budget = _half_on_disk(directory).max_memory["cpu"]
    common = ("eval", str(directory), "--data", str(EVAL_FILE), "--seq-len", "64", "--max-windows", "2", "--json")
    whole = run_cli(*common)
    spread = run_cli(*common, "--device-map", "auto", "--max-memory", f"cpu={budget}")
    assert whole.exit_code == 0 and spread.exit_code == 0, spread.output
    assert json.loads(spread.stdout)["perplexity"] == pytest.approx(json.loads(whole.stdout)["perplexity"], rel=1e-5)
    assert "device_map=auto" in json.loads(spread.stdout)["backend"]


def test_cli_placement_errors_are_one_line(tiny_model_dir, tmp_path, offload_root):
    directory = str(tiny_model_dir("llama"))
    _assert_user_error(run_cli("eval", directory, "--data", str(EVAL_FILE), "--max-memory", "cpu=1GiB"),
                       "add --device-map auto")
    _assert_user_error(run_cli("prune", directory, "--out", str(tmp_path / "p"), "--method", "trsp", "-k", "2",
                               "--calib", str(CALIB_FILE), "--device-map", "auto"), "trains weights")
    # compile refuses a run whose heal stage trains every weight before the prune stage runs
    _assert_user_error(run_cli("compile", directory, "--out", str(tmp_path / "c"), "--method", "shortgpt", "-k", "2",
                               "--calib", str(CALIB_FILE), "--device-map", "auto", "--profile", "none"),
                       "healing with --scope full trains weights")
    assert not (tmp_path / "p").exists() and not (tmp_path / "c" / "pruned").exists()


def _stage(device_gib: float, stage: str = "evaluate") -> StagePlan:
    return StagePlan(stage, GIB, GIB, int(device_gib * GIB), 0.0, "")


def test_plan_offers_a_device_map_where_the_gpus_together_fit():
    from slimllm.pipeline.plan import Workload

    work = Workload(removed_layers=2, ffn_kept=1.0, selection_tokens=0, calib_batch=1, block_len=512, calib_blocks=8,
                    train_tokens=0, train_scope="none", repair=False, heal_tokens=0, heal_scope=None, heal_batch=0,
                    heal_block_len=0, onnx_quant=None, gguf_types=(), eval_tokens=0, eval_seq_len=512,
                    eval_artifacts=1, task_tokens=0, profile=False)
    two_gpus = MachineMemory(64 * GIB, 24 * GIB, "cuda:0", 16, gpu_bytes=(24 * GIB, 24 * GIB))
    plans = [_stage(30, "prune"), _stage(30)]
    with pytest.raises(UserInputError, match="--device-map auto would fit .* 2 GPUs"):
        check_fits(plans, two_gpus, lambda w: plans, work)
    spread = MachineMemory(64 * GIB, 24 * GIB, "cuda:0", 16, gpu_bytes=(24 * GIB, 24 * GIB), spread=True)
    check_fits(plans, spread, lambda w: plans, work)  # fits on the two GPUs together
    with pytest.raises(UserInputError, match="needs about 50.0 GiB on its 2 GPUs"):
        check_fits([_stage(50)], spread, lambda w: [_stage(50)], work)
    # a prune stage that trains every weight cannot be spread, so it is held against one GPU
    training = Workload(**{**work.__dict__, "train_tokens": 1000, "train_scope": "full"})
    with pytest.raises(UserInputError, match="on cuda:0"):
        check_fits([_stage(30, "prune")], spread, lambda w: [_stage(30, "prune")], training)


def test_plan_holds_a_spread_models_weights_to_the_host_budget():
    """Under `--max-memory cpu=...` the plan counts the budget and the one offloaded layer being run, not the whole
    model, in the stages that spread (pruning without repair, evaluation); the exports still hold the pruned model."""
    from transformers import LlamaConfig

    from slimllm.pipeline.compiler import resolve_compile_settings
    from slimllm.pipeline.plan import SAVE_SHARD_BYTES, ModelFootprint, plan_compile

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, dtype="bfloat16")
    settings = resolve_compile_settings(None, {"compile": {"heal": False}, "prune": {"repair": "none"}}, "onnx",
                                        None, "none", "shortgpt", 4, None, None)
    budget = 2 * GIB
    whole = MachineMemory(host_bytes=64 * GIB, device_bytes=None, device="cpu", cores=2)
    capped = MachineMemory(host_bytes=64 * GIB, device_bytes=None, device="cpu", cores=2, host_weights_cap=budget)
    plain = {p.stage: p for p in plan_compile(config, settings, "cpu", whole).stages}
    offload = {p.stage: p for p in plan_compile(config, settings, "cpu", capped).stages}
    dense = ModelFootprint.from_config(config)
    layer, pruned = 4 * dense.layer_parameters, dense.without_layers(4).fp32_bytes
    # the offloaded layer being run is read in place from its file: resident, not private
    assert plain["prune"].private_bytes - offload["prune"].private_bytes == dense.fp32_bytes - budget
    # saving reads one shard of the offloaded layers back in place: resident, not private
    gathered = min(SAVE_SHARD_BYTES, pruned)
    assert offload["prune"].host_bytes - plain["prune"].host_bytes == budget + layer + gathered - dense.fp32_bytes
    # the dense (bf16, converted) model held to its budget; the pruned checkpoint slimllm wrote in fp32 is mapped
    # either way
    assert plain["evaluate"].private_bytes - offload["evaluate"].private_bytes == dense.fp32_bytes - budget
    assert plain["evaluate"].host_bytes - offload["evaluate"].host_bytes == \
        (dense.fp32_bytes - budget - layer) + (pruned - budget - layer)
    assert offload["export_onnx"] == plain["export_onnx"]
    here = MachineMemory.here("cpu", Placement(DeviceMap.AUTO, {"cpu": budget}))
    assert here.host_weights_cap == budget and MachineMemory.here("cpu").host_weights_cap is None


SPREAD_RECIPE = TINY_COMPILE_SECTION + """
[prune]
method = "shortgpt"
calib_blocks = 4
block_len = 64
repair = "none"
""" + TINY_GGUF_SECTION


@pytest.mark.slow
def test_compile_with_a_device_map_prunes_and_evaluates_the_offloaded_model(tiny_model_dir, tmp_path, offload_root):
    import slimllm

    directory = tiny_model_dir("llama")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(SPREAD_RECIPE)
    placement = _half_on_disk(directory)
    result = slimllm.compile(str(directory), out=tmp_path / "run", target="gguf", remove=2, calib=str(CALIB_FILE),
                             eval_data=str(EVAL_FILE), profile=None, recipe=recipe, placement=placement)
    assert result.manifest["placement"].startswith("device_map=auto")
    record = json.loads((tmp_path / "run" / "pruned" / "slimllm_pruning.json").read_text())
    assert "disk" in record["device_map"].values()
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    whole = load_model(str(directory), device="cpu")
    from slimllm.evaluation.perplexity import torch_logits_fn
    from slimllm.exporters.parity import eval_windows, perplexity
    from slimllm.pipeline.stages.evaluate import DENSE_LABEL

    windows, _ = eval_windows(whole.tokenizer, str(EVAL_FILE), 64, 2)
    assert evaluation["perplexity"][DENSE_LABEL] == pytest.approx(perplexity(torch_logits_fn(whole.model), windows),
                                                                  rel=1e-5)
    assert evaluation["divergence"] and all(stats["ppl"] > 1 for stats in evaluation["divergence"].values())
