"""`slimllm plan` and compile's memory check: exact parameter counts from the configuration, per-stage estimates,
a run that cannot fit refused up front in one line."""

import json
import time

import pytest
from conftest import REPO_ROOT, build_tiny_model
from test_cli import _assert_user_error, run_cli

from slimllm.core.errors import UserInputError
from slimllm.core.memory import PeakMemory
from slimllm.models.architectures import decoder_layers
from slimllm.pipeline.compiler import resolve_compile_settings
from slimllm.pipeline.plan import (
    GIB,
    LIBRARY_PAGES_BYTES,
    MachineMemory,
    ModelFootprint,
    check_fits,
    plan_compile,
)


def _settings(method="shortgpt", **compile_overrides):
    return resolve_compile_settings(None, {"compile": compile_overrides}, "all", None, "none", method, 2, None, None)


def _write_config(tmp_path, **values):
    """A directory holding only a configuration (what plan reads; no weights)."""
    from transformers import LlamaConfig

    LlamaConfig(**values).save_pretrained(tmp_path)
    return tmp_path


def test_footprint_counts_match_a_built_model():
    model = build_tiny_model("llama", num_layers=4)
    footprint = ModelFootprint.from_config(model.config)
    assert footprint.parameters == sum(p.numel() for p in model.parameters())
    assert footprint.layer_parameters == sum(p.numel() for p in decoder_layers(model)[0].parameters())
    assert footprint.num_layers == 4
    assert footprint.without_layers(1).parameters == footprint.parameters - footprint.layer_parameters


def test_every_enabled_stage_is_planned_and_the_method_counts():
    config = build_tiny_model("llama", num_layers=6).config
    plan = plan_compile(config, _settings(), "cpu")
    plans, machine, work = plan.stages, plan.machine, plan.work
    assert [p.stage for p in plans] == ["prune", "heal", "export_onnx", "export_gguf", "evaluate", "accuracy",
                                        "report"]
    assert work.removed_layers == 2 and machine.host_bytes > 0
    assert all(p.host_bytes > 0 and p.time_class for p in plans)
    sleb = plan_compile(config, _settings("sleb"), "cpu").work
    trsp = plan_compile(config, _settings("trsp"), "cpu").work
    assert sleb.selection_tokens > work.selection_tokens  # the greedy search scores every candidate
    assert trsp.train_tokens > 0 and work.train_tokens == 0


