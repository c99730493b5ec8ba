"""The frontier's files: frontier.json, frontier.md and frontier.html (a table per backend sorted by decode speed, the
choice) and one chart per backend, frontier-<backend>.png.

A chart puts decode tokens/s on one axis and the mean KL divergence from the dense model on the other (log scale):
each model's quantization ladder is a line (the dense model's in black), the frontier's candidates are ringed, and
the error bars are the min–max of the latency repeats and the KLD's standard error.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from slimllm.core.artifacts import atomic_write_json
from slimllm.core.report import Block, heading, paragraph, table, write_report
from slimllm.frontier.choice import Choice
from slimllm.frontier.results import CandidateResult


def chart_png(backend: str, results: list[CandidateResult], verdict: dict[str, str | None]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    measured = [r for r in results if r.backend == backend and r.decode is not None and r.kld > 0]
    for index, model in enumerate(dict.fromkeys(r.model for r in measured)):
        ladder = sorted((r for r in measured if r.model == model), key=lambda r: r.decode.value)
        color = "black" if model == "dense" else f"C{index}"
        xs, ys = [r.decode.value for r in ladder], [r.kld for r in ladder]
        axis.errorbar(xs, ys, xerr=[[r.decode.value - r.decode.low for r in ladder],
                                    [r.decode.high - r.decode.value for r in ladder]],
                      yerr=[r.quality["kld"].get("stderr", 0) for r in ladder], color=color, marker="o",
                      linestyle="-" if model == "dense" else "--", label=model, capsize=2, markersize=4)
        for r in ladder:
            axis.annotate(r.quant, (r.decode.value, r.kld), fontsize=7, xytext=(3, 3), textcoords="offset points")
    on_frontier = [r for r in measured if verdict.get(r.name) is None]
    axis.scatter([r.decode.value for r in on_frontier], [r.kld for r in on_frontier], s=160, facecolors="none",
                 edgecolors="red", linewidths=1.5, label="frontier", zorder=5)
    axis.set_yscale("log")
    axis.set_xlabel("decode tokens/s (median; bars: min–max of the repeats)")
    axis.set_ylabel("mean KL divergence from the dense model (nats)")
    axis.set_title(f"Deployment frontier on {backend}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def _row(r: CandidateResult, verdicts: dict[str, dict[str, str | None]]) -> list[Any]:
    def rate(interval):
        return f"{interval.value:.1f} ({interval.low:.1f}–{interval.high:.1f})" if interval is not None else ""

    kld = r.quality.get("kld", {})
    task = f"{100 * r.task['acc_norm']:.1f} ± {100 * r.task['acc_norm_stderr']:.1f}" if r.task else ""
    per_token = f"{100 * r.task['acc_per_token']:.1f}" if r.task and "acc_per_token" in r.task else ""
    half = (r.quality.get("second_half") or {}).get("ppl")
    on = [axis for axis, verdict in verdicts.items() if r.name in verdict and verdict[r.name] is None]
    dominated = [f"on {axis} by {by}" for axis, verdict in verdicts.items() if (by := verdict.get(r.name))]
    status = "; ".join(filter(None, ["on the frontier of " + ", ".join(on) if on else "",
                                     "dominated " + ", ".join(dominated) if dominated else "", *r.notes]))
    memory = f"{r.speed['peak_rss_bytes'] / 2**20:.0f}" if r.speed and r.speed.get("peak_rss_bytes") else ""
    return [r.name, f"{r.size_bytes / 2**20:.1f}", rate(r.decode), rate(r.prefill),
            f"{kld['mean']:.4f} ± {kld.get('stderr', 0):.4f}" if kld else "", f"{kld.get('99%', 0):.3f}" if kld else "",
            f"{100 * r.quality['same_top1']['mean']:.1f}" if "same_top1" in r.quality else "",
            f"{r.quality['ppl']:.2f}" if "ppl" in r.quality else "", f"{half:.2f}" if half else "", task, per_token,
            memory, status]


HEADER = ["candidate", "MiB", "decode tok/s", "prefill tok/s", "mean KLD", "KLD 99%", "same top-1 %", "PPL", "PPL ½",
          "task acc_norm %", "task per-token %", "peak RSS MiB", "frontier"]
"""PPL ½: over each window's second half, llama-perplexity's protocol. Per-token: llama.cpp's HellaSwag rule."""


def frontier_blocks(payload: dict[str, Any], results: list[CandidateResult], verdicts, choice: Choice,
                    images: dict[str, bytes]) -> list[Block]:
    blocks: list[Block] = [{"kind": "h1", "text": f"Deployment frontier: {payload['model']} on "
                                                   f"{payload['profile']['name']}"}]
    blocks.append(heading("The choice"))
    blocks.append(paragraph(choice.summary))
    for backend, per_axis in verdicts.items():
        rows = sorted((r for r in results if r.backend == backend),
                      key=lambda r: -(r.decode.value if r.decode else -1))
        blocks.append(heading(f"{backend}, sorted by decode speed"))
        blocks.append(table(HEADER, [_row(r, per_axis) for r in rows]))
        images[f"frontier-{backend}.png"] = chart_png(backend, results, per_axis["decode"])
        blocks.append({"kind": "img", "src": f"frontier-{backend}.png", "alt": f"frontier on {backend}"})
    seconds = payload["seconds"]
    blocks.append(paragraph(
        "A candidate is dominated only when another is better on one axis by more than the noise of both (the "
        "min–max of the latency repeats; the KLD's standard error) and not worse on the other. Wall time: "
        + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()) + "."))
    return blocks


def write_frontier_report(out_dir: Path, payload: dict[str, Any], results, verdicts, choice: Choice) -> None:
    images: dict[str, bytes] = {}
    blocks = frontier_blocks(payload, results, verdicts, choice, images)
    atomic_write_json(Path(out_dir) / "frontier.json", payload)
    write_report(out_dir, blocks, images, stem="frontier")
