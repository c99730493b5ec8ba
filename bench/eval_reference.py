"""slimllm's accuracy and divergence figures against llama.cpp's own `llama-perplexity`, on the same GGUF files.

    make bench-eval-reference        # builds llama.cpp's tools once (make llama-tools), then runs this

Dense and pruned SmolLM2-135M (ShortGPT, 8 layers, calibrated on WikiText-2 validation), each exported to F16 and
Q8_0 by slimllm. For every file:

- HellaSwag on the same tasks (the first --tasks of the validation file): `llama-perplexity --hellaswag` against
  `slimllm eval --backend llama.cpp`'s per-token rule (the mean log-probability of the tokens after the prefix the
  four sequences share, llama.cpp's rule). Target: within 0.5 points.
- KL divergence from the dense F16 file on the same windows of WikiText-2 test (the second half of each window
  scored, as llama-perplexity does): `llama-perplexity --kl-divergence` against slimllm's statistics. Target: mean
  KLD within 2 %.

llama-perplexity draws its HellaSwag tasks in a random order from the file it is given; it is given exactly the
chosen tasks and asked for all of them, so both score the same set. Results: bench/results/eval-reference-*.json/.md.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speed_common import DATA_DIR, HELLASWAG_FILE, RESULTS_DIR, WORK_DIR, exported_gguf  # noqa: E402

from slimllm.core.artifacts import atomic_write_json, atomic_write_text, library_versions, machine_info  # noqa: E402

HELLASWAG_POINTS = 0.5
KLD_RELATIVE = 0.02
SAME_COMPUTATION = ("-ctk", "f32", "-ctv", "f32", "-fa", "off")
"""llama-perplexity computes as slimllm's llama.cpp backend does: an F32 key/value cache and no flash attention
(llama-perplexity's defaults, F16 cache and flash attention where available, move near-tied top tokens)."""


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-tools", type=Path, required=True, help="Directory with llama-perplexity.")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pruned", type=Path, default=None, help="Pruned checkpoint (default: ShortGPT, k=8).")
    parser.add_argument("--remove", type=int, default=8)
    parser.add_argument("--calib", default=str(DATA_DIR / "wiki.valid.tokens"))
    parser.add_argument("--eval-data", default=str(DATA_DIR / "wiki.test.raw"))
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--ctx", type=int, default=512, help="KL window (llama-perplexity -c).")
    parser.add_argument("--chunks", type=int, default=24, help="KL windows.")
    parser.add_argument("--threads", type=int, default=0, help="0: every core.")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR / "eval-reference")
    parser.add_argument("--name", default="eval-reference-smollm2-135m")
    return parser.parse_args()


def gguf_files(args, dense: Path, pruned: Path) -> dict[str, Path]:
    """F16 and Q8_0 of both models, exported (and checked) by slimllm; reused when already there."""
    files = {}
    for label, checkpoint in (("dense", dense), ("pruned", pruned)):
        exported = exported_gguf(checkpoint, args.work_dir / f"gguf-{label}", ["f16", "q8_0"], args.eval_data)
        files |= {f"{label} {gguf_type}": path for gguf_type, path in exported.items()}
    return files


