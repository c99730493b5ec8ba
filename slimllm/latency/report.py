"""Human-readable reports: the latency report (Markdown + PNG chart) written next to `latency.json`.

    >>> write_latency_report(Path("out/latency"), payload)   # latency.json, latency.md, latency.png

Charts use matplotlib's headless Agg backend, so they render on servers without a display.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from slimllm.core.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text
from slimllm.core.report import markdown, table


def _fmt(stats: dict[str, float], digits: int = 1) -> str:
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}–{stats['max']:.{digits}f})"


def latency_blocks(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The latency report as blocks (text, tables, a list), rendered to Markdown or HTML alike."""
    profile = payload["profile"]
    machine = payload["machine"]
    dense_shape = payload["models"]["dense"]["shape"]
    pruned_shape = payload["models"]["pruned"]["shape"]
    lengths = [str(n) for n in profile["prompt_lengths"]]
    tg = f"tg{profile['generate_tokens']}"
    blocks: list[dict[str, Any]] = []
    failed = payload.get("failed_backends") or {}
    if failed:
        reasons = "; ".join(f"backend {label} failed ({reason})" for label, reason in failed.items())
        blocks.append({"kind": "strong", "text": f"PARTIAL REPORT: {reasons}. Only the backends below finished."})
    elif payload["partial"]:
        blocks.append({"kind": "strong", "text": "PARTIAL REPORT: the run was interrupted; only the backends below "
                       "finished."})
    blocks.append({"kind": "p", "text": (
        f"Dense: `{payload['models']['dense']['checkpoint']}` ({dense_shape['layers']} layers); "
        f"pruned: `{payload['models']['pruned']['checkpoint']}` ({pruned_shape['layers']} layers). "
        f"Device class: {profile['device_class']}. Machine: {machine.get('cpu')} ({machine.get('cpu_count')} "
        f"cores), {machine.get('gpu', 'no GPU')}. Threads: {payload['threads']}. "
        f"Repeats: {profile['repeats']} after {profile['warmup']} warm-up, dense and pruned alternating; "
        "figures are medians with (min–max)."
    )})
    rows = []
    for label, entry in payload["summary"].items():
        for name in ("dense", "pruned"):
            stats = entry["models"][name]
            gpu = f" (GPU {stats['gpu_mib']:.0f})" if stats.get("gpu_mib") else ""
            rows.append([label, name, _fmt(stats["ttft_ms"])]
                        + [_fmt(stats["prefill_tokens_per_s"][n], 0) for n in lengths]
                        + [_fmt(stats["decode_tokens_per_s"]), f"{stats['peak_rss_mib']:.0f}{gpu}"])
    header = ["backend", "model", f"TTFT ms (pp{lengths[0]})", *[f"pp{n} tok/s" for n in lengths], f"{tg} tok/s",
              "peak RSS MiB"]
    blocks.append(table(header, rows))
    blocks.append({"kind": "p", "text": "Speedup of the pruned model (measured / ideal from FLOPs; efficiency = "
                   "measured ÷ ideal):"})
    speed_rows = []
    for label, entry in payload["summary"].items():
        speedups = entry["speedups"]
        cells = [f"{speedups[key]['measured']:.3f} / {speedups[key]['ideal']:.3f} "
                 f"({100 * speedups[key]['efficiency']:.0f} %)" for key in [f"pp{n}" for n in lengths] + [tg]]
        speed_rows.append([label, f"{speedups['ttft']['measured']:.3f}", *cells])
    blocks.append(table(["backend", "TTFT", *[f"pp{n}" for n in lengths], tg], speed_rows))
    blocks.append({"kind": "p", "text": (
        f"Ideal speedup: {payload['ideal_flops_note']}. Measured speedups can exceed it: per-layer costs that FLOPs "
        "do not count (norms, rotary embeddings, softmax, KV-cache writes, one kernel dispatch per op) leave with "
        "the removed layers, while the LM head, which the ideal counts in full, runs as one large and efficient "
        "matmul."
    )})
    blocks.append({"kind": "p", "text": "Versions: " + ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
                   + "."})
    if payload.get("notes"):
        blocks += [{"kind": "p", "text": "Notes:"}, {"kind": "ul", "items": list(payload["notes"])}]
    return blocks


def latencymarkdown(payload: dict[str, Any]) -> str:
    title = {"kind": "h1", "text": f"Latency: pruned vs dense ({payload['profile']['name']})"}
    return markdown([title, *latency_blocks(payload)])


def latency_chart_png(payload: dict[str, Any]) -> bytes:
    """Grouped bars: decode and prefill tokens/s per backend, dense vs pruned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(payload["summary"])
    longest = str(max(payload["profile"]["prompt_lengths"]))
    tg = payload["profile"]["generate_tokens"]
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(labels) + 4), 4.5))
    panels = [
        ("decode_tokens_per_s", None, f"decode (tg{tg}) tokens/s"),
        ("prefill_tokens_per_s", longest, f"prefill (pp{longest}) tokens/s"),
    ]
    for axis, (metric, length, title) in zip(axes, panels, strict=True):
        positions = range(len(labels))
        for offset, name, color in ((-0.2, "dense", "#8c8c8c"), (0.2, "pruned", "#2a7ab9")):
            values, errors_low, errors_high = [], [], []
            for label in labels:
                stats = payload["summary"][label]["models"][name][metric]
                stats = stats[length] if length else stats
                values.append(stats["median"])
                errors_low.append(stats["median"] - stats["min"])
                errors_high.append(stats["max"] - stats["median"])
            axis.bar(
                [p + offset for p in positions], values, width=0.4, label=name, color=color,
                yerr=[errors_low, errors_high], capsize=3,
            )
        for index, label in enumerate(labels):
            speedup = payload["summary"][label]["speedups"][f"tg{tg}" if length is None else f"pp{length}"]
            axis.annotate(
                f"×{speedup['measured']:.2f}\n(ideal ×{speedup['ideal']:.2f})",
                (index, axis.get_ylim()[1] * 0.02),
                ha="center", fontsize=7, color="white",
            )
        axis.set_xticks(list(positions))
        axis.set_xticklabels([label.replace(" (", "\n(") for label in labels], fontsize=7)
        axis.set_title(title)
        axis.legend(fontsize=8)
    title = f"slimllm latency, {payload['profile']['name']}"
    figure.suptitle(title + (" (PARTIAL)" if payload["partial"] else ""))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def write_latency_report(out_dir: Path, payload: dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "latency.json", payload)
    atomic_write_text(out_dir / "latency.md", latencymarkdown(payload))
    if payload["summary"]:
        atomic_write_bytes(out_dir / "latency.png", latency_chart_png(payload))