def test_plan_cli_prints_every_stage(tmp_path):
    config_dir = _write_config(tmp_path, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    result = run_cli("plan", str(config_dir), "--method", "shortgpt", "-k", "4", "--no-heal", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    stages = {s["stage"]: s for s in payload["stages"]}
    assert payload["removed_layers"] == 4 and "heal" not in stages
    weights = 4 * 1_498_482_688  # Llama-3.2-1B's shape, untied: 1.50B parameters in fp32
    assert weights < stages["prune"]["host_bytes"] < 3 * weights


def test_plan_says_what_it_assumed_and_uses_the_one_default_method(tmp_path):
    """No --method and no recipe: compile, plan and the Python API all fall back to PruneSettings' default, and plan
    prints the method, where it came from, the budget and the stages."""
    from slimllm.pruning.settings import PruneSettings

    config_dir = _write_config(tmp_path, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    settings = resolve_compile_settings(None, None, None, None, "none", None, 2, None, None)
    assert settings["method"].value == PruneSettings().method.value == "shortgpt"
    assert settings["prune"].method.value == "shortgpt" and settings["method_source"] == "default"
    result = run_cli("plan", str(config_dir), "-k", "2", "--profile", "none")
    assert result.exit_code == 0, result.output
    assert "method shortgpt (default), budget --remove 2; stages: prune, heal, export_onnx" in result.output
    payload = json.loads(run_cli("plan", str(config_dir), "--method", "trsp", "-k", "2", "--json").stdout)
    assert payload["assumed"]["method"] == "trsp" and payload["assumed"]["method_from"] == "argument"


def test_no_heal_with_a_heal_flag_is_refused(tmp_path):
    config_dir = _write_config(tmp_path, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    for command in ("plan", "compile"):
        args = [command, str(config_dir), "-k", "2", "--no-heal", "--heal-tokens", "4096", "--out", str(tmp_path / "o")]
        result = run_cli(*(args if command == "compile" else args[:-2]))
        _assert_user_error(result, "--no-heal conflicts with --heal-tokens")
    assert not (tmp_path / "o").exists()


def test_a_run_that_cannot_fit_is_refused_in_one_line(tmp_path):
    """A 70B-shaped configuration on this machine: plan says which stage and what would fit, exit 2."""
    config_dir = _write_config(tmp_path, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                               num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
    result = run_cli("plan", str(config_dir), "--method", "shortgpt", "-k", "20", "--no-heal")
    _assert_user_error(result, "stage prune needs about")
    assert "GiB" in result.stderr and "--no-memory-check" in result.stderr


def test_compile_refuses_before_any_work(tmp_path, tiny_model_dir, monkeypatch):
    small = MachineMemory(host_bytes=64 * 2**20, device_bytes=None, device="cpu", cores=2)
    monkeypatch.setattr(MachineMemory, "here", classmethod(lambda cls, device, placement=None: small))
    out = tmp_path / "run"
    result = run_cli("compile", str(tiny_model_dir("llama", True)), "--out", str(out), "--method", "last", "-k", "1",
                     "--no-heal", "--profile", "none", "--eval-task", "none")
    _assert_user_error(result, "needs about")
    assert not out.exists()


def test_check_fits_counts_the_device():
    config = build_tiny_model("llama", num_layers=4).config
    plans = plan_compile(config, _settings(), "cpu").stages
    roomy = MachineMemory(host_bytes=64 * GIB, device_bytes=None, device="cpu", cores=2)
    check_fits(plans, roomy)
    with pytest.raises(Exception, match="needs about"):
        check_fits(plans, MachineMemory(host_bytes=2**20, device_bytes=None, device="cpu", cores=2))


def _touch_fresh_pages(size: int) -> None:
    """Make `size` bytes resident and release them: an anonymous mapping, so that no allocator can serve it from
    memory the process already holds (a long test session keeps a large free heap)."""
    import mmap

    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    block.close()


def test_peak_memory_sees_an_allocation():
    with PeakMemory(interval=0.01) as idle:
        pass
    with PeakMemory(interval=0.01) as busy:
        _touch_fresh_pages(64 * 2**20)
    assert busy.host_bytes >= idle.host_bytes + 48 * 2**20


def test_peak_memory_is_exact_between_samples():
    """A peak that comes and goes between two samples (a C call holding the GIL does this) is still seen: the
    kernel's high-water mark is reset on entry and read on exit."""
    with PeakMemory(interval=3600) as peak:
        before = peak.host_bytes
        _touch_fresh_pages(96 * 2**20)
    assert peak.host_bytes >= before + 80 * 2**20


def test_refusal_names_the_setting_that_would_fit(tmp_path):
    """Full healing of a 1B-shaped model does not fit 21 GiB; LoRA healing does, and the line says so."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)
    settings = resolve_compile_settings(None, {"compile": {"heal": True}}, "all", None, "none", "shortgpt", 4, None,
                                        None)
    machine = MachineMemory(host_bytes=21 * GIB, device_bytes=None, device="cpu", cores=2)
    with pytest.raises(UserInputError, match=r"stage heal needs about .*; --heal-scope lora would fit"):
        plan_compile(config, settings, "cpu", machine).check()
    lora = resolve_compile_settings(None, {"compile": {"heal": True}, "heal": {"scope": "lora"}}, "all", None, "none",
                                    "shortgpt", 4, None, None)
    plan_compile(config, lora, "cpu", machine).check()


def _llama_1b_config(dtype: str):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, dtype=dtype)


def test_pages_of_an_fp32_checkpoint_are_not_counted_as_private():
    """transformers reads an fp32 checkpoint in place on CPU: its pages are resident but the kernel can drop them, so
    the fit check holds only the private part against the machine. A bf16 checkpoint is converted: all private."""
    settings = resolve_compile_settings(None, {"compile": {"heal": False}}, "onnx", None, "none", "shortgpt", 4, None,
                                        None)
    mapped = {p.stage: p for p in plan_compile(_llama_1b_config("float32"), settings, "cpu").stages}
    converted = {p.stage: p for p in plan_compile(_llama_1b_config("bfloat16"), settings, "cpu").stages}
    pruned = 4 * ModelFootprint.from_config(_llama_1b_config("float32")).without_layers(4).parameters
    assert mapped["export_onnx"].host_bytes == converted["export_onnx"].host_bytes
    # the pruned checkpoint slimllm wrote, and the external-data file onnxruntime maps (the model is over 2 GB)
    libraries = LIBRARY_PAGES_BYTES
    assert mapped["export_onnx"].host_bytes - mapped["export_onnx"].private_bytes == 2 * pruned + libraries
    assert converted["prune"].private_bytes == converted["prune"].host_bytes - libraries
    assert mapped["prune"].host_bytes == converted["prune"].host_bytes
    assert mapped["prune"].private_bytes < converted["prune"].private_bytes - GIB
    assert mapped["export_onnx"].private_bytes == converted["export_onnx"].private_bytes  # slimllm writes fp32
    between = MachineMemory(host_bytes=int(converted["prune"].private_bytes / 0.9) - GIB // 4, device_bytes=None,
                            device="cpu", cores=2)
    check_fits([mapped["prune"]], between)  # resident peak above the machine, private part within it
    with pytest.raises(UserInputError, match="cannot page out"):
        check_fits([converted["prune"]], between)


def test_peak_memory_tells_mapped_file_pages_from_private_memory(tmp_path):
    import mmap

    path = tmp_path / "weights.bin"
    size = 96 * 2**20
    with open(path, "wb") as handle:
        handle.truncate(size)
    with PeakMemory(interval=0.01) as mapped, open(path, "rb") as handle:
        view = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ)
        checksum = sum(view[offset] for offset in range(0, size, mmap.PAGESIZE))
        view.close()
    assert checksum == 0
    assert mapped.host_bytes - mapped.private_bytes >= 80 * 2**20  # resident, not private
    with PeakMemory(interval=0.01) as anonymous:
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        time.sleep(0.1)  # private memory is sampled: hold it for a few samples
        block.close()
    assert anonymous.private_bytes >= mapped.private_bytes + 64 * 2**20


def test_quantized_artifacts_llama_cpp_repacks_count_as_private():
    """llama.cpp maps a GGUF file but repacks Q8_0/Q4 matrices into private memory; an F16 file stays mapped. A
    quantized ONNX graph below the external-data threshold is private too: the evaluation holds the larger copy."""
    config = _llama_1b_config("float32")

    def stages(gguf_types, onnx_quant):
        settings = resolve_compile_settings(None, {"compile": {"heal": False}, "gguf": {"outtypes": gguf_types},
                                                   "onnx": {"quant": onnx_quant}},
                                            "all", None, "none", "shortgpt", 4, None, None)
        return {p.stage: p for p in plan_compile(config, settings, "cpu").stages}

    f16, q8 = stages(["f16"], "none"), stages(["f16", "q8_0"], "none")
    pruned = ModelFootprint.from_config(config).without_layers(4).parameters
    assert q8["export_gguf"].private_bytes - f16["export_gguf"].private_bytes == int(8.5 / 8 * pruned)
    assert q8["evaluate"].private_bytes - f16["evaluate"].private_bytes == int(8.5 / 8 * pruned)
    int4 = stages(["f16"], "int4")
    assert int4["export_onnx"].private_bytes - f16["export_onnx"].private_bytes == int(4.5 / 8 * pruned)
    assert int4["evaluate"].private_bytes - f16["evaluate"].private_bytes == int(4.5 / 8 * pruned)


RECIPES_DIR = REPO_ROOT / "examples" / "recipes"
_SMOLLM2 = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                max_position_embeddings=8192, torch_dtype="bfloat16")
_GEMMA3_270M = dict(model_type="gemma3_text", hidden_size=640, num_hidden_layers=18, intermediate_size=2048,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                    sliding_window=512, query_pre_attn_scalar=256, max_position_embeddings=32768,
                    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
                    torch_dtype="bfloat16")
_LLAMA3_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                  tie_word_embeddings=False, max_position_embeddings=8192, torch_dtype="bfloat16")
_TWO_CORES = MachineMemory(24 * GIB, None, "cpu", 2)
_ONE_H100 = MachineMemory(128 * GIB, 80 * GIB, "cuda:0", 16, gpu_bytes=(80 * GIB,))
RECIPE_MACHINES = {
    # recipe: (the model's published shape, the machine its header names)
    "smollm2-135m-demo.toml": (_SMOLLM2, _TWO_CORES),
    "smollm2-135m-frontier.toml": (_SMOLLM2, _TWO_CORES),
    "smollm2-135m-width-frontier.toml": (_SMOLLM2, _TWO_CORES),
    "smollm2-135m-cpu.toml": (_SMOLLM2, _TWO_CORES),
    "smollm2-135m-dress.toml": (_SMOLLM2, _TWO_CORES),
    "smollm2-135m-recovery.toml": (_SMOLLM2, _TWO_CORES),
    "gemma3-270m.toml": (_GEMMA3_270M, _TWO_CORES),
    "gemma3-270m-frontier.toml": (_GEMMA3_270M, _TWO_CORES),
    "llama3-8b-gpu.toml": (_LLAMA3_8B, _ONE_H100),
}


def test_every_shipped_recipe_has_a_machine_here():
    assert sorted(RECIPE_MACHINES) == sorted(p.name for p in RECIPES_DIR.glob("*.toml"))


@pytest.mark.parametrize("name", sorted(RECIPE_MACHINES))
def test_shipped_recipe_resolves_and_fits_the_machine_it_names(name):
    """Every recipe a user can copy resolves (no unknown key, every value valid) and its whole compile fits the
    machine its header names, GPU machines included (the plan reads only the configuration)."""
    from transformers import AutoConfig

    shape, machine = RECIPE_MACHINES[name]
    values = dict(shape)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    settings = resolve_compile_settings(RECIPES_DIR / name, None, None, None, "default", None, None, None, None)
    plan = plan_compile(config, settings, machine.device, machine)
    plan.check()
    assert plan.work.removed_layers > 0 or settings["prune"].method.value in ("2ssp", "dress")
    if settings["heal"] is not None:  # what the recipe heals is what the plan counted
        assert "heal" in [stage.stage for stage in plan.stages]
