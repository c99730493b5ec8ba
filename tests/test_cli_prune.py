"""`slimllm prune` end to end on a tiny model, and its user errors."""

import json

import pytest
import torch
from conftest import CALIB_FILE
from test_cli import _assert_user_error, run_cli
from transformers import AutoModelForCausalLM

from slimllm.models.checkpoints import PRUNING_RECORD_FILE


def test_prune_writes_a_loadable_checkpoint(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "pruned"
    result = run_cli(
        "prune",
        str(tiny_model_dir("qwen3")),
        "--method",
        "shortgpt",
        "--remove",
        "2",
        "--calib",
        str(text_file),
        "--calib-blocks",
        "4",
        "--block-len",
        "64",
        "--out",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["removed_layers"]) == 2 and payload["original_num_layers"] == 6
    assert payload["params_after"] < payload["params_before"]
    record = json.loads((out / PRUNING_RECORD_FILE).read_text())
    for key in (
        "original_num_layers",
        "kept_layers",
        "removed_layers",
        "method",
        "settings",
        "calibration",
        "seed",
        "timings",
    ):
        assert key in record
    assert record["calibration"]["source"] == str(text_file)
    assert record["kept_layers"] == [i for i in range(6) if i not in record["removed_layers"]]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4 and len(model.config.layer_types) == 4
    with torch.no_grad():
        generated = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=2)
    assert generated.shape == (1, 7)
    assert not list(tmp_path.glob(".pruned.tmp-*")), "no temporary directory is left behind"


def test_prune_text_summary(tiny_model_dir, tmp_path):
    # The default calibration (the model writes 8k tokens itself) is measured elsewhere; a file keeps this fast.
    calib = ["--calib", str(CALIB_FILE), "--calib-blocks", "4", "--block-len", "32"]
    result = run_cli("prune", str(tiny_model_dir("llama")), "--method", "last", "--ratio", "0.34", *calib,
                     "--out", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    assert "removed 2 of 6 layers with last: [3, 4]" in result.stdout
    assert "parameters" in result.stdout and "time" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--remove", "5"], "cannot remove 5 layers"),
        (["--remove", "-1"], "--remove must be a positive number"),
        (["--ratio", "1.5"], "--ratio must be between 0 and 1"),
        (["--ratio", "0"], "--ratio must be between 0 and 1"),
        (["--remove", "2", "--ratio", "0.3"], "exactly one of --remove K or --ratio R"),
        (["--remove", "2", "--method", "magic"], "unknown --method 'magic'"),
        (["--remove", "2", "--protect-first", "3", "--protect-last", "3"], "only 0 are candidates"),
    ],
)
def test_prune_user_errors(tiny_model_dir, tmp_path, args, fragment):
    out = tmp_path / "out"
    result = run_cli("prune", str(tiny_model_dir("llama")), "--method", "last", *args, "--out", str(out))
    _assert_user_error(result, fragment)
    assert not out.exists()


def test_prune_refuses_non_empty_out_without_force(tiny_model_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["prune", str(tiny_model_dir("llama")), "--method", "last", "--remove", "1", "--out", str(out)]
    _assert_user_error(run_cli(*args), "already exists and is not empty; pass --force")
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces only what slimllm wrote: a folder of someone else's files is refused even then.
    _assert_user_error(run_cli(*args, "--force"), "--force only replaces outputs slimllm wrote")
    assert (out / "keep.txt").read_text() == "precious"
    ours = tmp_path / "ours"
    calib = ["--calib", str(CALIB_FILE), "--calib-blocks", "4", "--block-len", "32"]  # not 8k self-written tokens
    first = ["prune", str(tiny_model_dir("llama")), *calib, "--method", "last", "--remove", "1", "--out", str(ours)]
    assert run_cli(*first).exit_code == 0
    result = run_cli(*first[:-4], "--method", "random", "--remove", "2", "--out", str(ours), "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((ours / PRUNING_RECORD_FILE).read_text())["method"] == "random"


def test_prune_refuses_calibrating_on_test_split(tiny_model_dir, tmp_path):
    from conftest import EVAL_FILE

    result = run_cli("prune", str(tiny_model_dir("llama")), "--method", "shortgpt", "--remove", "1",
                     "--calib", str(EVAL_FILE), "--out", str(tmp_path / "p"))
    _assert_user_error(result, "refusing to calibrate on wiki.test.raw")


def test_prune_names_the_kind_of_each_removed_layer_and_its_share_of_the_compute(tiny_model_dir, tmp_path):
    """Gemma 3 alternates local and global attention; the record says which kind went, and what share of a token's
    compute the removed layers were, with and without the LM head (which pruning keeps)."""
    result = run_cli("prune", str(tiny_model_dir("gemma3")), "--method", "last", "--remove", "2", "--protect-last", "0",
                     "--calib", str(CALIB_FILE), "--calib-blocks", "4", "--block-len", "32",
                     "--out", str(tmp_path / "p"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "p" / PRUNING_RECORD_FILE).read_text())
    assert record["removed_layers"] == [4, 5]
    assert record["removed_kinds"] == {"4": "local", "5": "global"}
    compute = record["compute_removed"]
    # Identical blocks: two of six are a third of the blocks' compute; the 49k-token LM head dilutes it.
    assert compute["blocks"] == pytest.approx(2 / 6)
    assert 0 < compute["with_lm_head"] < compute["blocks"]
    assert "[4, 5] (local, global); 33.3 % of the blocks' compute" in result.stdout
