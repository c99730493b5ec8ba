"""Compile the embedded SmolLM2-135M through the Python API: the same run as `make demo`.

    python examples/compile_api.py --out runs/api-demo

`slimllm.compile` returns the run's manifest; every stage's figures are in it, and the report is on disk.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import slimllm
from slimllm.core.data import shared_data_dir

REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/api-demo"))
    parser.add_argument("--recipe", type=Path, default=REPO_ROOT / "examples" / "recipes" / "smollm2-135m-demo.toml")
    args = parser.parse_args()
    eval_file = shared_data_dir() / "wiki.test.raw"
    result = slimllm.compile(
        "smollm2-135m",
        out=args.out,
        recipe=args.recipe,
        eval_data=str(eval_file) if eval_file.is_file() else None,
    )
    stages = result.manifest["stages"]
    print("removed layers:", stages["prune"]["result"]["removed_layers"])
    for name, ppl in stages["evaluate"]["result"]["perplexity"].items():
        print(f"  {name}: {ppl:.2f}")
    print("report:", result.report_path)


if __name__ == "__main__":
    main()
