"""Every figure in the benchmark tables (docs/benchmarks.md, and the README's headline results) comes from the
committed result file the table cites."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import REPO_ROOT

RESULT_FILE = re.compile(r"bench/results/[\w.\-]+?(?:\.\{json,md\}|\.md|\.json)")
NUMBER = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?(?:e[+-]?\d+)?)(?![\w.])")


def _cited_files(text: str) -> set[Path]:
    files = set()
    for match in RESULT_FILE.findall(text):
        stem = re.sub(r"\.(\{json,md\}|md|json)$", "", match)
        files |= {path for path in (REPO_ROOT / f"{stem}.md", REPO_ROOT / f"{stem}.json") if path.is_file()}
    return files


def benchmark_tables(section: str) -> list[tuple[str, list[str], set[Path]]]:
    """(heading, table rows, result files cited since that heading) for every table of `section`."""
    tables, heading, cited, rows = [], "", "", []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line)
            continue
        if rows:
            tables.append((heading, rows, _cited_files(cited + "\n".join(rows))))
            rows = []
        if line.startswith("#"):
            heading, cited = line, line
        else:
            cited += "\n" + line
    return tables


def _numbers_in(path: Path) -> set[float]:
    text = path.read_text()
    values = {float(n.replace(",", "")) for n in NUMBER.findall(text)}
    if path.suffix == ".json":
        def walk(value):
            if isinstance(value, bool):
                return
            if isinstance(value, (int, float)):
                values.add(float(value))
            elif isinstance(value, dict):
                for item in value.values():
                    walk(item)
            elif isinstance(value, list):
                for item in value:
                    walk(item)
        walk(json.loads(text))
    return values | {100 * v for v in values}


def _shown(value: float, printed: str) -> bool:
    """Whether `value` printed as the README prints `printed` (same decimals or significant digits) reads the same."""
    number = float(printed.replace(",", ""))
    if "e" in printed.lower():
        digits = len(printed.lower().split("e")[0].replace(".", "").lstrip("0"))
        return f"{value:.{max(digits - 1, 0)}e}" == f"{number:.{max(digits - 1, 0)}e}"
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return round(value, decimals) == round(number, decimals) or abs(value - number) < 0.5 * 10**-decimals + 1e-12


def _checked_tables() -> list[tuple[str, list[str], set[Path]]]:
    readme = (REPO_ROOT / "README.md").read_text()
    headline = readme.split("\n## Results", 1)[1].split("\n## ", 1)[0]
    return benchmark_tables((REPO_ROOT / "docs" / "benchmarks.md").read_text()) + benchmark_tables(headline)


def test_every_benchmark_table_cites_a_result_file_holding_its_figures():
    tables = _checked_tables()
    assert len(tables) > 10
    problems = []
    for heading, rows, files in tables:
        if not files:
            problems.append(f"{heading}: the table cites no committed result file")
            continue
        known = set().union(*(_numbers_in(path) for path in files))
        for row in rows[2:]:
            for cell in row.strip("|").split("|")[1:]:  # the first column names the row
                for printed in NUMBER.findall(cell):
                    if not any(_shown(value, printed) for value in known):
                        problems.append(f"{heading}: {printed} ({row.split('|')[1].strip()}) is in no cited file")
    assert not problems, "\n".join(problems)
