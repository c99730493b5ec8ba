"""The `slimllm` command line: thin commands over the library. The only package that prints or exits.

$ slimllm eval --model smollm2-135m --data ../shared/data/wikitext2/wiki.test.raw --seq-len 1024 --max-windows 24
"""

from __future__ import annotations

from slimllm.cli import (  # noqa: F401  (each module registers its command)
    compile_command,
    eval_command,
    export_command,
    frontier_command,
    heal_command,
    inspect_command,
    plan_command,
    profile_command,
    prune_command,
)
from slimllm.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
