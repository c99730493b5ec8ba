"""`slimllm compile` end to end on a tiny model: every stage, reuse, reruns, refusal, failures, interrupt and resume."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import EVAL_FILE, REPO_ROOT, TINY_COMPILE_SECTION, TINY_GGUF_SECTION
from test_cli import _assert_user_error, run_cli

import slimllm
from slimllm.cli.app import ProgressBar
from slimllm.pipeline.compiler import MANIFEST_FILE
from slimllm.pipeline.stages import compile_stages

TINY_RECIPE = TINY_COMPILE_SECTION + """
[prune]
method = "trsp"
calib_blocks = 8
block_len = 64
batch_size = 2

[trsp]
steps_per_round = 2
stage2_steps = 4
""" + TINY_GGUF_SECTION

TINY_FRONTIER = """
[frontier]
gguf_types = ["q8_0"]
onnx_variants = []
pruned = []
eval_seq_len = 64
eval_windows = 2
task = "none"
"""

TINY_PROFILE = """
[profile]
name = "tiny"
threads = 2
prompt_lengths = [16]
generate_tokens = 8
repeats = 1
warmup = 1

[[backend]]
kind = "torch"

[[backend]]
kind = "onnxruntime"

[[backend]]
kind = "llama.cpp"
gguf_types = ["q8_0"]
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.toml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture
def recipe_with_tasks(tmp_path):
    """The tiny recipe with HellaSwag on (12 tasks), for the tests that check the accuracy stage."""
    path = tmp_path / "recipe-tasks.toml"
    path.write_text(TINY_RECIPE.replace('eval_task = "none"', "eval_tasks = 12"))
    return path


@pytest.fixture
def tiny_profile(tmp_path):
    path = tmp_path / "tiny-profile.toml"
    path.write_text(TINY_PROFILE)
    return path


def _compile_args(model, out, recipe, text_file, *extra):
    return [
        "compile", str(model), "--remove", "2", "--calib", str(text_file), "--recipe", str(recipe),
        "--eval-data", str(EVAL_FILE), "--out", str(out), *extra,
    ]


