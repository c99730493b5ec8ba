"""The latency profiler: FLOPs arithmetic, profile files, a short real run on every backend, and Ctrl-C."""

import json

import pytest
import torch

from slimllm.core.errors import UserInputError
from slimllm.latency.profiler import ModelArtifacts, run_profile
from slimllm.latency.profiles import BackendSpec, TargetProfile, available_profiles, load_profile
from slimllm.models.flops import ModelShape, ideal_speedup

# Hand-computed: per layer 8*4*(2*2 + 2*1) + 3*8*16 = 576 weights; LM head 2*10*8 = 160 FLOPs per position.
DENSE = ModelShape(layers=4, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10)
PRUNED = ModelShape(layers=3, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4, vocab=10)


def test_layer_parameters_by_hand():
    assert DENSE.layer_params == 576


def test_decode_flops_by_hand():
    # One token at context c: L * (2*576 + 4*2*4*c) + 160.
    assert DENSE.decode_flops(1) == 4 * (1152 + 32) + 160 == 4896
    # tg2 from an empty cache: contexts 1 and 2.
    assert DENSE.generation_flops(2) == 4896 + 5024
    assert PRUNED.generation_flops(2) == 3712 + 3808
    assert ideal_speedup(DENSE, PRUNED, "decode", 2) == pytest.approx(9920 / 7520)


def test_prefill_flops_by_hand():
    # 3 prompt tokens: projections 3 * 1152, attention 32 * (1 + 2 + 3) per layer.
    assert DENSE.prefill_flops(3) == 4 * (3456 + 192) + 160 == 14752
    assert DENSE.prefill_flops(3, logits_for_every_position=True) == 4 * 3648 + 3 * 160
    assert ideal_speedup(DENSE, PRUNED, "prefill", 3) == pytest.approx(14752 / 11104)
    assert ideal_speedup(DENSE, PRUNED, "prefill", 3, True) == pytest.approx(15072 / 11424)


def test_blocks_without_attention_and_narrower_ffns_by_hand():
    """2SSP: every block's MLP at the pruned width, attention only in the blocks that keep it."""
    two_ssp = ModelShape(layers=4, hidden=8, intermediate=8, heads=2, kv_heads=1, head_dim=4, vocab=10,
                         attention_free=1)
    # Attention 3 * (2*192 + 32*c), MLPs 4 * 2*192, LM head 160.
    assert two_ssp.decode_flops(1) == 3 * (384 + 32) + 4 * 384 + 160 == 2944
    assert two_ssp.prefill_flops(3) == 3 * (3 * 384 + 32 * 6) + 4 * 3 * 384 + 160
    assert ideal_speedup(DENSE, two_ssp, "decode", 1) == pytest.approx(4896 / 2944)


def test_shape_reads_blocks_without_attention_from_the_config(tmp_path):
    from conftest import build_tiny_model

    from slimllm.models.attention_free import remove_attention

    slim = remove_attention(build_tiny_model("llama", num_layers=4), [2, 3])
    assert ModelShape.from_config(slim.config).attention_free == 2
    assert ModelShape.from_config(slim.config.to_dict()).attention_free == 2


def test_lm_head_keeps_the_ideal_below_the_layer_ratio():
    assert ideal_speedup(DENSE, PRUNED, "decode", 128) < 4 / 3


def test_shape_from_a_real_config(tiny_model_dir):
    from transformers import AutoConfig

    # Qwen3 with an explicit head_dim (32), not hidden / heads (16).
    shape = ModelShape.from_config(AutoConfig.from_pretrained(tiny_model_dir("qwen3")))
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (6, 64, 4, 2, 32)


@pytest.mark.parametrize("name", available_profiles())
def test_shipped_profiles_parse(name):
    profile = load_profile(name)
    assert profile.backends and profile.repeats >= 1
    assert {"cpu-x86", "cuda", "jetson-orin", "apple-silicon"} <= set(available_profiles())


def test_unknown_profile_keys_are_listed_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[profile]\nname = "x"\nthread = 2\n[[backend]]\nkind = "torch"\ndtyp = "fp32"\n[extra]\na = 1\n'
    )
    with pytest.raises(UserInputError) as error:
        load_profile(path)
    message = str(error.value)
    assert "profile.thread" in message and "backend[0].dtyp" in message and "[extra]" in message


