"""Every user-error path of the real CLI, as one table: the bad input, the one line it must print, the exit code.

Each case builds its bad input in a temporary directory, runs the command in-process, and checks that stderr holds
exactly one line starting with `error: ` (no traceback), that the line names the problem, that the exit code is 2
for a user error (1 for a failed check), and that nothing the case put on disk was touched.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import EVAL_FILE
from test_cli import run_cli


@dataclass
class Case:
    name: str
    build: Callable[[Path, Callable[..., Path]], list[str]]
    """(tmp_path, tiny_model_dir) -> the command line; may create files under tmp_path."""
    fragment: str
    exit_code: int = 2
    keep: list[str] = field(default_factory=list)
    """Files (relative to tmp_path) the case creates that must survive the command unchanged."""


def _foreign_dir(tmp_path: Path, name: str = "mine") -> Path:
    """A directory slimllm did not write, holding a file someone cares about."""
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("precious")
    return folder


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return str(path)


def _model(tiny, tmp_path: Path) -> str:
    return str(tiny("llama"))


def _copied_model(tiny, tmp_path: Path) -> Path:
    """A copy of the tiny model inside tmp_path, so a case can point --out at it or at its parent."""
    import shutil

    target = tmp_path / "models" / "tiny"
    shutil.copytree(tiny("llama"), target)
    return target


CASES = [
    Case(
        "dtype-spelled-like-torch",
        lambda t, m: ["eval", _model(m, t), "--data", str(EVAL_FILE), "--dtype", "float32"],
        "unknown --dtype 'float32'",
    ),
    Case(
        "device-index-beyond-the-gpus",
        lambda t, m: ["eval", _model(m, t), "--data", str(EVAL_FILE), "--device", "cuda:7"],
        "'cuda:7' requested",
    ),
    Case(
        "device-not-supported",
        lambda t, m: ["eval", _model(m, t), "--data", str(EVAL_FILE), "--device", "xla"],
        "'xla' is not supported",
    ),
    Case(
        "recipe-value-of-the-wrong-type",
        lambda t, m: [
            "prune", _model(m, t), "--method", "last", "--remove", "1", "--out", str(t / "out"),
            "--recipe", _recipe(t, '[trsp]\nlambda1 = "large"\n'),
        ],
        "lambda1 must be a number, got 'large'",
    ),
    Case(
        "recipe-integer-given-as-a-fraction",
        lambda t, m: [
            "compile", _model(m, t), "--out", str(t / "out"), "--recipe", _recipe(t, "[prune]\nremove = 1.5\n"),
        ],
        "remove must be an integer or none, got 1.5",
    ),
    Case(
        "recipe-unknown-key",
        lambda t, m: [
            "prune", _model(m, t), "--method", "last", "--remove", "1", "--out", str(t / "out"),
            "--recipe", _recipe(t, "[trsp]\nlamda1 = 0.1\n"),
        ],
        "trsp.lamda1",
    ),
    Case(
        "compile-force-on-a-directory-slimllm-did-not-write",
        lambda t, m: ["compile", _model(m, t), "--method", "last", "--remove", "1", "--target", "onnx",
                      "--profile", "none", "--out", str(_foreign_dir(t)), "--force"],
        "--force only replaces outputs slimllm wrote",
        keep=["mine/notes.txt"],
    ),
    Case(
        "compile-without-force-on-a-foreign-directory",
        lambda t, m: ["compile", _model(m, t), "--method", "last", "--remove", "1", "--target", "onnx",
                      "--profile", "none", "--out", str(_foreign_dir(t))],
        "pass --force",
        keep=["mine/notes.txt"],
    ),
    Case(
        "prune-force-onto-its-own-input",
        lambda t, m: ["prune", str(_copied_model(m, t)), "--method", "last", "--remove", "1",
                      "--out", str(t / "models" / "tiny"), "--force"],
        "would replace the input",
        keep=["models/tiny/config.json"],
    ),
    Case(
        "export-force-onto-the-parent-of-its-input",
        lambda t, m: ["export", str(_copied_model(m, t)), "--target", "gguf", "--out", str(t / "models"),
                      "--force"],
        "would replace the input",
        keep=["models/tiny/config.json"],
    ),
    Case(
        "profile-force-on-a-directory-slimllm-did-not-write",
        lambda t, m: ["profile", "--dense", _model(m, t), "--pruned", _model(m, t), "--out", str(_foreign_dir(t)),
                      "--force"],
        "--force only replaces outputs slimllm wrote",
        keep=["mine/notes.txt"],
    ),
    Case(
        "out-where-nobody-may-write",
        lambda t, m: ["eval", _model(m, t), "--data", str(EVAL_FILE), "--seq-len", "32", "--max-windows", "1",
                      "--out", "/sys/slimllm-cannot-write-here/result.json"],
        "permission denied writing",
    ),
    Case(
        "profile-backend-measured-under-another-precision",
        lambda t, m: ["profile", "--dense", _model(m, t), "--pruned", _model(m, t), "--out", str(t / "lat"),
                      "--profile", _profile(t, 'kind = "onnxruntime"\ndtype = "bf16"\n')],
        "dtype 'bf16' is not one it measures",
    ),
    Case(
        "gguf-of-a-sliding-window-model",
        lambda t, m: ["export", str(m("mistral", sliding_window=32)), "--target", "gguf", "--out", str(t / "g")],
        "pass --allow-full-attention",
    ),
    Case(
        "trsp-loss-becomes-nan",
        lambda t, m: ["prune", _model(m, t), "--method", "trsp", "--remove", "1", "--calib", str(EVAL_FILE.parent /
                      "wiki.valid.tokens"), "--calib-blocks", "2", "--block-len", "32", "--steps-per-round", "2",
                      "--stage2", "none", "--lambda1", "nan", "--out", str(t / "p")],
        "loss became nan",
        exit_code=1,
    ),
]


def _profile(tmp_path: Path, backend: str) -> str:
    path = tmp_path / "bad-profile.toml"
    path.write_text(f'[profile]\nname = "bad"\n\n[[backend]]\n{backend}')
    return str(path)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_user_error_table(case: Case, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = case.build(tmp_path, tiny_model_dir)
    before = {name: (tmp_path / name).read_bytes() for name in case.keep}
    result = run_cli(*args)
    assert result.exit_code == case.exit_code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and case.fragment in lines[-1], result.stderr
    assert not [line for line in lines if line.startswith("error: ")][:-1], "more than one error line"
    assert "Traceback" not in result.output
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content, f"{name} was changed"


def test_force_never_replaces_home_or_current_directory(tmp_path, tiny_model_dir, monkeypatch):
    """`--out ~ --force` and `--out . --force` are refused even when the directory looks like a slimllm output."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "manifest.json").write_text('{"model": "other", "stages": {}}')  # looks like a run of another model
    (home / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    for out, cwd in ((home, tmp_path), (Path("."), home)):
        monkeypatch.chdir(cwd)
        result = run_cli("compile", str(tiny_model_dir("llama")), "--method", "last", "--remove", "1",
                         "--target", "onnx", "--profile", "none", "--out", str(out), "--force")
        assert result.exit_code == 2, result.output
        assert "choose another --out" in result.stderr
        assert (home / "thesis.tex").read_text() == "years of work"


def test_missing_llama_cpp_fails_before_the_first_stage(tmp_path, tiny_model_dir, monkeypatch):
    """compile --target gguf without the llama extra: one line naming the extra, before any pruning."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an environment without llama-cpp-python sees
    out = tmp_path / "run"
    result = run_cli("compile", str(tiny_model_dir("llama")), "--method", "last", "--remove", "1",
                     "--target", "gguf", "--profile", "none", "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "`llama` extra" in result.stderr
    assert not (out / "pruned").exists() and not (out / "manifest.json").exists()


@pytest.mark.parametrize(
    ("command", "args", "resumable"),
    [("compile", ["--out", "x"], True), ("prune", ["--out", "x"], True), ("eval", [], False),
     ("export", ["--target", "onnx"], False), ("profile", [], False)],
)
def test_interrupt_suggests_resume_only_where_there_is_one(command, args, resumable, monkeypatch):
    """Ctrl-C inside a command: exit 130 and a line that mentions --resume only for commands that have it.

    The command runs as usual except that its body is interrupted at once; what is checked is the hint each
    command hands to the shared error handling."""
    from slimllm.cli.app import run_command

    def interrupted_body(debug, action, resume_hint=None):
        return run_command(debug, _raise(KeyboardInterrupt), resume_hint)

    module = __import__(f"slimllm.cli.{command}_command", fromlist=["run_command"])
    monkeypatch.setattr(module, "run_command", interrupted_body)
    result = run_cli(command, *args)
    assert result.exit_code == 130, result.output
    assert result.stderr.startswith("interrupted: ")
    assert ("--resume" in result.stderr) is resumable


def _raise(exc_type):
    def action():
        raise exc_type()

    return action


def test_out_of_memory_is_one_line_naming_the_settings(capsys):
    """A real allocation beyond the machine's memory becomes one line naming what lowers memory, exit 1."""
    import torch
    import typer

    from slimllm.cli.app import run_command

    def allocate_too_much():
        torch.empty(1 << 60, dtype=torch.uint8)  # 1 EiB: no machine has it

    with pytest.raises(typer.Exit) as raised:
        run_command(False, allocate_too_much)
    assert raised.value.exit_code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of memory") and "--batch-size" in lines[0]