def llama_perplexity(args, *flags: str) -> tuple[str, float]:
    binary = args.llama_tools / "llama-perplexity"
    threads = ["-t", str(args.threads)] if args.threads else []
    started = time.perf_counter()
    done = subprocess.run([str(binary), *threads, *SAME_COMPUTATION, *flags], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"llama-perplexity failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout + done.stderr, time.perf_counter() - started


def hellaswag(args, files: dict[str, Path], task_file: Path) -> dict[str, dict]:
    from slimllm.evaluation.accuracy import evaluate_tasks
    from slimllm.evaluation.tasks import read_task
    from slimllm.exporters.scorers import open_backend

    tasks = read_task("hellaswag", task_file)
    rows = {}
    for label, path in files.items():
        log, llama_seconds = llama_perplexity(
            args, "-m", str(path), "-f", str(task_file), "--hellaswag", "--hellaswag-tasks", str(len(tasks)),
            "-c", "2048", "-b", "2048",
        )
        final = re.findall(rf"^{len(tasks)}\t([0-9.]+)%", log, flags=re.MULTILINE)
        if not final:
            raise SystemExit(f"no HellaSwag score in llama-perplexity's output for {path}:\n{log[-2000:]}")
        with open_backend(str(path), "llama.cpp", context=1024) as scorer:
            ours = evaluate_tasks(scorer.sequence_log_probs, scorer.tokenizer, tasks)
        reference = float(final[-1])
        rows[label] = {
            "llama_perplexity": reference,
            "slimllm_per_token": 100 * ours.acc_per_token,
            "difference_points": 100 * ours.acc_per_token - reference,
            "within_target": abs(100 * ours.acc_per_token - reference) <= HELLASWAG_POINTS,
            "slimllm_acc_norm": 100 * ours.acc_norm,
            "slimllm_acc": 100 * ours.acc,
            "llama_perplexity_seconds": llama_seconds,
            "slimllm_seconds": ours.seconds,
        }
        print(f"hellaswag {label}: llama-perplexity {reference:.2f}, slimllm {100 * ours.acc_per_token:.2f}")
    return rows


def _kld_figures(log: str) -> dict[str, float]:
    def number(pattern: str) -> float:
        found = re.search(pattern, log, flags=re.MULTILINE)
        if not found:
            raise SystemExit(f"no match for {pattern!r} in llama-perplexity's output:\n{log[-2000:]}")
        return float(found.group(1))

    return {
        "mean_kld": number(r"^Mean\s+KLD:\s+(-?[0-9.]+)"),
        "same_top_p": number(r"^Same top p:\s+([0-9.]+)"),
        "ppl": number(r"^Mean PPL\(Q\)\s*:\s+([0-9.]+)"),
    }


def divergence(args, files: dict[str, Path], text_file: Path, base: Path) -> tuple[dict[str, dict], dict]:
    from slimllm.evaluation.divergence import divergence_statistics
    from slimllm.evaluation.perplexity import split_windows
    from slimllm.exporters.llama_cpp_runner import LlamaCppModel
    from slimllm.exporters.scorers import open_backend

    reference_path = files["dense F16"]
    llama_perplexity(args, "-m", str(reference_path), "-f", str(text_file), "-c", str(args.ctx), "-b", str(args.ctx),
                     "--chunks", str(args.chunks), "--kl-divergence-base", str(base))
    rows: dict[str, dict] = {}
    with open_backend(str(reference_path), "llama.cpp", context=args.ctx) as reference:
        ids = reference.tokenizer(text_file.read_text(), return_tensors="pt", verbose=False)["input_ids"][0]
        windows = split_windows(ids, args.ctx, args.chunks)
        llama_ids = LlamaCppModel(reference_path, n_ctx=args.ctx, vocab_only=True).tokenize(
            text_file.read_text(), add_special=True, parse_special=False
        )
        tokens = {
            "windows": int(windows.shape[0]),
            "identical_to_llama_cpp": llama_ids[: windows.numel()] == windows.flatten().tolist(),
        }
        for label, path in files.items():
            if path == reference_path:
                continue
            log, llama_seconds = llama_perplexity(
                args, "-m", str(path), "-f", str(text_file), "-c", str(args.ctx), "-b", str(args.ctx),
                "--chunks", str(args.chunks), "--kl-divergence-base", str(base), "--kl-divergence",
            )
            theirs = _kld_figures(log)
            started = time.perf_counter()
            with open_backend(str(path), "llama.cpp", context=args.ctx) as scorer:
                ours = divergence_statistics(scorer.logits_fn, reference.logits_fn, windows, first=args.ctx // 2)
            relative = ours["kld"]["mean"] / theirs["mean_kld"] - 1
            rows[label] = {
                "llama_perplexity": theirs,
                "slimllm": {"mean_kld": ours["kld"]["mean"], "kld_stderr": ours["kld"]["stderr"],
                            "same_top_p": 100 * ours["same_top1"]["mean"], "ppl": ours["ppl"],
                            "tokens": ours["tokens"]},
                "mean_kld_relative_difference": relative,
                "within_target": abs(relative) <= KLD_RELATIVE,
                "llama_perplexity_seconds": llama_seconds,
                "slimllm_seconds": time.perf_counter() - started,
            }
            print(f"KLD {label}: llama-perplexity {theirs['mean_kld']:.5f}, slimllm {ours['kld']['mean']:.5f}")
    return rows, tokens


def write_markdown(path: Path, payload: dict) -> None:
    machine = payload["machine"]
    lines = [
        "# slimllm against llama-perplexity on the same GGUF files",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Dense SmolLM2-135M and a ShortGPT copy with {payload['settings']['remove']} layers removed, exported by "
        "slimllm to F16 and Q8_0. llama.cpp tools built from the tree vendored in llama-cpp-python "
        f"{payload['versions'].get('llama-cpp-python', '?')}.",
        "",
        f"## HellaSwag, the first {payload['settings']['tasks']} validation tasks, llama.cpp's per-token rule "
        f"(target: within {HELLASWAG_POINTS} points)",
        "",
        "| file | llama-perplexity | slimllm | difference | time llama-perplexity / slimllm |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, row in payload["hellaswag"].items():
        lines.append(
            f"| {label} | {row['llama_perplexity']:.2f} | {row['slimllm_per_token']:.2f} | "
            f"{row['difference_points']:+.2f} | "
            f"{row['llama_perplexity_seconds']:.0f} s / {row['slimllm_seconds']:.0f} s |"
        )
    settings = payload["settings"]
    lines += [
        "",
        f"## KL divergence from dense F16, {settings['chunks']} windows of {settings['ctx']} tokens of WikiText-2 "
        f"test, second half of each scored (target: mean KLD within {100 * KLD_RELATIVE:.0f} %)",
        "",
        f"Token windows identical to llama.cpp's tokenization: {payload['tokens']['identical_to_llama_cpp']}.",
        "",
        "| file | mean KLD llama-perplexity | mean KLD slimllm | relative difference | same top-1 (l-p / slimllm) "
        "| PPL (l-p / slimllm) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, row in payload["divergence"].items():
        theirs, ours = row["llama_perplexity"], row["slimllm"]
        lines.append(
            f"| {label} | {theirs['mean_kld']:.5f} | {ours['mean_kld']:.5f} ± {ours['kld_stderr']:.5f} | "
            f"{100 * row['mean_kld_relative_difference']:+.2f} % | {theirs['same_top_p']:.2f} / "
            f"{ours['same_top_p']:.2f} % | {theirs['ppl']:.3f} / {ours['ppl']:.3f} |"
        )
    lines += [
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_count']} cores). Versions: "
        + ", ".join(f"{k} {v}" for k, v in payload["versions"].items()) + f". Wall time {payload['seconds']:.0f} s.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def main() -> int:
    from speed_common import pruned_checkpoint

    from slimllm.core.data import DataPurpose, load_corpus
    from slimllm.evaluation.tasks import read_task
    from slimllm.models.loading import checkpoint_directory

    args = arguments()
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    dense = checkpoint_directory(args.model)
    pruned = pruned_checkpoint(args)
    files = gguf_files(args, dense, pruned)
    with tempfile.TemporaryDirectory() as scratch:
        task_file = Path(scratch) / "hellaswag.txt"
        chosen = read_task("hellaswag", HELLASWAG_FILE)[: args.tasks]
        task_file.write_text("".join(f"{t.context}\n{t.label}\n" + "".join(f"{e}\n" for e in t.endings)
                                     for t in chosen))
        text_file = Path(scratch) / "text.txt"
        text_file.write_text(load_corpus(args.eval_data, DataPurpose.EVALUATION).text)
        accuracy = hellaswag(args, files, task_file)
        kld, tokens = divergence(args, files, text_file, Path(scratch) / "base.kld")
    payload = {
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "files": {label: str(path) for label, path in files.items()},
        "hellaswag": accuracy,
        "divergence": kld,
        "tokens": tokens,
        "machine": machine_info(),
        "versions": library_versions(),
        "seconds": time.perf_counter() - started,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS_DIR / f"{args.name}.json", payload)
    write_markdown(RESULTS_DIR / f"{args.name}.md", payload)
    print((RESULTS_DIR / f"{args.name}.md").read_text())
    return 0 if all(r["within_target"] for r in [*accuracy.values(), *kld.values()]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