def test_profile_errors(tmp_path):
    with pytest.raises(UserInputError, match="unknown profile 'nope'; use one of"):
        load_profile("nope")
    path = tmp_path / "empty.toml"
    path.write_text('[profile]\nname = "x"\n')
    with pytest.raises(UserInputError, match="names no \\[\\[backend\\]\\]"):
        load_profile(path)
    with pytest.raises(UserInputError, match="unknown backend kind 'tflite'"):
        BackendSpec(kind="tflite")


def test_backend_that_cannot_run_here_is_a_clear_error(tiny_model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; this checks the message shown without one")
    profile = TargetProfile(name="gpu", backends=[BackendSpec(kind="onnxruntime", device="cuda", dtype="fp16")])
    artifacts = ModelArtifacts(tiny_model_dir("llama"))
    with pytest.raises(UserInputError, match="--provider cuda requested"):
        run_profile(artifacts, artifacts, profile, tmp_path / "latency")


@pytest.fixture(scope="module")
def pruned_tiny(tiny_model_dir, tmp_path_factory):
    from slimllm.models.checkpoints import save_pruned_checkpoint
    from slimllm.models.loading import load_model
    from slimllm.pruning.surgery import remove_layers

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    pruned, _ = remove_layers(loaded.model, [1, 3])
    return save_pruned_checkpoint(pruned, loaded.tokenizer, tmp_path_factory.mktemp("p") / "pruned", {"method": "t"})


def _tiny_profile() -> TargetProfile:
    return TargetProfile(
        name="tiny",
        threads=2,
        prompt_lengths=[16, 32],
        generate_tokens=8,
        repeats=2,
        warmup=1,
        backends=[
            BackendSpec(kind="torch"),
            BackendSpec(kind="onnxruntime"),
            BackendSpec(kind="genai"),
            BackendSpec(kind="llama.cpp", gguf_types=["q8_0"]),
        ],
    )


@pytest.mark.slow
def test_short_profile_on_every_backend(tiny_model_dir, pruned_tiny, tmp_path):
    out = tmp_path / "latency"
    result = run_profile(ModelArtifacts(tiny_model_dir("llama")), ModelArtifacts(pruned_tiny), _tiny_profile(), out)
    assert not result.partial
    assert set(result.summary) == {
        "torch fp32 (cpu)", "onnxruntime fp32 (cpu)", "genai fp32 (cpu)", "llama.cpp (cpu) Q8_0",
    }
    for entry in result.summary.values():
        for name in ("dense", "pruned"):
            stats = entry["models"][name]
            assert stats["decode_tokens_per_s"]["n"] == 2 and stats["decode_tokens_per_s"]["median"] > 0
            assert set(stats["prefill_tokens_per_s"]) == {"16", "32"} and stats["peak_rss_mib"] > 10
        # 6 -> 4 layers: the LM head runs in both models, so the ideal lies strictly between 1 and 6/4.
        assert 1.0 < entry["speedups"]["tg8"]["ideal"] < 6 / 4
    assert result.summary["onnxruntime fp32 (cpu)"]["lm_head_positions"] == "all"
    payload = json.loads((out / "latency.json").read_text())
    assert payload["machine"]["cpu_count"] and payload["versions"]["torch"] and payload["threads"] == 2
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "latency.md").read_text()
    assert "llama.cpp (cpu) Q8_0 | pruned" in markdown and "tg8 tok/s" in markdown
    # The exports made for profiling passed their parity checks and are reused by a second run.
    assert json.loads((out / "artifacts" / "pruned" / "onnx-optimum-fp32" / "validation.json").read_text())["passed"]
    profile = _tiny_profile()
    profile.backends, profile.repeats, profile.warmup = [BackendSpec(kind="onnxruntime")], 1, 0
    again = run_profile(ModelArtifacts(tiny_model_dir("llama")), ModelArtifacts(pruned_tiny), profile, out)
    assert not [note for note in again.notes if note.startswith("exported")], again.notes


def _onnx_only_profile() -> TargetProfile:
    return TargetProfile(
        name="onnx-only", threads=2, prompt_lengths=[8], generate_tokens=4, repeats=1, warmup=0,
        backends=[BackendSpec(kind="onnxruntime")],
    )


