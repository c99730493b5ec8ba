"""The deployment frontier: the Pareto logic with noise, the choice under constraints, bad input, and a real run on
a tiny model (llama.cpp and onnxruntime) that caches every measurement by content."""

from __future__ import annotations

import json

import pytest
from conftest import EVAL_FILE
from test_cli import _assert_user_error, run_cli

from slimllm.core.errors import UserInputError
from slimllm.frontier.choice import choose
from slimllm.frontier.pareto import Interval, Point, pareto
from slimllm.frontier.results import CandidateResult
from slimllm.frontier.settings import FrontierSettings, parse_variant


def _point(name, speed, kld, speed_noise=1.0, kld_noise=0.001):
    return Point(name, Interval(speed, speed - speed_noise, speed + speed_noise), Interval.around(kld, kld_noise))


def test_a_candidate_is_dominated_only_beyond_the_noise_and_the_dominator_is_named():
    verdict = pareto([_point("q8_0", 150, 0.010), _point("q4_0", 220, 0.090), _point("slow-bad", 100, 0.5),
                      _point("near-q8", 149.5, 0.0105)])
    assert verdict["slow-bad"] == "q8_0"  # slower and further, beyond both noises
    assert verdict["q8_0"] is None and verdict["q4_0"] is None
    assert verdict["near-q8"] is None  # within q8_0's noise on both axes: a tie, not dominated


def test_ties_and_a_single_candidate_stay_on_the_frontier():
    assert pareto([_point("only", 10, 1.0)]) == {"only": None}
    assert pareto([_point("a", 100, 0.1), _point("b", 100, 0.1)]) == {"a": None, "b": None}
    # better on one axis beyond noise, tied on the other: dominates
    assert pareto([_point("a", 120, 0.1), _point("b", 100, 0.1)])["b"] == "a"
    # smaller is better on the size chart
    sizes = [Point("small", Interval.exact(80), Interval.around(0.1, 0.001)),
             Point("big", Interval.exact(200), Interval.around(0.1, 0.001))]
    assert pareto(sizes, speed_higher_is_better=False) == {"small": None, "big": "small"}


def _result(name, decode, kld, mib, ppl_ratio=1.0):
    return CandidateResult(name, name.split()[0], "llama.cpp", name.split()[1], f"/x/{name}", int(mib * 2**20),
                           quality={"kld": {"mean": kld, "stderr": 0.001}, "ppl_ratio": ppl_ratio},
                           speed={"tg128": {"median": decode, "min": decode - 1, "max": decode + 1}})


CANDIDATES = [_result("dense f16", 120, 0.0005, 258), _result("dense q8_0", 158, 0.004, 138, 1.004),
              _result("dense q4_0", 228, 0.09, 87, 1.26), _result("pruned q8_0", 231, 0.35, 109, 1.6)]


def test_the_choice_is_the_closest_to_dense_that_meets_a_speed_constraint_and_says_why():
    choice = choose(CANDIDATES, {"min_speedup": 1.8}, "dense f16")
    assert choice.winner.name == "dense q4_0"  # 1.9x; pruned q8_0 is faster still but further from dense
    assert "dense q4_0 won" in choice.summary and "pruned q8_0" in choice.summary
    assert choose(CANDIDATES, {"max_kld": 0.1}, "dense f16").winner.name == "dense q4_0"  # the fastest within KLD
    assert choose(CANDIDATES, {"max_size": 100, "max_ppl_ratio": 2}, "dense f16").winner.name == "dense q4_0"