@pytest.mark.slow
def test_compile_all_end_to_end_then_reuse(tiny_model_dir, tmp_path, recipe_with_tasks, tiny_profile, text_file):
    """Every stage, the frontier included (the dense model's Q8_0 against this run's), then a rerun reusing all."""
    out, recipe = tmp_path / "run", recipe_with_tasks
    recipe.write_text(recipe.read_text().replace("[compile]\n", "[compile]\nfrontier = true\n") + TINY_FRONTIER)
    result = slimllm.compile(
        str(tiny_model_dir("llama")), out=out, target="all", remove=2, calib=str(text_file),
        eval_data=str(EVAL_FILE), profile=str(tiny_profile), recipe=recipe,
    )
    registered = [spec.name for spec in compile_stages()]
    builtin = ["prune", "heal", "export_onnx", "export_gguf", "evaluate", "accuracy", "profile", "frontier", "report"]
    assert [name for name in registered if name in builtin] == builtin  # a new stage takes its place by its order
    stages = [name for name in registered if name != "heal"]  # the recipe turns healing off
    assert result.ran_stages == stages and not result.reused_stages
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for stage in stages:
        entry = manifest["stages"][stage]
        assert entry["status"] == "done" and entry["seconds"] >= 0 and entry["versions"]["torch"]
    inputs = {name: manifest["stages"][name]["inputs"] for name in ("prune", "evaluate")}
    assert inputs["prune"]["settings"]["dense_sha256"] == inputs["evaluate"]["settings"]["dense_sha256"]
    assert inputs["evaluate"]["reads"]["prune"] == manifest["stages"]["prune"]["outputs"]["sha256"]
    perplexity = json.loads((out / "evaluation.json").read_text())["perplexity"]
    assert {"dense (PyTorch)", "pruned (PyTorch)", "pruned (GGUF Q8_0, llama.cpp)"} <= set(perplexity)
    onnx_row = next(k for k in perplexity if k.startswith("pruned (ONNX"))
    assert perplexity[onnx_row] == pytest.approx(perplexity["pruned (PyTorch)"], rel=1e-4)
    # KL statistics of every artifact against the dense model, on the same windows: the ONNX export computes what
    # the pruned checkpoint computes; Q8_0 adds its rounding on top.
    divergence = json.loads((out / "evaluation.json").read_text())["divergence"]
    assert set(divergence) == set(perplexity) - {"dense (PyTorch)"}
    pruned_kld = divergence["pruned (PyTorch)"]["kld"]["mean"]
    assert pruned_kld > 0 and divergence[onnx_row]["kld"]["mean"] == pytest.approx(pruned_kld, rel=1e-3)
    assert divergence["pruned (GGUF Q8_0, llama.cpp)"]["ppl"] == perplexity["pruned (GGUF Q8_0, llama.cpp)"]
    # HellaSwag on the same 12 tasks for the dense model, the pruned one and each export.
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert set(accuracy["models"]) == set(perplexity) and accuracy["tasks"] == 12
    rows = accuracy["models"]
    assert rows[onnx_row]["acc_norm"] == rows["pruned (PyTorch)"]["acc_norm"]
    assert accuracy["correct"][onnx_row] == accuracy["correct"]["pruned (PyTorch)"]
    assert "agreement_with_dense" in rows["pruned (PyTorch)"] and "agreement_with_dense" not in rows["dense (PyTorch)"]
    report = (out / "report.md").read_text()
    for fragment in ("removed 2 of 6 layers", "gates.png", "Parity of the exports", "](latency.png)",
                     "tg8 tok/s", "slimllm compile", "## Divergence from the dense model", "## Zero-shot accuracy",
                     "| pruned (GGUF Q8_0, llama.cpp) |", "## Deployment frontier", "compiled q8_0"):
        assert fragment in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # the gate trajectory, the latency chart, the frontier
    frontier = json.loads((out / "frontier" / "frontier.json").read_text())
    assert {c["name"] for c in frontier["candidates"]} == {"dense q8_0", "compiled q8_0"}
    assert (out / "gguf" / "pruned-Q8_0.gguf").is_file() and (out / "onnx" / "model.onnx").is_file()

    started = time.perf_counter()
    again = run_cli(*_compile_args(tiny_model_dir("llama"), out, recipe, text_file, "--profile", str(tiny_profile)))
    assert again.exit_code == 0, again.output
    assert time.perf_counter() - started < 60
    reused = "reused finished stages: prune, export_onnx, export_gguf, evaluate, accuracy, profile, frontier, report"
    assert reused in again.output


@pytest.mark.slow
def test_changed_setting_reruns_that_stage_and_later_ones(tiny_model_dir, tmp_path, recipe, text_file):
    out = tmp_path / "run"
    first = slimllm.compile(
        str(tiny_model_dir("qwen2")), out=out, remove=2, calib=str(text_file), eval_data=str(EVAL_FILE),
        profile=None, recipe=recipe,
    )
    assert "profile" not in first.ran_stages
    second = slimllm.compile(
        str(tiny_model_dir("qwen2")), out=out, remove=2, calib=str(text_file), eval_data=str(EVAL_FILE),
        profile=None, recipe=recipe, overrides={"gguf": {"outtypes": ["q4_0"]}},
    )
    assert second.reused_stages == ["prune", "export_onnx"]
    assert second.ran_stages == ["export_gguf", "evaluate", "report"]
    assert (out / "gguf" / "pruned-Q4_0.gguf").is_file() and not (out / "gguf" / "pruned-Q8_0.gguf").exists()


