"""The test suite's time, per file and for the slowest tests, before and after a change, from pytest's JUnit XML.

    python -m pytest --junitxml=after.xml && python bench/test_durations.py before=before.xml after=after.xml

Writes bench/results/test-durations.md (and .json): per test file, the seconds of each run and the second run's over
the first's, the 50 slowest tests of each run, and how many tests each run passed, skipped and failed.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slimllm.core.artifacts import atomic_write_json, atomic_write_text, library_versions, machine_info  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def read_run(path: Path) -> dict:
    """Per test: seconds (setup, call and teardown together) and outcome."""
    tests = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome = "skipped" if case.find("skipped") is not None else "failed" if (
            case.find("failure") is not None or case.find("error") is not None) else "passed"
        tests[name] = {"seconds": float(case.get("time", 0.0)), "outcome": outcome}
    return tests


def by_file(tests: dict) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for name, test in tests.items():
        totals[name.split("::")[0]] += test["seconds"]
    return dict(totals)


def markdown(runs: list[tuple[str, dict]], command: str, note: str = "") -> str:
    labels = [label for label, _ in runs]
    files = sorted(set().union(*(by_file(tests) for _, tests in runs)),
                   key=lambda f: -by_file(runs[0][1]).get(f, 0.0))
    lines = ["# Test-suite durations", "", f"Command: `{command}`", "", *([note, ""] if note else []),
             "| run | tests | passed | skipped | failed | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for label, tests in runs:
        count = defaultdict(int)
        for test in tests.values():
            count[test["outcome"]] += 1
        lines.append(f"| {label} | {len(tests)} | {count['passed']} | {count['skipped']} | {count['failed']} | "
                     f"{sum(t['seconds'] for t in tests.values()):.0f} |")
    compared = len(runs) >= 2
    header = "| file | " + " | ".join(labels) + (f" | {labels[1]} / {labels[0]} |" if compared else " |")
    lines += ["", "Per file (seconds):", "", header, "|---|" + "---:|" * (len(runs) + compared)]
    for file in files:
        values = [by_file(tests).get(file, 0.0) for _, tests in runs]
        ratio = (f" | {values[1] / values[0]:.2f}" if values[0] else " | ") if compared else ""
        lines.append(f"| {file} | " + " | ".join(f"{v:.1f}" for v in values) + ratio + " |")
    for label, tests in runs:
        lines += ["", f"The 50 slowest tests, {label}:", "", "| test | seconds |", "|---|---:|"]
        for name, test in sorted(tests.items(), key=lambda item: -item[1]["seconds"])[:50]:
            lines.append(f"| `{name}` | {test['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=JUNIT.xml, in order (e.g. before=base.xml after=new.xml)")
    parser.add_argument("--name", default="test-durations")
    parser.add_argument("--note", default="", help="How the runs were made (machine state, caches, commands).")
    args = parser.parse_args()
    runs = [(label, read_run(Path(path))) for label, path in (run.split("=", 1) for run in args.runs)]
    command = shlex.join(["python", *sys.argv])
    payload = {"command": command, "note": args.note, "machine": machine_info(), "versions": library_versions(),
               "runs": {label: tests for label, tests in runs}}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS_DIR / f"{args.name}.json", payload)
    text = markdown(runs, command, args.note)
    atomic_write_text(RESULTS_DIR / f"{args.name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
