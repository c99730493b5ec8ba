"""Layer surgery on tiny models of every registered architecture."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_ARCHITECTURES, build_tiny_model

from slimllm.core.errors import UserInputError
from slimllm.models.architectures import decoder_layers
from slimllm.models.checkpoints import PRUNING_RECORD_FILE, save_pruned_checkpoint
from slimllm.models.layer_io import layer_output_tensor, lm_logits, trace_decoder
from slimllm.pruning.surgery import remove_layers

REMOVED = [1, 3, 4]
IDS = torch.tensor([[11, 250, 3000, 17, 42, 9, 1200, 5]])

RELOAD_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
for checkpoint, logits_file in zip(sys.argv[1::2], sys.argv[2::2]):
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        torch.save(model(torch.tensor([[11, 250, 3000, 17, 42, 9, 1200, 5]])).logits, logits_file)
assert 'slimllm' not in sys.modules
"""
CASES = [(arch_name, tied) for tied in (True, False) for arch_name in TINY_ARCHITECTURES]


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory, smollm2_tokenizer):
    """Every architecture's pruned checkpoint, saved, then reloaded in one fresh interpreter that never imports
    slimllm (one process start for all of them). Per case: the model, its pruned copy, the report, the saved
    directory and the logits plain transformers computed from it."""
    cases, args = {}, []
    for arch_name, tied in CASES:
        model = build_tiny_model(arch_name, tied)
        pruned, report = remove_layers(model, REMOVED)
        out = save_pruned_checkpoint(
            pruned, smollm2_tokenizer, tmp_path_factory.mktemp(f"{arch_name}-{tied}") / "pruned",
            {"method": "test", "removed_layers": REMOVED},
        )
        cases[arch_name, tied] = (model, pruned, report, out)
        args += [str(out), str(out.parent / "logits.pt")]
    subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, *args], check=True)
    return {key: (*value, torch.load(value[3].parent / "logits.pt")) for key, value in cases.items()}


@pytest.mark.parametrize("arch_name, tied", CASES)
def test_pruned_checkpoint_reloads_in_plain_transformers(arch_name, tied, reloaded):
    model, pruned, report, out, reloaded_logits = reloaded[arch_name, tied]
    assert report.kept_layers == [0, 2, 5] and report.removed_layers == REMOVED
    assert len(decoder_layers(model)) == 6, "the input model must be left untouched"
    assert pruned.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in decoder_layers(pruned)] == [0, 1, 2]
    if getattr(pruned.config, "layer_types", None) is not None:
        assert len(pruned.config.layer_types) == 3
    record = json.loads((out / PRUNING_RECORD_FILE).read_text())
    assert record["removed_layers"] == REMOVED and "transformers" in record["versions"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "generation_config.json").is_file()

    # Reloaded in a fresh interpreter that never imports slimllm: the same logits, bit for bit.
    with torch.no_grad():
        expected = pruned(IDS).logits
    torch.testing.assert_close(reloaded_logits, expected, rtol=0, atol=0)

    # The pruned logits really are those of the kept layers only, run in order (each with the arguments the dense
    # model gave it: position embeddings, and the mask of its attention type).
    trace = trace_decoder(model, IDS, keep_kwargs=True)
    dense_layers = decoder_layers(model)
    with torch.no_grad():
        hidden = trace.layer_inputs[0]
        for i in report.kept_layers:
            hidden = layer_output_tensor(dense_layers[i](hidden, **trace.layer_kwargs[i]))
        manual = lm_logits(model, hidden)
    torch.testing.assert_close(manual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch_name", TINY_ARCHITECTURES)
def test_generate_with_kv_cache_after_pruning(arch_name):
    pruned, _ = remove_layers(build_tiny_model(arch_name), REMOVED)
    with torch.no_grad():
        cached = pruned.generate(IDS, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=2)
        uncached = pruned.generate(IDS, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=2)
    assert cached.shape == (1, IDS.shape[1] + 12)
    assert torch.equal(cached, uncached)


def test_sliding_window_range_becomes_explicit_list():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=3,
    )
    assert config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    pruned, _ = remove_layers(Qwen2ForCausalLM(config), [1, 4])
    assert pruned.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert pruned.config.max_window_layers == 2
    assert [layer.self_attn.sliding_window for layer in decoder_layers(pruned)] == [None, None, 4, 4]


@pytest.mark.parametrize(
    ("removed", "message"),
    [([6], "out of range"), ([-1], "out of range"), (list(range(6)), "cannot remove all")],
)
def test_bad_removals(removed, message):
    with pytest.raises(UserInputError, match=message):
        remove_layers(build_tiny_model("llama"), removed)
