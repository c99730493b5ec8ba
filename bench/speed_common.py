"""Shared setup of the speed benchmarks: the dense SmolLM2-135M, an 8-layer-pruned copy, and a profiler run.

The pruned copy is made with ShortGPT on WikiText-2 validation text (12 s): latency depends on how many layers
are left, not on which. Results go to bench/results/<name>.{json,md,png} with the command that made them.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimllm.core.artifacts import atomic_write_json, atomic_write_text  # noqa: E402
from slimllm.core.data import shared_data_dir  # noqa: E402
from slimllm.latency.profiler import ModelArtifacts, run_profile  # noqa: E402
from slimllm.latency.profiles import TargetProfile  # noqa: E402
from slimllm.models.loading import checkpoint_directory  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
WORK_DIR = REPO_ROOT / "runs" / "bench"
DATA_DIR = shared_data_dir()
HELLASWAG_FILE = DATA_DIR.parent / "hellaswag" / "hellaswag_val_full.txt"


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pruned", type=Path, default=None, help="Pruned checkpoint (default: ShortGPT, k=8).")
    parser.add_argument("--remove", type=int, default=8)
    parser.add_argument("--calib", default=str(DATA_DIR / "wiki.valid.tokens"))
    parser.add_argument("--eval-data", default=str(DATA_DIR / "wiki.test.raw"))
    parser.add_argument("--threads", type=int, default=0, help="0: every core.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR)
    parser.add_argument("--tag", default="", help="Suffix of the result file names (2ssp for a --pruned 2SSP run).")
    return parser


def pruned_checkpoint(args) -> Path:
    """The ShortGPT k-layer prune of `--model` on `--calib`, made once per content: its directory is named by a hash
    of the model's and the calibration text's content and the settings, so another model or text never reuses it."""
    if args.pruned is not None:
        return args.pruned
    from slimllm.core.artifacts import content_id, digest
    from slimllm.pruning.stage import PruneSettings, run_prune

    settings = PruneSettings(method="shortgpt", remove=args.remove, calib=args.calib, calib_blocks=16, block_len=512)
    key = digest({"model": content_id(checkpoint_directory(args.model)), "calib": content_id(args.calib),
                  "settings": settings})
    target = args.work_dir / f"pruned-shortgpt-k{args.remove}-{key[:12]}"
    if not (target / "config.json").is_file():
        run_prune(args.model, settings, target, force=True)
    return target


def exported_gguf(checkpoint: Path, target: Path, gguf_types: list[str], eval_data: str | None = None) -> dict:
    """The checkpoint's GGUF files by type (F16, Q8_0 ...), exported and checked by slimllm into `target` unless an
    earlier export of this checkpoint's content with the same settings is there."""
    from slimllm.core.artifacts import sha256_tree
    from slimllm.exporters.gguf import GgufExportSettings, export_gguf
    from slimllm.exporters.records import export_or_reuse

    settings = GgufExportSettings(outtypes=gguf_types, eval_data=eval_data, eval_windows=2)
    export_or_reuse(export_gguf, checkpoint, target, sha256_tree(checkpoint), settings)
    return {t.upper(): next(target.glob(f"*-{t.upper()}.gguf")) for t in gguf_types}


def run(name: str, profile: TargetProfile, args) -> None:
    name = f"{name}-{args.tag}" if args.tag else name
    dense = checkpoint_directory(args.model)
    pruned = pruned_checkpoint(args)
    out = args.work_dir / name
    result = run_profile(
        ModelArtifacts(dense), ModelArtifacts(pruned), profile, out, eval_data=args.eval_data, force=True
    )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = dict(result.payload)
    payload["command"] = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    atomic_write_json(RESULTS_DIR / f"{name}.json", payload)
    markdown = (out / "latency.md").read_text()
    command_line = f"\n\nCommand: `{payload['command']}`\n\n"
    atomic_write_text(RESULTS_DIR / f"{name}.md", markdown.replace("\n\n", command_line, 1))
    shutil.copy2(out / "latency.png", RESULTS_DIR / f"{name}.png")
    print(markdown)
    print(f"wrote {RESULTS_DIR / name}.json, .md and .png")
