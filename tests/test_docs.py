"""The documentation that is generated stays current, and the README stays short and points at the rest."""

from __future__ import annotations

import re

from conftest import REPO_ROOT

from slimllm.cli.reference import cli_reference


def test_the_cli_reference_is_generated_and_current():
    """docs/cli.md is what `make docs` writes now: a new settings field, flag or help text changes it."""
    assert (REPO_ROOT / "docs" / "cli.md").read_text() == cli_reference(), "docs/cli.md is stale: run `make docs`"


def test_the_cli_reference_lists_every_command_and_every_settings_field():
    from dataclasses import fields

    from slimllm.pruning.methods.trsp import TrspSettings
    from slimllm.recovery.healing import HealSettings

    reference = cli_reference()
    for command in ("compile", "prune", "heal", "export", "eval", "profile", "plan", "inspect", "validate"):
        assert f"## `slimllm {command}`" in reference
    prune = reference.split("## `slimllm prune`")[1]
    for field in fields(TrspSettings):
        assert f"`--{field.name.replace('_', '-')}" in prune or f"`--trsp-{field.name.replace('_', '-')}" in prune
    heal = reference.split("## `slimllm heal`")[1].split("\n## ")[0]
    assert all(f"`--{f.name.replace('_', '-')}" in heal for f in fields(HealSettings))


def test_the_readme_fits_a_newcomer_and_its_links_resolve():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    for target in re.findall(r"\]\(((?:docs|bench|examples|profiles)/[^)#\s]+)", readme):
        assert (REPO_ROOT / target).exists(), target
    for doc in ("cli.md", "guide.md", "methods.md", "benchmarks.md", "design-notes.md", "extending.md"):
        assert f"docs/{doc}" in readme, doc