@pytest.mark.slow
def test_exports_left_by_a_profile_of_another_model_are_not_reused(tiny_model_dir, pruned_tiny, tmp_path):
    """A second profile into the same directory with another pruned model measures that model, not the first."""
    from slimllm.core.artifacts import sha256_tree
    from slimllm.exporters.records import read_export_record
    from slimllm.models.checkpoints import save_pruned_checkpoint
    from slimllm.models.loading import load_model
    from slimllm.pruning.surgery import remove_layers

    out = tmp_path / "latency"
    dense = tiny_model_dir("llama")
    run_profile(ModelArtifacts(dense), ModelArtifacts(pruned_tiny), _onnx_only_profile(), out)
    loaded = load_model(str(dense), device="cpu")
    other, _ = remove_layers(loaded.model, [0, 2, 4])
    other_dir = save_pruned_checkpoint(other, loaded.tokenizer, tmp_path / "other", {"method": "t"})
    result = run_profile(ModelArtifacts(dense), ModelArtifacts(other_dir), _onnx_only_profile(), out)
    record = read_export_record(out / "artifacts" / "pruned" / "onnx-optimum-fp32")
    assert record["source_sha256"] == sha256_tree(other_dir) != sha256_tree(pruned_tiny)
    assert "exported pruned to ONNX (optimum-fp32) for profiling" in result.notes
    assert "exported dense to ONNX (optimum-fp32) for profiling" not in result.notes  # same dense: reused
    assert json.loads((out / "latency.json").read_text())["models"]["pruned"]["shape"]["layers"] == 3


@pytest.mark.slow
def test_a_failed_backend_leaves_a_partial_report_that_names_it(tiny_model_dir, pruned_tiny, tmp_path):
    """One backend failing (here a corrupt ONNX file) does not hide the others, and the report says what failed."""
    from slimllm.latency.profiler import ProfileIncompleteError

    corrupt = tmp_path / "corrupt-onnx"
    corrupt.mkdir()
    (corrupt / "model.onnx").write_bytes(b"not an onnx model")
    profile = _onnx_only_profile()
    profile.backends = [BackendSpec(kind="onnxruntime"), BackendSpec(kind="torch")]
    pruned = ModelArtifacts(pruned_tiny, onnx={"optimum-fp32": corrupt})
    out = tmp_path / "latency"
    with pytest.raises(ProfileIncompleteError, match=r"backend onnxruntime fp32 \(cpu\) failed"):
        run_profile(ModelArtifacts(tiny_model_dir("llama")), pruned, profile, out)
    payload = json.loads((out / "latency.json").read_text())
    assert payload["partial"] is True and list(payload["summary"]) == ["torch fp32 (cpu)"]
    assert "cannot load" in payload["failed_backends"]["onnxruntime fp32 (cpu)"]
    assert "backend onnxruntime fp32 (cpu) failed" in (out / "latency.md").read_text()


@pytest.mark.slow
def test_interrupt_leaves_a_partial_report(tiny_model_dir, pruned_tiny, tmp_path, monkeypatch):
    import slimllm.latency.profiler as profiler

    calls = {"n": 0}
    real_measure = profiler._Worker.measure

    def measure_then_interrupt(self, prompts, tokens):
        calls["n"] += 1
        if calls["n"] > 2 * (1 + 1):  # the first backend (warm-up + 1 repeat, two models) finishes
            raise KeyboardInterrupt
        return real_measure(self, prompts, tokens)

    monkeypatch.setattr(profiler._Worker, "measure", measure_then_interrupt)
    profile = _tiny_profile()
    profile.repeats = 1
    profile.backends = [BackendSpec(kind="torch"), BackendSpec(kind="llama.cpp", gguf_types=["q8_0"])]
    out = tmp_path / "latency"
    with pytest.raises(KeyboardInterrupt):
        run_profile(ModelArtifacts(tiny_model_dir("llama")), ModelArtifacts(pruned_tiny), profile, out)
    payload = json.loads((out / "latency.json").read_text())
    assert payload["partial"] is True and list(payload["summary"]) == ["torch fp32 (cpu)"]
    assert "PARTIAL REPORT" in (out / "latency.md").read_text()


def test_torch_backend_loads_blocks_without_attention_in_a_fresh_process(tmp_path):
    """The profiler measures in worker processes: they must know slimllm's own model types without the caller's
    imports (a 2SSP checkpoint failed there once)."""
    import subprocess
    import sys

    from conftest import build_tiny_model

    from slimllm.models.attention_free import remove_attention

    remove_attention(build_tiny_model("llama", num_layers=4), [2]).save_pretrained(tmp_path / "m")
    code = (
        "import sys; from pathlib import Path; from slimllm.latency.backends import TorchRunner; "
        "from slimllm.latency.profiles import BackendSpec; "
        "runner = TorchRunner(BackendSpec(kind='torch'), Path(sys.argv[1]), 1); "
        "print(runner.prefill([5, 6, 7, 8]) > 0)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]
