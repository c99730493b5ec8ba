"""Deployment frontier benchmark: `slimllm frontier` on an embedded model, with its result files under bench/results.

    python bench/frontier.py --model smollm2-135m --recipe examples/recipes/smollm2-135m-frontier.toml
    python bench/frontier.py --model gemma3-270m --recipe examples/recipes/gemma3-270m-frontier.toml

Writes bench/results/frontier-<model>.{json,md} and frontier-<model>-<backend>.png: every candidate's size, decode
and prefill tokens/s, KLD against the dense model, perplexity, HellaSwag and peak memory; the Pareto set per backend;
and the wall time split into preparing the models (pruning and healing) and measuring them. The work directory
(`--out`) keeps every model, export and measurement, so a rerun measures only what changed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speed_common import REPO_ROOT, RESULTS_DIR  # noqa: E402

from slimllm.core.artifacts import atomic_write_json, atomic_write_text, library_versions, machine_info  # noqa: E402


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--recipe", type=Path,
                        default=REPO_ROOT / "examples" / "recipes" / "smollm2-135m-frontier.toml")
    parser.add_argument("--profile", default="cpu-x86")
    parser.add_argument("--out", type=Path, default=None, help="Work directory (default: runs/frontier-<model>).")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", default="", help="Suffix of the result file names (frontier-<model>-<tag>).")
    return parser.parse_args(argv)


def _markdown(payload: dict, frontier_md: str, slug: str, command: str) -> str:
    seconds = payload["seconds"]
    measuring = sum(v for k, v in seconds.items() if k not in ("models", "total"))
    machine, versions = payload["machine"], payload["versions"]
    body = re.sub(r"\]\(frontier-([^)]+)\.png\)", rf"](frontier-{slug}-\1.png)", frontier_md.split("\n", 1)[1])
    return "\n".join([
        f"# Deployment frontier: {payload['model']} on {payload['profile']['name']}",
        "",
        f"Command: `{command}`",
        "",
        f"Candidates: {len(payload['candidates'])}. Wall time: {seconds['total']:.0f} s, of which preparing the "
        f"models (pruning and healing) {seconds.get('models', 0):.0f} s and measuring {measuring:.0f} s "
        f"(exports {seconds.get('exports', 0):.0f} s, KLD and perplexity {seconds.get('quality', 0):.0f} s, task "
        f"{seconds.get('task', 0):.0f} s, latency {seconds.get('latency', 0):.0f} s).",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_count']} cores), {machine.get('gpu', 'no GPU')}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        body,
    ])


def main(argv: list[str] | None = None) -> int:
    from slimllm.core.settings import build_settings
    from slimllm.frontier.run import run_frontier
    from slimllm.frontier.settings import FrontierSettings
    from slimllm.pipeline.recipes import load_recipe

    args = _arguments(argv)
    slug = re.sub(r"[^a-z0-9.]+", "-", f"{args.model} {args.tag}".lower()).strip("-")
    out = args.out or REPO_ROOT / "runs" / f"frontier-{slug}"
    sections = load_recipe(args.recipe)
    settings = build_settings(FrontierSettings, sections.get("frontier"), {}, "[frontier]")
    started = time.perf_counter()
    run_frontier(args.model, settings, args.profile, out, sections)
    recipe = args.recipe.resolve()
    recipe = recipe.relative_to(REPO_ROOT) if recipe.is_relative_to(REPO_ROOT) else recipe
    command = f"python bench/frontier.py --model {args.model} --recipe {recipe} --profile {args.profile}" + (
        f" --tag {args.tag}" if args.tag else "")
    payload = json.loads((out / "frontier.json").read_text())
    payload |= {"command": command, "bench_seconds": time.perf_counter() - started,
                "machine": machine_info(), "versions": library_versions()}
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results / f"frontier-{slug}.json", payload)
    atomic_write_text(results / f"frontier-{slug}.md", _markdown(payload, (out / "frontier.md").read_text(), slug,
                                                                  command))
    for chart in out.glob("frontier-*.png"):
        shutil.copy2(chart, results / f"frontier-{slug}-{chart.name.removeprefix('frontier-')}")
    print(f"wrote {results / f'frontier-{slug}'}.json, .md and the charts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