@pytest.mark.slow
def test_a_stage_whose_computation_changed_is_not_reused(tiny_model_dir, tmp_path, recipe_with_tasks, text_file,
                                                         monkeypatch):
    """A new version of a stage (what it computes changed) reruns it; the others are reused (the report too, here,
    because the rerun wrote the same evaluation.json: stages are keyed by the content they read)."""
    import dataclasses

    from slimllm.pipeline.stages import _STAGES

    args = {"remove": 2, "calib": str(text_file), "eval_data": str(EVAL_FILE), "profile": None,
            "recipe": recipe_with_tasks, "target": "onnx"}
    out = tmp_path / "run"
    bar, calls = ProgressBar("compile"), []

    def record(done, total, **postfix):
        calls.append((postfix.get("bar"), postfix.get("stage"), done, total))
        bar(done, total, **postfix)

    first = slimllm.compile(str(tiny_model_dir("llama")), out=out, progress=record, **args)
    bar.close()
    # One bar per stage, in order, and inside a bar one total per step (no total borrowed from another stage).
    assert bar.opened == first.ran_stages == ["prune", "export_onnx", "evaluate", "accuracy", "report"]
    for stage in first.ran_stages:
        steps = {}
        for _, step, done, total in (c for c in calls[1:] if c[0] == stage and c[2:] != (0, 1)):
            assert 0 <= done <= total and steps.setdefault(step, total) == total, (stage, step, done, total)
    assert {step for name, step, *_ in calls if name == "prune"} >= {"select 1/2", "transfer"}
    evaluate = _STAGES["evaluate"]
    monkeypatch.setitem(_STAGES, "evaluate", dataclasses.replace(evaluate, version=evaluate.version + 1))
    again = slimllm.compile(str(tiny_model_dir("llama")), out=out, **args)
    assert again.ran_stages == ["evaluate"]
    assert again.reused_stages == ["prune", "export_onnx", "accuracy", "report"]


@pytest.mark.slow
def test_compile_without_a_method_prunes_with_the_settings_default(tiny_model_dir, tmp_path, text_file):
    """Neither a flag nor the recipe names a method: compile uses PruneSettings' default, as prune, plan and the
    README say (compile used to fall back to TRSP)."""
    from slimllm.pruning.settings import PruneSettings

    recipe = tmp_path / "no-method.toml"
    recipe.write_text(TINY_RECIPE.replace('method = "trsp"\n', "").split("[trsp]")[0])
    result = slimllm.compile(str(tiny_model_dir("llama")), out=tmp_path / "run", remove=2, calib=str(text_file),
                             eval_data=str(EVAL_FILE), profile=None, recipe=recipe, target="gguf")
    prune = result.manifest["stages"]["prune"]["result"]
    assert prune["method"] == PruneSettings().method.value == "shortgpt" and len(prune["removed_layers"]) == 2


def test_method_none_exports_the_dense_model(tiny_model_dir, tmp_path, recipe_with_tasks, monkeypatch):
    """Also: without a HellaSwag file where the shared data would be, accuracy is skipped and the report says why."""
    monkeypatch.setenv("SLIMLLM_DATA_DIR", str(tmp_path / "no-data" / "wikitext2"))
    out = tmp_path / "dense"
    result = run_cli(
        "compile", str(tiny_model_dir("mistral")), "--method", "none", "--target", "gguf", "--recipe",
        str(recipe_with_tasks),
        "--profile", "none", "--out", str(out), "--json",
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)["manifest"]
    assert manifest["stages"]["prune"]["result"]["method"] == "none"
    assert "export_onnx" not in manifest["stages"]
    assert (out / "gguf" / f"{tiny_model_dir('mistral').name}-Q8_0.gguf").is_file()
    assert not (out / "pruned").exists()
    assert "skipped" in manifest["stages"]["accuracy"]["result"] and not (out / "accuracy.json").exists()
    assert "Not measured: no hellaswag file at" in (out / "report.md").read_text()


