"""The real `slimllm` command: help, success paths and the exit code and message of every user error."""

import json
import subprocess
import sys

import pytest
from conftest import EVAL_FILE
from typer.testing import CliRunner

from slimllm.cli import app

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_commands_and_says_what_the_product_does():
    result = run_cli("--help")
    assert result.exit_code == 0
    output = " ".join(result.output.split())  # rich wraps the text to the terminal's width
    for command in ("compile", "prune", "heal", "export", "validate", "eval", "profile", "plan", "inspect"):
        assert command in output
    for capability in ("2SSP", "DReSS", "repair", "heal", "HellaSwag", "plan"):
        assert capability in output.split("Commands")[0], capability


def test_console_script_runs():
    completed = subprocess.run([sys.executable, "-m", "slimllm", "--version"], capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.startswith("slimllm ")


def test_eval_json_and_output_file(tiny_model_dir, tmp_path):
    out = tmp_path / "ppl.json"
    result = run_cli(
        "eval",
        str(tiny_model_dir("llama")),
        "--data",
        str(EVAL_FILE),
        "--seq-len",
        "64",
        "--max-windows",
        "2",
        "--json",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["windows"] == 2 and payload["tokens_scored"] == 126 and payload["perplexity"] > 1
    assert json.loads(out.read_text())["data_sha256"] == payload["data_sha256"]


def _assert_user_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0]
    assert "Traceback" not in result.output


def test_missing_model_path():
    _assert_user_error(run_cli("eval", "./no/such/model", "--data", str(EVAL_FILE)), "does not exist")


def test_unknown_model_name():
    _assert_user_error(run_cli("eval", "--model", "gpt-17", "--data", str(EVAL_FILE)), "unknown model 'gpt-17'")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    _assert_user_error(run_cli("eval", str(tmp_path / "gpt2"), "--data", str(EVAL_FILE)), "'gpt2' is not supported")


def test_empty_dataset(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _assert_user_error(run_cli("eval", str(tiny_model_dir("llama")), "--data", str(empty)), "holds no text")


def test_unreadable_file(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"\x00\x01 not parquet")
    _assert_user_error(run_cli("eval", str(tiny_model_dir("llama")), "--data", str(broken)), "not a readable parquet")


def test_missing_data_file(tiny_model_dir, tmp_path):
    _assert_user_error(
        run_cli("eval", str(tiny_model_dir("llama")), "--data", str(tmp_path / "x.txt")), "does not exist"
    )


def test_conflicting_models(tiny_model_dir):
    _assert_user_error(run_cli("eval", str(tiny_model_dir("llama")), "--model", "smollm2-135m"), "two different models")


def test_debug_shows_traceback():
    result = run_cli("eval", "./no/such/model", "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr


@pytest.mark.parametrize("value", ["cuda:7"])
def test_unavailable_device(tiny_model_dir, value):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the error path is for CPU-only machines")
    _assert_user_error(run_cli("eval", str(tiny_model_dir("llama")), "--device", value), "no CUDA GPU is visible")
