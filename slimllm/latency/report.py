"""Human-readable reports: the latency report (Markdown + PNG chart) written next to `latency.json`.

    >>> write_latency_report(Path("out/latency"), payload)   # latency.json, latency.md, latency.png

Charts use matplotlib's headless Agg backend, so they render on servers without a display.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from slimllm.core.artifacts import atomic_write_bytes, atomic_write_json, atomic_write_text


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
    blocks.append(_table(header, rows))
    blocks.append({"kind": "p", "text": "Speedup of the pruned model (measured / ideal from FLOPs; efficiency = "
                   "measured ÷ ideal):"})
    speed_rows = []
    for label, entry in payload["summary"].items():
        speedups = entry["speedups"]
        cells = [f"{speedups[key]['measured']:.3f} / {speedups[key]['ideal']:.3f} "
                 f"({100 * speedups[key]['efficiency']:.0f} %)" for key in [f"pp{n}" for n in lengths] + [tg]]
        speed_rows.append([label, f"{speedups['ttft']['measured']:.3f}", *cells])
    blocks.append(_table(["backend", "TTFT", *[f"pp{n}" for n in lengths], tg], speed_rows))
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


def latency_markdown(payload: dict[str, Any]) -> str:
    title = {"kind": "h1", "text": f"Latency: pruned vs dense ({payload['profile']['name']})"}
    return _markdown([title, *latency_blocks(payload)])


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
    atomic_write_text(out_dir / "latency.md", latency_markdown(payload))
    if payload["summary"]:
        atomic_write_bytes(out_dir / "latency.png", latency_chart_png(payload))


# --- compile report -----------------------------------------------------------------------------------------------


def gate_trajectory_png(trajectory: list[list[float]], selection_order: list[int]) -> bytes:
    """Every layer's gate after every TRSP stage-1 round; the selected layers are drawn in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    rounds = list(range(1, len(trajectory) + 1))
    layers = len(trajectory[0]) if trajectory else 0
    for layer in range(layers):
        values = [row[layer] for row in trajectory]
        if layer in selection_order:
            label = f"layer {layer} (round {selection_order.index(layer) + 1})"
            axis.plot(rounds, values, marker="o", linewidth=1.6, label=label)
        else:
            axis.plot(rounds, values, color="#bbbbbb", linewidth=0.8)
    axis.set_xlabel("stage-1 round")
    axis.set_ylabel("gate value at the end of the round")
    axis.set_title("TRSP gate trajectory (grey: kept layers)")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def _table(header: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"kind": "table", "header": header, "rows": [[str(cell) for cell in row] for row in rows]}