@pytest.mark.slow
def test_foreign_out_is_refused_without_force(tiny_model_dir, tmp_path, recipe, text_file):
    out = tmp_path / "run"
    args = _compile_args(tiny_model_dir("llama"), out, recipe, text_file, "--target", "onnx", "--profile", "none")
    assert run_cli(*args).exit_code == 0
    other = _compile_args(tiny_model_dir("qwen3"), out, recipe, text_file, "--target", "onnx", "--profile", "none")
    _assert_user_error(run_cli(*other), "holds a compile run of another model")
    assert json.loads((out / MANIFEST_FILE).read_text())["model"] == str(tiny_model_dir("llama"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    not_a_run = _compile_args(tiny_model_dir("llama"), tmp_path / "notes", recipe, text_file, "--profile", "none")
    _assert_user_error(run_cli(*not_a_run), "already exists and is not empty")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    forced = run_cli(*other, "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / MANIFEST_FILE).read_text())["model"] == str(tiny_model_dir("qwen3"))


def test_parity_failure_fails_the_command_naming_stage_and_figure(
    tiny_model_dir, tmp_path, recipe, text_file, monkeypatch
):
    import onnx

    import slimllm.exporters.onnx as onnx_exporter

    real_export = onnx_exporter._export_with_optimum

    def export_then_damage(checkpoint, out, settings, provider):
        real_export(checkpoint, out, settings, provider)
        model = onnx.load(str(out / "model.onnx"))
        node = next(n for n in model.graph.node if n.name.endswith("mlp/down_proj/MatMul"))
        weight = next(i for i in model.graph.initializer if i.name == node.input[1])
        values = onnx.numpy_helper.to_array(weight).copy() * 3.0
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        onnx.save(model, str(out / "model.onnx"))

    monkeypatch.setattr(onnx_exporter, "_export_with_optimum", export_then_damage)
    out = tmp_path / "run"
    result = run_cli(*_compile_args(tiny_model_dir("llama"), out, recipe, text_file, "--profile", "none"))
    assert result.exit_code == 1, result.output
    assert "stage export_onnx failed" in result.stderr and "max_abs_logits" in result.stderr
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["stages"]["prune"]["status"] == "done"
    assert manifest["stages"]["export_onnx"]["status"] == "failed"
    assert "max_abs_logits" in manifest["stages"]["export_onnx"]["error"]
    assert not (out / "onnx").exists() and (out / "onnx.failed" / "validation.json").is_file()
    assert not (out / "report.md").exists()


@pytest.mark.slow
def test_disk_full_is_said_plainly(tiny_model_dir, tmp_path, recipe, text_file, monkeypatch):
    import dataclasses

    from slimllm.pipeline.stages import _STAGES, compile_stages

    def no_space(ctx):
        raise OSError(errno.ENOSPC, "No space left on device", str(ctx.out_dir / "evaluation.json"))

    compile_stages()
    monkeypatch.setitem(_STAGES, "evaluate", dataclasses.replace(_STAGES["evaluate"], run=no_space))
    out = tmp_path / "run"
    args = _compile_args(tiny_model_dir("llama"), out, recipe, text_file, "--target", "onnx", "--profile", "none")
    result = run_cli(*args)
    assert result.exit_code == 1
    assert "error: no space left on the device while writing" in result.stderr and "Traceback" not in result.output
    assert json.loads((out / MANIFEST_FILE).read_text())["stages"]["evaluate"]["status"] == "failed"


@pytest.mark.slow
def test_interrupt_then_resume(tiny_model_dir, tmp_path, text_file):
    """Ctrl-C in TRSP leaves a manifest saying what finished; --resume continues from the round checkpoint."""
    recipe = tmp_path / "slow.toml"
    # Long rounds, so that the interrupt lands inside round 2, after round 1's checkpoint.
    recipe.write_text(TINY_RECIPE.replace("steps_per_round = 2", "steps_per_round = 150"))
    out = tmp_path / "run"
    args = _compile_args(tiny_model_dir("llama"), out, recipe, text_file, "--target", "gguf", "--profile", "none")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "slimllm", *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        # A shell that runs the suite in the background starts it with SIGINT ignored; give the child Ctrl-C back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    checkpoint = out / "pruned.partial" / "trsp" / "stage1.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoint.is_file(), "TRSP wrote no round checkpoint"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["stages"]["prune"]["status"] == "interrupted"
    assert not (out / "pruned").exists()

    resumed = run_cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["stages"]["prune"]["result"]["resumed"] is True
    assert all(entry["status"] == "done" for entry in manifest["stages"].values())
    record = json.loads((out / "pruned" / "slimllm_pruning.json").read_text())
    assert record["details"]["resumed_from"].startswith("stage 1 round")


def test_compile_user_errors(tiny_model_dir, tmp_path, recipe):
    base = ["compile", str(tiny_model_dir("llama")), "--out", str(tmp_path / "o")]
    _assert_user_error(run_cli(*base, "--target", "tflite"), "unknown --target 'tflite'")
    _assert_user_error(run_cli(*base, "--method", "magic", "--remove", "1"), "unknown --method 'magic'")
    _assert_user_error(run_cli(*base), "pass --remove K or --ratio R")
    _assert_user_error(run_cli(*base, "--method", "none", "--remove", "2"), "--method none compiles the dense model")
    _assert_user_error(run_cli(*base, "--remove", "6", "--calib", "self"), "cannot remove 6 layers")
    _assert_user_error(run_cli(*base, "--remove", "1", "--profile", "nope"), "unknown profile 'nope'")
    _assert_user_error(run_cli(*base, "--remove", "1", "--eval-task", "arc"), "unknown --eval-task 'arc'")
    _assert_user_error(run_cli(*base, "--remove", "1", "--eval-task-file", str(tmp_path / "none.txt")),
                       "--eval-task-file")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gguf]\nouttype = ['f16']\n[compile]\nprofil = 'x'\n")
    _assert_user_error(run_cli(*base, "--remove", "1", "--recipe", str(bad)), "gguf.outtype, compile.profil")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_recipe_target_and_export_settings_are_used_and_reports_show_only_this_run(tiny_model_dir, tmp_path):
    """[compile] target and [onnx] eval settings from a recipe are used unless a flag is given; a rerun with another
    --target reports exactly its own stages, with no leftover ONNX section and no stage still 'running'."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        TINY_RECIPE.replace("[compile]\n", '[compile]\ntarget = "onnx"\n') + "\n[onnx]\neval_seq_len = 48\n"
    )
    out = tmp_path / "run"
    base = ["compile", str(tiny_model_dir("llama")), "--method", "last", "--remove", "1", "--recipe", str(recipe),
            "--profile", "none", "--out", str(out)]
    first = run_cli(*base)
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert "export_onnx" in manifest["run_stages"] and "export_gguf" not in manifest["run_stages"]
    assert manifest["settings"]["onnx"]["eval_seq_len"] == 48  # the [onnx] value, not compile's 64
    assert "Parity of the exports" in (out / "report.md").read_text()

    second = run_cli(*base, "--target", "gguf", "--eval-seq-len", "40")
    assert second.exit_code == 0, second.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["run_stages"] == ["prune", "export_gguf", "evaluate", "report"]
    assert manifest["settings"]["gguf"]["eval_seq_len"] == 40  # a flag that was given wins over every recipe value
    report = (out / "report.md").read_text()
    assert "ONNX `" not in report and "GGUF files in llama.cpp" in report
    assert "running" not in report.split("## Stages", 1)[1]
    assert "export_onnx" not in report.split("## Stages", 1)[1]
    # The first run's ONNX export is gone with its manifest entry: nothing stale can be validated by mistake.
    assert not (out / "onnx").exists() and "export_onnx" not in manifest["stages"]
    assert (out / "gguf").is_dir()


@pytest.mark.slow
def test_compile_2ssp_exports_blocks_without_attention_to_both_targets(tiny_model_dir, tmp_path, text_file):
    """2SSP through the whole pipeline: a checkpoint with narrower FFNs and blocks without attention, a deci GGUF
    and an ONNX export that pass parity, evaluation, and a report that says what was removed."""
    out, recipe = tmp_path / "run", tmp_path / "2ssp.toml"
    recipe.write_text(TINY_RECIPE + '\n[2ssp]\nsparsity = 0.4\nwidth_multiple = "64"\n')
    result = run_cli("compile", str(tiny_model_dir("llama", num_layers=6)), "--method", "2ssp", "--calib",
                     str(text_file), "--recipe", str(recipe), "--eval-data", str(EVAL_FILE), "--profile", "none",
                     "--out", str(out))
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert {"prune", "export_onnx", "export_gguf", "evaluate"} <= set(manifest["run_stages"])
    config = json.loads((out / "pruned" / "config.json").read_text())
    assert config["model_type"] == "slimllm_llama" and config["attention_free_layers"]
    assert config["intermediate_size"] == 64
    gguf_validation = json.loads(next((out / "gguf").glob("validation.json")).read_text())
    assert gguf_validation["passed"]
    assert "FFN width 128 -> 64" in (out / "report.md").read_text()