def test_when_nothing_fits_the_closest_constraint_and_its_miss_are_named():
    choice = choose(CANDIDATES, {"min_speedup": 1.9, "max_kld": 0.05}, "dense f16")
    assert choice.winner is None
    assert "No candidate meets every constraint" in choice.summary
    # q4_0 misses --max-kld by 80 %, q8_0 misses --min-speedup by 30.7 %: q8_0 comes closest
    assert "Closest: dense q8_0" in choice.summary and "--min-speedup, by 30.7 %" in choice.summary
    assert choose(CANDIDATES, {}, "dense f16").winner is None  # no constraint, no choice


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"gguf_types": ["q4_z"]}, "unknown quantization type 'q4_z' in --gguf-types"),
        ({"onnx_variants": ["int3"]}, "unknown ONNX variant 'int3'"),
        ({"pruned": ["shortgpt"]}, "is not METHOD:BUDGET"),
        ({"pruned": ["shortgpt:2.5"]}, "removes whole layers"),
        ({"pruned": ["2ssp:3"]}, "takes a sparsity between 0 and 1"),
        ({"pruned": ["2ssp:0.2:depth=3"]}, "is not a 2ssp setting"),
        ({"pruned": ["magic:4"]}, "unknown --method 'magic'"),
        ({"max_kld": -1}, "--max-kld must be positive"),
    ],
)
def test_bad_settings_are_one_clear_error(values, fragment):
    with pytest.raises(UserInputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        FrontierSettings(**values)


def test_a_variant_takes_the_recipes_prune_and_heal_settings_under_its_own_method_and_budget():
    from slimllm.frontier.models import variant_settings

    sections = {"prune": {"method": "trsp", "remove": 8, "repair": "lsq", "calib_blocks": 7},
                "heal": {"tokens": 4096}, "2ssp": {"alpha": 2.0}}
    prune, own, heal = variant_settings(parse_variant("shortgpt:0.27"), sections)
    assert (prune.method.value, prune.remove, prune.ratio, prune.repair.value, prune.calib_blocks) == \
        ("shortgpt", None, 0.27, "lsq", 7)
    assert heal.tokens == 4096 and heal.calib == prune.calib
    prune, own, _ = variant_settings(parse_variant("2ssp:0.15:stage=width"), sections)
    assert prune.repair is None  # the recipe's layer repair does not apply to a method that removes no layer
    assert (own.sparsity, own.stage.value, own.alpha) == (0.15, "width", 2.0)


def test_variants_parse_to_their_method_budget_and_options():
    assert parse_variant("shortgpt:8").label == "shortgpt-8"
    assert parse_variant("2ssp:0.25:stage=width").options == (("stage", "width"),)
    assert parse_variant("shortgpt:0.27").budget == 0.27  # a share of the layers


TINY_FRONTIER_PROFILE = """
[profile]
name = "tiny"
threads = 2
prompt_lengths = [16]
generate_tokens = 8
repeats = 2
warmup = 0

[[backend]]
kind = "onnxruntime"

[[backend]]
kind = "llama.cpp"
"""


@pytest.fixture
def tiny_frontier(tmp_path):
    profile = tmp_path / "tiny.toml"
    profile.write_text(TINY_FRONTIER_PROFILE)
    settings = dict(gguf_types=["f16", "q8_0"], onnx_variants=["fp32"], pruned=["last:1"], heal=False,
                    eval_data=str(EVAL_FILE), eval_seq_len=64, eval_windows=2, task=None)
    return profile, settings


@pytest.mark.slow
def test_a_frontier_run_measures_every_candidate_then_measures_only_what_is_new(tiny_model_dir, tmp_path,
                                                                             tiny_frontier, text_file):
    from slimllm.frontier.run import run_frontier

    profile, values = tiny_frontier
    model, out = str(tiny_model_dir("llama")), tmp_path / "frontier"
    sections = {"prune": {"calib": str(text_file), "calib_blocks": 2, "block_len": 32, "repair": "none"}}
    first = run_frontier(model, FrontierSettings(**values, max_kld=10.0), profile, out, sections)
    names = {r.name for r in first.results}
    assert names == {"dense f16", "dense q8_0", "dense fp32", "last-1 f16", "last-1 q8_0", "last-1 fp32"}
    for result in first.results:
        assert result.decode.value > 0 and result.prefill.value > 0 and result.size_bytes > 0
        assert result.kld >= 0 and result.quality["ppl"] > 0 and result.speed["peak_rss_bytes"] > 0
        # llama-perplexity's protocol beside the whole windows: the second half of each 64-token window.
        half = result.quality["second_half"]
        assert 0 < 2 * half["tokens"] <= result.quality["tokens"] and half["ppl"] > 0
    by_name = {r.name: r for r in first.results}
    assert by_name["dense f16"].kld < by_name["last-1 f16"].kld  # removing a layer moves further than rounding
    assert set(first.verdicts) == {"llama.cpp", "onnxruntime"}
    assert set(first.verdicts["llama.cpp"]["decode"]) == {"dense f16", "dense q8_0", "last-1 f16", "last-1 q8_0"}
    assert any(v is None for v in first.verdicts["llama.cpp"]["decode"].values())
    assert first.choice.winner is not None and (out / "best").is_dir() and any((out / "best").iterdir())
    payload = json.loads((out / "frontier.json").read_text())
    assert len(payload["candidates"]) == 6 and payload["choice"]["winner"] == first.choice.winner.name
    assert (out / "frontier-llama.cpp.png").is_file()
    report = (out / "frontier.md").read_text()
    assert "frontier-onnxruntime.png" in report and "| PPL | PPL ½ |" in report
    half = by_name["last-1 q8_0"].quality["second_half"]["ppl"]
    assert f"| {by_name['last-1 q8_0'].quality['ppl']:.2f} | {half:.2f} |" in report
    assert sorted(first.measured) == sorted(f"{kind} {name}" for kind in ("quality", "speed") for name in names)

    # One more quantization type: only its two candidates are exported and measured.
    again = run_frontier(model, FrontierSettings(**{**values, "gguf_types": ["f16", "q8_0", "q4_0"]}), profile, out,
                         sections)
    assert sorted(again.measured) == sorted(f"{kind} {name}" for kind in ("quality", "speed")
                                            for name in ("dense q4_0", "last-1 q4_0"))
    assert {r.name for r in again.results} == names | {"dense q4_0", "last-1 q4_0"}

    # An interrupted run resumes: a measurement that was never written is the only one made again.
    next((out / "work" / "measurements").glob("speed-*.json")).unlink()
    resumed = run_frontier(model, FrontierSettings(**{**values, "gguf_types": ["f16", "q8_0", "q4_0"]}), profile,
                           out, sections)
    assert len(resumed.measured) == 1 and resumed.measured[0].startswith("speed ")

    # A time budget that is already spent: every candidate keeps its KLD (measured on two windows first) and says why
    # it was not measured further.
    hurried = run_frontier(model, FrontierSettings(**{**values, "gguf_types": ["f16", "q8_0", "q4_0"]},
                                                   max_minutes=1e-4), profile, out, sections)
    assert all(r.speed is None and r.kld >= 0 and r.notes for r in hurried.results)
    assert any("time budget was spent" in r.notes[0] for r in hurried.results)

    # From the command line, with a constraint no candidate meets: everything is reused, the frontier is written,
    # and the one error line names the closest candidate (exit code 1: a failed check, not bad input).
    recipe = tmp_path / "frontier.toml"
    recipe.write_text(f'[prune]\ncalib = "{text_file}"\ncalib_blocks = 2\nblock_len = 32\nrepair = "none"\n')
    result = run_cli("frontier", model, "--profile", str(profile), "--out", str(out), "--recipe", str(recipe),
                     "--gguf-types", "f16,q8_0,q4_0", "--onnx-variants", "fp32", "--pruned", "last:1", "--no-heal",
                     "--eval-data", str(EVAL_FILE), "--eval-seq-len", "64", "--eval-windows", "2", "--task", "none",
                     "--max-kld", "1e-12")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(errors) == 1 and "error: No candidate meets every constraint. Closest:" in errors[0], result.stderr
    assert "Traceback" not in result.output and (out / "frontier.md").is_file()


def test_a_profile_without_the_backend_a_ladder_needs_is_one_clear_line(tiny_model_dir, tmp_path):
    profile = tmp_path / "torch-only.toml"
    profile.write_text('[profile]\nname = "torch-only"\n\n[[backend]]\nkind = "torch"\n')
    result = run_cli("frontier", str(tiny_model_dir("llama")), "--profile", str(profile), "--out",
                     str(tmp_path / "f"), "--onnx-variants", "none")
    _assert_user_error(result, "profile 'torch-only' has no llama.cpp backend to measure --gguf-types on")
    assert not (tmp_path / "f").exists()
    result = run_cli("frontier", str(tiny_model_dir("llama")), "--out", str(tmp_path / "f"), "--gguf-types", "q9_k")
    _assert_user_error(result, "unknown quantization type 'q9_k' in --gguf-types")


def test_a_candidate_that_fails_its_export_check_is_listed_with_the_figure_and_not_exported_again(
        tiny_model_dir, tmp_path):
    """A sharp model (large embeddings) with outliers that Q4_0's one scale per 32 weights cannot hold: the file is
    written, fails its perplexity check against its own checkpoint, and the frontier records that instead of
    stopping; a rerun reads the kept record."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimllm.core.artifacts import sha256_tree
    from slimllm.frontier.candidates import Candidate, CandidateCheckFailed, export_candidate
    from slimllm.frontier.models import FrontierModel

    model_dir = tmp_path / "outliers"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama", hidden=256))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(50.0)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, ::32] = 40.0
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir("llama", hidden=256)).save_pretrained(model_dir)
    candidate = Candidate(FrontierModel("dense", model_dir, sha256_tree(model_dir), {}), "llama.cpp", "q4_0")
    settings = FrontierSettings(gguf_types=["q4_0"], onnx_variants=[], pruned=[], eval_data=str(EVAL_FILE),
                                eval_seq_len=64, eval_windows=2, task=None)
    with pytest.raises(CandidateCheckFailed) as failed:
        export_candidate(candidate, tmp_path / "work", settings)
    assert failed.value.reason.startswith("failed its export check: Q4_0: PPL") and failed.value.size_bytes > 0
    started = time.perf_counter()
    with pytest.raises(CandidateCheckFailed) as again:
        export_candidate(candidate, tmp_path / "work", settings)
    assert again.value.reason == failed.value.reason and time.perf_counter() - started < 1.0
    # In a run, the candidate is a result with the failed figure as its note, and nothing to measure.
    from slimllm.frontier.run import _Clock, _exported

    items, listed = _exported([candidate], tmp_path / "work", settings, _Clock(), None)
    assert items == [] and [r.name for r in listed] == ["dense q4_0"]
    assert listed[0].notes == [failed.value.reason] and listed[0].speed is None and listed[0].size_bytes > 0
