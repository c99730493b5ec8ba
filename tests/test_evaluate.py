import math

import pytest
import torch
from conftest import EVAL_FILE

from slimllm.core.errors import UserInputError
from slimllm.evaluation.perplexity import (
    EvalSettings,
    compare_with_reference,
    evaluate_model,
    split_windows,
    torch_logits_fn,
)
from slimllm.models.loading import load_model


def test_perplexity_matches_transformers_loss(tiny_model_dir, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("\n".join(EVAL_FILE.read_text(encoding="utf-8").splitlines()[:60]))
    loaded = load_model(str(tiny_model_dir("qwen2")), device="cpu")
    result = evaluate_model(loaded, EvalSettings(data=str(text), seq_len=64, max_windows=5))
    assert result.windows == 5 and result.tokens_scored == 5 * 63
    # Independent reference: transformers' own shifted LM loss on the same windows.
    ids = loaded.tokenizer(
        "\n\n".join(line for line in text.read_text().splitlines() if line.strip()), return_tensors="pt"
    ).input_ids[0]
    losses, second_halves = [], []
    with torch.no_grad():
        for w in range(5):
            window = ids[w * 64 : (w + 1) * 64][None]
            losses.append(float(loaded.model(window, labels=window).loss))
            # llama-perplexity's protocol: only the tokens predicted from position 32 on (labels 33..63)
            labels = window.clone()
            labels[:, :33] = -100
            second_halves.append(float(loaded.model(window, labels=labels).loss))
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    assert result.tokens_scored_second_half == 5 * 31
    assert result.perplexity_second_half == pytest.approx(math.exp(sum(second_halves) / 5), rel=1e-5)


def test_split_windows_errors():
    with pytest.raises(UserInputError, match="fewer than one window"):
        split_windows(torch.arange(10), 64)
    with pytest.raises(UserInputError, match="--max-windows"):
        split_windows(torch.arange(100), 10, 0)


def test_compare_with_reference_identity(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir("llama")), device="cpu")
    windows = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    fn = torch_logits_fn(loaded.model)
    other = load_model(str(tiny_model_dir("llama", num_layers=4)), device="cpu")
    ref, results = compare_with_reference(fn, {"same": fn, "other": torch_logits_fn(other.model)}, windows)
    assert results["same"].kl_to_reference == pytest.approx(0.0, abs=1e-6)
    assert results["same"].top1_agreement == 1.0
    assert results["same"].perplexity == pytest.approx(ref.perplexity)
    assert results["other"].kl_to_reference > 1e-4
    assert results["other"].top1_agreement < 1.0


@pytest.mark.integration
def test_smollm2_perplexity_on_wikitext():
    loaded = load_model("smollm2-135m", device="cpu")
    result = evaluate_model(loaded, EvalSettings(data=str(EVAL_FILE), seq_len=1024, max_windows=4))
    assert 15 < result.perplexity < 35
    assert result.tokens_scored == 4 * 1023
