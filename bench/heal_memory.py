"""Memory that healing needs per scope (full, LoRA) for a 1B and an 8B model with a quarter of their layers removed.

    python bench/heal_memory.py

An estimate from exact parameter counts (the models are built on the meta device from their published configs, so
nothing is downloaded or allocated), not a measurement. What it counts, in bytes:

- scope full: the student's fp32 master weights, fp32 gradients and AdamW's two fp32 moments (16 bytes/parameter);
- scope lora: the student's frozen weights in bf16 (2 bytes/parameter) and the adapters' fp32 weights, gradients and
  moments (16 bytes per adapter parameter), rank 16 on q/k/v/o/gate/up/down;
- both: the dense teacher in bf16 (2 bytes/parameter) and the fp32 logits of one batch of 2 x 512 tokens, four times
  (student and teacher logits and their log-softmax, which the KL term keeps for backward).

Layer activations kept for backward are not counted: they grow with batch x length (and shrink with gradient
checkpointing). Writes bench/results/heal-memory.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimllm.core.artifacts import atomic_write_json, atomic_write_text, library_versions, machine_info  # noqa: E402
from slimllm.recovery.healing import LORA_TARGETS  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"

MODELS = {
    # Published configs (hidden, layers, FFN, heads, KV heads, vocabulary, tied embeddings).
    "Llama-3.2-1B": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.1-8B": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
GIB = 2**30


def build_on_meta(config_values: dict, layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**config_values, "num_hidden_layers": layers})
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors are counted once


def lora_parameter_count(model: nn.Module, rank: int) -> int:
    return sum(
        rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
    )


def estimate(name: str, values: dict, removed_fraction: float, rank: int, batch_tokens: int) -> dict:
    layers = values["num_hidden_layers"]
    kept = layers - round(layers * removed_fraction)
    teacher = parameter_count(build_on_meta(values, layers))
    student_model = build_on_meta(values, kept)
    student = parameter_count(student_model)
    adapters = lora_parameter_count(student_model, rank)
    logits = 4 * batch_tokens * values["vocab_size"] * 4
    teacher_bytes = 2 * teacher
    full = 16 * student + teacher_bytes + logits
    lora = 2 * student + 16 * adapters + teacher_bytes + logits
    return {
        "model": name,
        "layers": layers,
        "kept_layers": kept,
        "teacher_params": teacher,
        "student_params": student,
        "lora_rank": rank,
        "lora_params": adapters,
        "batch_tokens": batch_tokens,
        "full_gib": full / GIB,
        "lora_gib": lora / GIB,
        "parts_gib": {
            "full_student_weights_grads_adam": 16 * student / GIB,
            "lora_student_bf16": 2 * student / GIB,
            "lora_adapters_weights_grads_adam": 16 * adapters / GIB,
            "teacher_bf16": teacher_bytes / GIB,
            "logits": logits / GIB,
        },
    }


def write_markdown(path: Path, payload: dict) -> None:
    lines = [
        "# Healing memory per scope (estimate)",
        "",
        f"Command: `{payload['command']}`",
        "",
        "Exact parameter counts, bytes per parameter as `bench/heal_memory.py` states; layer activations not counted.",
        "",
        "| model | layers kept | student params | LoRA params (rank 16) | full | lora |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in payload["rows"]:
        lines.append(
            f"| {row['model']} | {row['kept_layers']}/{row['layers']} | {row['student_params'] / 1e9:.2f}B | "
            f"{row['lora_params'] / 1e6:.1f}M | {row['full_gib']:.1f} GiB | {row['lora_gib']:.1f} GiB |"
        )
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()) + ".", ""]
    atomic_write_text(path, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--removed-fraction", type=float, default=0.25)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    rows = [estimate(name, values, args.removed_fraction, args.lora_rank, args.batch_tokens)
            for name, values in MODELS.items()]
    payload = {
        "benchmark": "heal-memory",
        "kind": "estimate from exact parameter counts",
        "command": f"python bench/heal_memory.py --removed-fraction {args.removed_fraction} "
                   f"--lora-rank {args.lora_rank} --batch-tokens {args.batch_tokens}",
        "rows": rows,
        "machine": machine_info(),
        "versions": library_versions(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out_dir / "heal-memory.json", payload)
    write_markdown(args.out_dir / "heal-memory.md", payload)
    for row in rows:
        print(f"{row['model']}: full {row['full_gib']:.1f} GiB, lora {row['lora_gib']:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
