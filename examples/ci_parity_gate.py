"""A CI gate: re-check every artifact of a compile run against its checkpoint and fail on any regression.

    python examples/ci_parity_gate.py runs/demo          # exit 0: all match; exit 1: lists every failed figure

Run it after upgrading onnxruntime, llama.cpp or transformers in a deployment image: the same bounds as at export
time apply (they are read from each export's slimllm_export.json). In a pipeline that builds the artifacts, the
build step itself already fails on a mismatch: `slimllm compile ...` exits non-zero naming the stage and figure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slimllm.core.errors import SlimllmError
from slimllm.exporters.validate import validate_artifact


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="A `slimllm compile --out` directory.")
    args = parser.parse_args()
    artifacts = [args.run_dir / "onnx"] if (args.run_dir / "onnx" / "model.onnx").is_file() else []
    artifacts += sorted((args.run_dir / "gguf").glob("*.gguf"))
    if not artifacts:
        print(f"no ONNX or GGUF artifacts under {args.run_dir}", file=sys.stderr)
        return 2
    failures = 0
    for artifact in artifacts:
        try:
            report = validate_artifact(artifact)
        except SlimllmError as exc:
            print(f"FAIL {artifact}: {exc}")
            failures += 1
            continue
        status = "ok  " if report.passed else "FAIL"
        print(f"{status} {artifact}")
        for check in report.failures():
            print(f"       {check.describe()}")
        failures += not report.passed
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