def _compile_blocks(out_dir: Path, manifest: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The report as a list of blocks (heading, text, table, image, code), rendered to Markdown and HTML."""
    run_stages = manifest.get("run_stages") or list(manifest.get("stages", {}))
    # Only this run's stages: an earlier run's exports or latency in the same directory are not this run's results.
    stages = {name: manifest["stages"][name] for name in run_stages if name in manifest.get("stages", {})}
    results = {name: entry.get("result") or {} for name, entry in stages.items()}
    images: dict[str, bytes] = {}
    blocks: list[dict[str, Any]] = [
        {"kind": "h1", "text": f"slimllm compile report: {manifest['model']}"},
        {"kind": "p", "text": f"Output directory `{out_dir}`; dense checkpoint `{manifest['dense_checkpoint']}`."},
    ]
    blocks += _pruning_blocks(results.get("prune", {}), images)
    blocks += _perplexity_blocks(results.get("evaluate", {}))
    blocks += _divergence_blocks(results.get("evaluate", {}))
    blocks += _accuracy_blocks(results.get("accuracy", {}))
    blocks += _export_blocks(results.get("export_onnx"), results.get("export_gguf"))
    latency = results.get("profile", {}).get("latency")
    if latency:
        blocks.append({"kind": "h2", "text": "Latency"})
        blocks += latency_blocks(latency)
        if latency["summary"]:
            images["latency.png"] = latency_chart_png(latency)
            blocks.append({"kind": "img", "src": "latency.png", "alt": "latency chart"})
    blocks.append({"kind": "h2", "text": "Stages"})
    blocks.append(_table(["stage", "status", "seconds", "finished"], [_stage_row(n, e) for n, e in stages.items()]))
    blocks.append({"kind": "h2", "text": "Reproduce"})
    blocks.append({"kind": "code", "text": manifest.get("command", "")})
    versions = next((s.get("versions") for s in stages.values() if s.get("versions")), {})
    if versions:
        blocks.append({"kind": "p", "text": "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "."})
    return blocks, images


def describe_removal(removed: list[int], kinds: dict, compute: dict) -> str:
    """`layers [5, 11] (global, global); 11.1 % of the blocks' compute, 4.0 % with the LM head (per token at 512)`."""
    text = f"{removed}"
    if kinds:
        text += " (" + ", ".join(str(kinds.get(i, kinds.get(str(i), "?"))) for i in removed) + ")"
    if compute:
        text += (f"; {100 * compute['blocks']:.1f} % of the blocks' compute, {100 * compute['with_lm_head']:.1f} % "
                 f"with the LM head (per token at {compute['context']} context)")
    return text


def _pruning_blocks(prune: dict[str, Any], images: dict[str, bytes]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [{"kind": "h2", "text": "Pruning"}]
    if prune.get("method") in (None, "none"):
        return blocks + [{"kind": "p", "text": "No layers removed (`--method none`): the dense model was exported."}]
    removed = prune.get("removed_layers", [])
    before, after = prune.get("params_before", 0), prune.get("params_after", 0)
    what = prune.get("summary") or (
        f"removed {len(removed)} of {prune.get('original_num_layers')} layers (original indices "
        f"{describe_removal(removed, prune.get('removed_kinds') or {}, prune.get('compute_removed') or {})})"
    )
    blocks.append({"kind": "p", "text": (
        f"Method `{prune['method']}`: {what}; parameters {before / 1e6:.1f}M -> {after / 1e6:.1f}M "
        f"({100 * (1 - after / before):.1f} % fewer). Pruning took {prune.get('seconds', 0):.0f} s"
        + (" (resumed from a checkpoint)." if prune.get("resumed") else ".")
    )})
    details = prune.get("details", {})
    if details.get("gate_trajectory"):
        images["gates.png"] = gate_trajectory_png(details["gate_trajectory"], details.get("selection_order", []))
        blocks.append({"kind": "img", "src": "gates.png", "alt": "TRSP gate trajectory"})
    deltas = details.get("delta_before_stage2", {})
    if deltas:
        after_stage2 = details.get("delta_after_stage2", {})
        rows = [[layer, f"{deltas[layer]:.3f}", f"{after_stage2.get(layer, float('nan')):.3f}"] for layer in deltas]
        blocks.append({"kind": "p", "text": "Relative ||y - x|| of the selected layers around stage 2:"})
        blocks.append(_table(["layer", "before stage 2", "after stage 2"], rows))
    return blocks


def _perplexity_blocks(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    if not evaluation:
        return []
    return [
        {"kind": "h2", "text": "Perplexity"},
        {"kind": "p", "text": (
            f"`{evaluation['data']}`, {evaluation['windows']} windows x {evaluation['seq_len']} tokens "
            f"({evaluation['tokens_scored']} tokens scored), the same windows for every row."
        )},
        _table(["model", "perplexity"], [[k, f"{v:.3f}"] for k, v in evaluation["perplexity"].items()]),
    ]


def _divergence_blocks(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    divergence = evaluation.get("divergence")
    if not divergence:
        return []
    rows = [
        [
            label,
            f"{stats['ppl_ratio']:.4f}",
            f"{stats['kld']['mean']:.5f} ± {stats['kld']['stderr']:.5f}",
            f"{stats['kld']['99%']:.4f}",
            f"{stats['kld']['max']:.3f}",
            f"{100 * stats['same_top1']['mean']:.2f} %",
            f"{100 * stats['delta_p']['rms']:.2f} %",
        ]
        for label, stats in divergence.items()
    ]
    return [
        {"kind": "h2", "text": "Divergence from the dense model"},
        {"kind": "p", "text": (
            "KL(dense || model) per predicted token on the same windows, as `llama-perplexity --kl-divergence` "
            "reports it; Δp is the model's probability of the actual next token minus the dense model's."
        )},
        _table(["model", "PPL ratio", "mean KLD", "KLD 99%", "KLD max", "same top-1", "Δp RMS"], rows),
    ]


def _accuracy_blocks(accuracy: dict[str, Any]) -> list[dict[str, Any]]:
    if not accuracy:
        return []
    blocks: list[dict[str, Any]] = [{"kind": "h2", "text": f"Zero-shot accuracy: {accuracy['task']}"}]
    if accuracy.get("skipped"):
        return blocks + [{"kind": "p", "text": f"Not measured: {accuracy['skipped']}."}]
    rows = [
        [
            label,
            f"{100 * row['acc_norm']:.2f} ± {100 * row['acc_norm_stderr']:.2f}",
            f"{100 * row['acc']:.2f} ± {100 * row['acc_stderr']:.2f}",
            f"{100 * row['acc_per_token']:.2f}",
            f"{100 * row['agreement_with_dense']:.1f} %" if "agreement_with_dense" in row else "",
            f"{row['seconds']:.0f}",
        ]
        for label, row in accuracy["models"].items()
    ]
    return blocks + [
        {"kind": "p", "text": (
            f"The first {accuracy['tasks']} tasks of `{accuracy['file']}`, scored as lm-evaluation-harness scores "
            "them (acc: log-likelihood of the ending; acc_norm: per character of the ending), plus llama.cpp's "
            "per-token rule; ± one standard error. Agreement: tasks on which the model's acc_norm pick is right "
            "exactly when the dense model's is."
        )},
        _table(["model", "acc_norm", "acc", "per-token", "agreement", "seconds"], rows),
    ]


def _export_blocks(onnx: dict[str, Any] | None, gguf: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not onnx and not gguf:
        return []
    blocks: list[dict[str, Any]] = [{"kind": "h2", "text": "Parity of the exports"}]
    if onnx:
        blocks.append({"kind": "p", "text": f"ONNX `{onnx['variant']}` against PyTorch, validated on "
                       f"{onnx['provider']}:"})
        rows = [[c["name"], c["passed"], _figure(c), _bound(c)] for c in onnx["checks"]]
        blocks.append(_table(["check", "passed", "figure", "bound"], rows))
        blocks += [{"kind": "p", "text": note} for note in onnx.get("notes", [])]
    if gguf:
        blocks.append({"kind": "p", "text": "GGUF files in llama.cpp against PyTorch:"})
        rows = [
            [name, f"{info['bytes'] / 2**20:.1f} MiB", f"{info['ppl']:.3f}", f"{info['ppl_ratio']:.4f}",
             f"{100 * info['argmax_agreement']:.1f} %", info["passed"]]
            for name, info in gguf["files"].items()
        ]
        blocks.append(_table(["file", "size", "PPL", "PPL / PyTorch", "argmax agreement", "passed"], rows))
        token_checks = [
            c for checks in gguf["checks"].values() for c in checks if c["name"].startswith("token ids identical")
        ]
        if token_checks:
            blocks.append({"kind": "p", "text": f"Tokenizer: {token_checks[0]['name']} for every file."})
        for label, text in gguf.get("greedy", {}).items():
            blocks.append({"kind": "code", "text": f"[{label}] {text}"})
    return blocks


def _stage_row(name: str, entry: dict[str, Any]) -> list[Any]:
    if name == "report":  # this very file: it is being written, so it is done once anyone reads it
        return [name, "done", "", "(this report)"]
    status = entry.get("status")
    if entry.get("reused_at") and status == "done" and entry.get("finished", "") < entry["reused_at"]:
        status = "reused"
    return [name, status, entry.get("seconds", ""), entry.get("finished") or ""]


def _figure(check: dict[str, Any]) -> str:
    if check.get("value") is None:
        return str(check.get("metric"))
    return f"{check['metric']} {check['value']:.4g}"


def _bound(check: dict[str, Any]) -> str:
    return "" if check.get("bound") is None else f"{check['bound']:.3g}"


def _markdown(blocks: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block["kind"]
        if kind == "h1":
            lines += [f"# {block['text']}", ""]
        elif kind == "h2":
            lines += [f"## {block['text']}", ""]
        elif kind == "p":
            lines += [block["text"], ""]
        elif kind == "table":
            lines.append("| " + " | ".join(block["header"]) + " |")
            lines.append("|" + "---|" * len(block["header"]))
            lines += ["| " + " | ".join(row) + " |" for row in block["rows"]]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block['alt']}]({block['src']})", ""]
        elif kind == "strong":
            lines += [f"**{block['text']}**", ""]
        elif kind == "ul":
            lines += [*[f"- {item}" for item in block["items"]], ""]
        elif kind == "code":
            lines += ["```", block["text"], "```", ""]
    return "\n".join(lines)


def _html(blocks: list[dict[str, Any]], images: dict[str, bytes]) -> str:
    import base64
    import html

    def inline(text: str) -> str:
        escaped = html.escape(text)
        parts = escaped.split("`")
        return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))

    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{inline(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>slimllm report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        "th{background:#f2f2f2}code,pre{background:#f6f6f6}pre{padding:8px;white-space:pre-wrap}img{max-width:100%}"
        "</style></head><body>"
    ]
    for block in blocks:
        kind = block["kind"]
        if kind == "h1":
            out.append(f"<h1>{inline(block['text'])}</h1>")
        elif kind == "h2":
            out.append(f"<h2>{inline(block['text'])}</h2>")
        elif kind == "p":
            out.append(f"<p>{inline(block['text'])}</p>")
        elif kind == "table":
            out.append(table(block["header"], block["rows"]))
        elif kind == "img":
            data = base64.b64encode(images[block["src"]]).decode()
            out.append(f"<img alt='{html.escape(block['alt'])}' src='data:image/png;base64,{data}'>")
        elif kind == "strong":
            out.append(f"<p><strong>{inline(block['text'])}</strong></p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{inline(item)}</li>" for item in block["items"]) + "</ul>")
        elif kind == "code":
            out.append(f"<pre>{html.escape(block['text'])}</pre>")
    out.append("</body></html>")
    return "\n".join(out)


def write_compile_report(out_dir: Path, manifest: dict[str, Any]) -> list[Path]:
    """report.md (+ its images) and report.html (images embedded) from a compile run's manifest records."""
    out_dir = Path(out_dir)
    blocks, images = _compile_blocks(out_dir, manifest)
    written = []
    for name, data in images.items():
        atomic_write_bytes(out_dir / name, data)
        written.append(out_dir / name)
    atomic_write_text(out_dir / "report.md", _markdown(blocks))
    atomic_write_text(out_dir / "report.html", _html(blocks, images))
    return [*written, out_dir / "report.md", out_dir / "report.html"]
