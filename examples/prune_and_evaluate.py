"""Prune the embedded SmolLM2-135M with ShortGPT through the Python API and compare perplexities.

    python examples/prune_and_evaluate.py --out runs/example-pruned

Uses the shared WikiText-2 files when they sit beside the repository, else the hub's wikitext2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import slimllm
from slimllm.core.data import shared_data_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/example-pruned"))
    parser.add_argument("--remove", type=int, default=8)
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()

    data = shared_data_dir()
    calib = str(data / "wiki.valid.tokens") if data.is_dir() else "wikitext2"
    evaluation = str(data / "wiki.test.raw") if data.is_dir() else "wikitext2"

    settings = slimllm.PruneSettings(method="shortgpt", remove=args.remove, calib=calib)
    result = slimllm.run_prune("smollm2-135m", settings, args.out, force=True)
    print(f"removed layers {result.removed_layers} in {result.seconds:.1f} s")

    eval_settings = slimllm.EvalSettings(data=evaluation, seq_len=1024, max_windows=args.windows)
    for name in ("smollm2-135m", str(args.out)):
        ppl = slimllm.evaluate_model(slimllm.load_model(name), eval_settings).perplexity
        print(f"{name}: perplexity {ppl:.2f}")


if __name__ == "__main__":
    main()
