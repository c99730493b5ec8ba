"""Reports as blocks: report.md and report.html (images embedded) from the blocks their writers contribute.

    >>> blocks = [heading("Perplexity"), paragraph("..."), table(["model", "perplexity"], rows)]
    >>> write_report(Path("runs/demo"), blocks, images={"gates.png": png})

A block is a small dict (`h1`, `h2`, `p`, `table`, `img`, `code`, ...) rendered once to Markdown and once to HTML.
The compile report is made of each stage's blocks (`StageSpec.report`); the latency report of the profiler's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimllm.core.artifacts import atomic_write_bytes, atomic_write_text

Block = dict[str, Any]


def heading(text: str) -> Block:
    return {"kind": "h2", "text": text}


def paragraph(text: str) -> Block:
    return {"kind": "p", "text": text}


def table(header: list[str], rows: list[list[Any]]) -> Block:
    return {"kind": "table", "header": header, "rows": [[str(cell) for cell in row] for row in rows]}


def markdown(blocks: list[dict[str, Any]]) -> str:
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


def html_page(blocks: list[dict[str, Any]], images: dict[str, bytes]) -> str:
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


def write_report(out_dir: Path, blocks: list[Block], images: dict[str, bytes], stem: str = "report") -> list[Path]:
    """`<stem>.md` (+ its images) and `<stem>.html` (images embedded), atomically."""
    out_dir = Path(out_dir)
    written = []
    for name, data in images.items():
        atomic_write_bytes(out_dir / name, data)
        written.append(out_dir / name)
    atomic_write_text(out_dir / f"{stem}.md", markdown(blocks))
    atomic_write_text(out_dir / f"{stem}.html", html_page(blocks, images))
    return [*written, out_dir / f"{stem}.md", out_dir / f"{stem}.html"]
