"""Shared fixtures: tiny random-weight models for every registered architecture, the real SmolLM2-135M, data paths.

Tiny models use SmolLM2's real tokenizer (49,152-entry BPE vocabulary) so that exporters and llama.cpp can load them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from slimllm.models.architectures import ARCHITECTURES

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("SLIMLLM_DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "wikitext2"))
CALIB_FILE = DATA_DIR / "wiki.valid.tokens"
EVAL_FILE = DATA_DIR / "wiki.test.raw"


def _tiny_config(arch_name: str, tied: bool, num_layers: int = 6, hidden: int = 64, sliding_window: int | None = None):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=49152,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rope_theta=10000.0,
    )
    factories = {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=sliding_window),
        "qwen2": lambda: Qwen2Config(
            **common, use_sliding_window=sliding_window is not None, sliding_window=sliding_window or 4096
        ),
        # Qwen3-0.6B/4B style: head_dim (here 2x) differs from hidden_size / num_attention_heads.
        "qwen3": lambda: Qwen3Config(
            **common,
            head_dim=2 * hidden // 4,
            use_sliding_window=sliding_window is not None,
            sliding_window=sliding_window or 4096,
        ),
        # Gemma 3 style: q/k norms, (1 + w) norms, a scaled embedding, two local layers to one global (the real
        # model has five to one). Without a requested window, the window covers the whole context.
        "gemma3": lambda: Gemma3TextConfig(
            **common,
            head_dim=2 * hidden // 4,
            sliding_window=sliding_window or 1024,
            layer_types=["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)],
            query_pre_attn_scalar=2 * hidden // 4,
        ),
    }
    return factories[arch_name]()


TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
"""One tiny fixture per registry entry; `test_registry_has_tiny_fixtures` keeps the two in step."""


TINY_COMPILE_SECTION = """
[compile]
eval_seq_len = 64
eval_windows = 2
eval_task = "none"
heal = false
"""
"""[compile] of the tiny compile runs: short evaluation, no HellaSwag, no healing."""

TINY_GGUF_SECTION = """
[gguf]
outtypes = ["q8_0"]
tokenizer_lines = 20
"""
"""[gguf] of the tiny compile runs: one Q8_0 file, a short tokenizer check."""


def build_tiny_model(
    arch_name: str,
    tied: bool = True,
    num_layers: int = 6,
    seed: int = 0,
    hidden: int = 64,
    sliding_window: int | None = None,
):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch_name, tied, num_layers, hidden, sliding_window))
    # Random init at std 0.02 makes every layer nearly an identity; larger weights give layers real work to do.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embed" not in name and "lm_head" not in name:
                param.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a cached HF directory (dequantized once per machine)."""
    from slimllm.models.loading import materialize_embedded

    return materialize_embedded("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """Factory: saves (once) a tiny random model of an architecture with SmolLM2's tokenizer; returns its dir."""
    cache: dict[tuple, Path] = {}

    def make(
        arch_name: str = "llama",
        tied: bool = True,
        num_layers: int = 6,
        hidden: int = 64,
        sliding_window: int | None = None,
    ) -> Path:
        """`hidden=256` gives rows that split into K-quant super-blocks; `sliding_window` a windowed attention."""
        key = (arch_name, tied, num_layers, hidden, sliding_window)
        if key not in cache:
            name = f"tiny-{arch_name}-{'tied' if tied else 'untied'}-{num_layers}-h{hidden}-w{sliding_window}"
            path = tmp_path_factory.mktemp(name)
            build_tiny_model(arch_name, tied, num_layers, hidden=hidden, sliding_window=sliding_window).save_pretrained(
                path
            )
            smollm2_tokenizer.save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A small plain-text calibration file cut from the WikiText-2 validation split."""
    lines = CALIB_FILE.read_text(encoding="utf-8-sig").splitlines()[:400]
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def registered_architecture_names() -> list[str]:
    return [arch.name for arch in ARCHITECTURES]


IDENTITY_LAYER = 2
"""The layer of `model_with_identity_layer` that computes nothing."""


@pytest.fixture(scope="session")
def model_with_identity_layer(smollm2_tokenizer):
    """A tiny Llama trained on real text in which layer 2 is an exact identity (zero output projections); trained
    once for the baseline and TRSP tests, which must not change it (copy it first)."""
    from slimllm.models.architectures import decoder_layers

    model = build_tiny_model("llama", num_layers=5, seed=1).train()
    layer = decoder_layers(model)[IDENTITY_LAYER]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    for param in layer.parameters():
        param.requires_grad_(False)
    text = "\n\n".join(CALIB_FILE.read_text(encoding="utf-8-sig").splitlines()[:300])
    ids = smollm2_tokenizer(text, return_tensors="pt").input_ids[0]
    blocks = ids[: (ids.numel() // 64) * 64].view(-1, 64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):
        batch = blocks[torch.randint(0, blocks.shape[0], (8,), generator=generator)]
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model, blocks[:8]
