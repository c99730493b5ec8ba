"""Zero-shot multiple-choice accuracy: the HellaSwag reader, lm-evaluation-harness scoring on a tiny model, the
backends, and the CLI's errors."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import _assert_user_error, run_cli

from slimllm.core.errors import UserInputError
from slimllm.evaluation.accuracy import encode_pair, encode_task, evaluate_tasks, pad_token_id, score_task, task_scores
from slimllm.evaluation.perplexity import torch_logits_fn
from slimllm.evaluation.sequence_scoring import logits_fn_log_probs, shared_prefix_length, torch_shared_prefix_log_probs
from slimllm.evaluation.tasks import MultipleChoiceTask, read_task
from slimllm.evaluation.tasks.hellaswag import read_hellaswag

TASKS = [
    MultipleChoiceTask("Baking: She puts the tray in the oven. she", (
        "waits for the bread to rise and turn golden.",
        "throws the oven out of the window.",
        "sings to the flour.",
        "paints the tray blue and eats it.",
    ), 0),
    MultipleChoiceTask("Running: A man ties his shoes at the start line. the man", (
        "starts running when the whistle blows.",
        "melts into the track.",
        "swims across the stadium.",
        "reads a book to the shoes.",
    ), 0),
    MultipleChoiceTask("Gardening: A woman digs a hole in the garden. she", (
        "plants a small tree and waters it.",
        "flies to the moon.",
        "turns into a shovel.",
        "buries the garden in the hole.",
    ), 0),
]


def _write(path, tasks) -> None:
    lines = []
    for task in tasks:
        lines += [task.context, str(task.label), *task.endings]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from slimllm.models.loading import load_model

    return load_model(str(tiny_model_dir("llama")), device="cpu")


def test_reader_reads_tasks_and_names_the_line_of_a_malformed_file(tmp_path):
    good = tmp_path / "tasks.txt"
    _write(good, TASKS)
    assert read_hellaswag(good) == TASKS
    short = tmp_path / "short.txt"
    short.write_text("\n".join(good.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(UserInputError, match="task starting at line 13 is incomplete"):
        read_hellaswag(short)
    bad_label = tmp_path / "label.txt"
    lines = good.read_text().splitlines()
    lines[7] = "7"
    bad_label.write_text("\n".join(lines))
    with pytest.raises(UserInputError, match="line 8 should be the label 0-3"):
        read_hellaswag(bad_label)


def test_the_shared_file_reads(tmp_path):
    from conftest import DATA_DIR

    tasks = read_task("hellaswag", DATA_DIR.parent / "hellaswag" / "hellaswag_val_full.txt")
    assert len(tasks) == 10042 and all(len(t.endings) == 4 and 0 <= t.label < 4 for t in tasks)


def test_pair_encoding_splits_the_whole_text(tiny):
    context, continuation = encode_pair(tiny.tokenizer, TASKS[0].context, " " + TASKS[0].endings[0])
    whole = tiny.tokenizer(TASKS[0].context + " " + TASKS[0].endings[0])["input_ids"]
    assert context + continuation == whole and continuation


def _alone(model, sequence: list[int]) -> torch.Tensor:
    """log p(token i+1 | tokens ..i) from one unpadded forward of the sequence by itself."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([sequence])).logits.float(), -1)[0]
    return log_probs[:-1].gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]


@pytest.mark.parametrize("scoring", ["shared-prefix cache", "padded batch"])
def test_task_scores_equal_scoring_each_sequence_alone(tiny, scoring):
    """The shared prefix on a key/value cache, and the right-padded batch, give what one unpadded forward per
    context + ending gives, for both rules."""
    log_probs = (
        torch_shared_prefix_log_probs(tiny.model, pad_token_id(tiny.tokenizer))
        if scoring == "shared-prefix cache"
        else logits_fn_log_probs(torch_logits_fn(tiny.model), pad_id=0)
    )
    for task in TASKS:
        scores = score_task(log_probs, tiny.tokenizer, task)
        sequences = [tiny.tokenizer(task.context + " " + e)["input_ids"] for e in task.endings]
        shared = shared_prefix_length(sequences)
        assert shared > 0
        for i, ending in enumerate(task.endings):
            context, cont = encode_pair(tiny.tokenizer, task.context, " " + ending)
            alone = _alone(tiny.model, context + cont)
            assert scores.sums[i] == pytest.approx(float(alone[len(context) - 1 :].sum()), abs=1e-4)
            assert scores.ending_means[i] == pytest.approx(float(alone[shared - 1 :].mean()), abs=1e-5)


@pytest.mark.parametrize("scoring", ["shared-prefix cache", "padded batch"])
def test_tasks_scored_together_equal_tasks_scored_one_by_one(tiny, scoring):
    """Groups of different lengths in one forward (left-padded prefixes, repeated cache rows) change nothing."""
    log_probs = (
        torch_shared_prefix_log_probs(tiny.model, pad_token_id(tiny.tokenizer))
        if scoring == "shared-prefix cache"
        else logits_fn_log_probs(torch_logits_fn(tiny.model), pad_id=0)
    )
    encoded = [encode_task(tiny.tokenizer, task) for task in TASKS]
    assert len({e.group.shared for e in encoded}) > 1
    together = [task_scores(e, values) for e, values in zip(encoded, log_probs([e.group for e in encoded]),
                                                                strict=True)]
    for task, scores in zip(TASKS, together, strict=True):
        alone = score_task(log_probs, tiny.tokenizer, task)
        assert scores.sums == pytest.approx(alone.sums, abs=1e-4)
        assert scores.ending_means == pytest.approx(alone.ending_means, abs=1e-5)


def test_llama_cpp_rule_leaves_shared_leading_words_unscored(tiny):
    """llama-perplexity --hellaswag scores the tokens after the prefix all four sequences share: endings that all
    begin with the same word are judged on what follows it."""
    task = MultipleChoiceTask("A cook stands at the stove.", (
        "the cook stirs the soup.", "the cook eats the stove.", "the cook sings to a pan.", "the cook melts."), 0)
    sequences = [tiny.tokenizer(task.context + " " + e)["input_ids"] for e in task.endings]
    context = tiny.tokenizer(task.context)["input_ids"]
    shared = shared_prefix_length(sequences)
    assert shared > len(context)
    scores = score_task(logits_fn_log_probs(torch_logits_fn(tiny.model), 0), tiny.tokenizer, task)
    for i, sequence in enumerate(sequences):
        alone = _alone(tiny.model, sequence)
        assert scores.ending_means[i] == pytest.approx(float(alone[shared - 1 :].mean()), abs=1e-5)
        assert scores.tokens[i] == len(sequence) - len(context)
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2


def test_acc_and_acc_norm_by_hand(tiny):
    """acc picks the highest log-likelihood, acc_norm the highest per character of the ending (lm-evaluation-harness's
    len(choice), no leading space), per-token the highest mean over the tokens after the shared prefix."""
    log_probs = torch_shared_prefix_log_probs(tiny.model, 0)
    expected = {"acc": [], "acc_norm": [], "acc_per_token": []}
    for task in TASKS[:2]:
        scores = score_task(log_probs, tiny.tokenizer, task)
        per_char = [s / len(e) for s, e in zip(scores.sums, task.endings, strict=True)]
        expected["acc"].append(int(max(range(4), key=lambda i: scores.sums[i]) == task.label))
        expected["acc_norm"].append(int(max(range(4), key=lambda i: per_char[i]) == task.label))
        expected["acc_per_token"].append(int(max(range(4), key=lambda i: scores.ending_means[i]) == task.label))
    result = evaluate_tasks(log_probs, tiny.tokenizer, TASKS, limit=2)
    assert result.tasks == 2 and result.correct == expected
    assert result.acc == sum(expected["acc"]) / 2 and result.acc_norm == sum(expected["acc_norm"]) / 2
    values = expected["acc_norm"]
    mean = sum(values) / 2
    assert result.acc_norm_stderr == pytest.approx((sum((v - mean) ** 2 for v in values) / 1 / 2) ** 0.5)


def test_offset_and_limit_select_the_tasks(tiny):
    log_probs = torch_shared_prefix_log_probs(tiny.model, 0)
    middle = evaluate_tasks(log_probs, tiny.tokenizer, TASKS, limit=1, offset=1)
    alone = evaluate_tasks(log_probs, tiny.tokenizer, TASKS[1:2])
    assert middle.correct == alone.correct and middle.offset == 1
    with pytest.raises(UserInputError, match="no tasks left after --offset 5"):
        evaluate_tasks(log_probs, tiny.tokenizer, TASKS, offset=5)


def test_cli_hellaswag_on_a_tiny_model_and_its_errors(tiny_model_dir, tmp_path):
    tasks_file = tmp_path / "tasks.txt"
    _write(tasks_file, TASKS)
    result = run_cli("eval", str(tiny_model_dir("llama")), "--task", "hellaswag", "--task-file", str(tasks_file),
                     "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["tasks"] == 3 and 0 <= payload["acc_norm"] <= 1 and payload["backend"].startswith("torch")
    bad = tmp_path / "bad.txt"
    bad.write_text("only one line\n")
    _assert_user_error(
        run_cli("eval", str(tiny_model_dir("llama")), "--task", "hellaswag", "--task-file", str(bad)),
        "line 1 is incomplete",
    )
    _assert_user_error(run_cli("eval", str(tiny_model_dir("llama")), "--task", "winograd"), "unknown --task")


def test_onnx_and_gguf_backends_agree_with_pytorch(tiny_model_dir, tmp_path):
    """The same tasks scored from the ONNX export in onnxruntime and the F32 GGUF in llama.cpp."""
    from slimllm.exporters.gguf import GgufExportSettings, export_gguf
    from slimllm.exporters.onnx import OnnxExportSettings, export_onnx
    from slimllm.exporters.scorers import open_backend

    source = tiny_model_dir("llama")
    export_onnx(source, tmp_path / "onnx", OnnxExportSettings(eval_seq_len=32, eval_windows=1))
    export_gguf(source, tmp_path / "gguf", GgufExportSettings(outtypes=["f32"], eval_seq_len=32, eval_windows=1,
                                                               tokenizer_lines=0))
    sums = {}
    for spec, backend in ((str(source), "torch"), (str(tmp_path / "onnx"), "auto"), (str(tmp_path / "gguf"),
                                                                                     "llama.cpp")):
        with open_backend(spec, backend, device="cpu") as scorer:
            scores = score_task(scorer.sequence_log_probs, scorer.tokenizer, TASKS[0])
            sums[scorer.backend.split()[0]] = scores.sums + scores.ending_means
            # Each backend's own multiple-choice engine (llama.cpp: the prefix once, then each remainder on its
            # cache) gives what its whole padded sequences give.
            whole = score_task(logits_fn_log_probs(scorer.logits_fn, 0), scorer.tokenizer, TASKS[0])
            assert scores.sums == pytest.approx(whole.sums, abs=2e-3)
    assert set(sums) == {"torch", "onnxruntime", "llama.cpp"}
    assert sums["onnxruntime"] == pytest.approx(sums["torch"], abs=1e-3)
    assert sums["llama.cpp"] == pytest.approx(sums["torch"], abs=5e-2)


def test_a_scorer_releases_its_model_when_its_block_ends(tiny_model_dir, monkeypatch):
    """The evaluate and accuracy stages keep each `Scorer` after its block (for its backend text): the model behind
    it must be gone by then, so that two artifacts are never held at once while the next one loads."""
    import gc
    import weakref

    import slimllm.models.loading
    from slimllm.exporters.scorers import open_backend

    loaded_models = []
    real_load = slimllm.models.loading.load_model

    def tracked_load(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        loaded_models.append(weakref.ref(loaded.model))
        return loaded

    monkeypatch.setattr(slimllm.models.loading, "load_model", tracked_load)
    with open_backend(str(tiny_model_dir("llama")), "torch", device="cpu") as scorer:
        assert scorer.logits_fn(torch.tensor([[5, 6, 7]])).shape[-1] == 49152
    gc.collect()
    assert len(loaded_models) == 1 and loaded_models[0]() is None
    with pytest.raises(RuntimeError, match="released"):
        scorer.logits_fn(torch.tensor([[5, 6, 7]]))


def test_divergence_of_a_model_from_itself_is_zero(tiny):
    from slimllm.evaluation.divergence import divergence_statistics

    windows = torch.randint(3, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    logits_fn = torch_logits_fn(tiny.model)
    stats = divergence_statistics(logits_fn, logits_fn, windows)
    assert stats["tokens"] == 2 * 23 and stats["ppl_ratio"] == pytest.approx(1.0)
    assert stats["kld"]["mean"] == pytest.approx(0.0, abs=1e-6) and stats["kld"]["max"] == pytest.approx(0, abs=1e-5)
    assert stats["same_top1"]["mean"] == 1.0 and stats["delta_p"]["rms"] == pytest.approx(0.0, abs=1e-7)


def test_divergence_statistics_match_a_direct_computation(tiny):
    """Against a perturbed copy: mean KLD, same-top-1, Δp and percentiles equal a hand computation."""
    import copy

    import numpy as np

    from slimllm.evaluation.divergence import divergence_statistics

    perturbed = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    windows = torch.randint(3, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    stats = divergence_statistics(torch_logits_fn(perturbed), torch_logits_fn(tiny.model), windows)
    with torch.no_grad():
        p = torch.log_softmax(tiny.model(windows).logits[:, :-1].float(), -1).reshape(-1, 49152)
        q = torch.log_softmax(perturbed(windows).logits[:, :-1].float(), -1).reshape(-1, 49152)
    targets = windows[:, 1:].reshape(-1)
    kld = (p.exp() * (p - q)).sum(-1).numpy()
    delta = (q.gather(-1, targets[:, None]).exp() - p.gather(-1, targets[:, None]).exp())[:, 0].numpy()
    assert stats["kld"]["mean"] == pytest.approx(float(kld.mean()), rel=1e-4) and stats["kld"]["mean"] > 1e-4
    assert stats["kld"]["99%"] == pytest.approx(float(np.percentile(kld, 99)), rel=1e-4)
    assert stats["same_top1"]["mean"] == pytest.approx(float((p.argmax(-1) == q.argmax(-1)).float().mean()))
    assert stats["delta_p"]["mean"] == pytest.approx(float(delta.mean()), abs=1e-7)
    assert stats["kld"]["stderr"] == pytest.approx(float(kld.std(ddof=1) / np.sqrt(len(kld))), rel=1e-4)
    # llama-perplexity's protocol: only the predictions from the middle of each window on.
    half = divergence_statistics(torch_logits_fn(perturbed), torch_logits_fn(tiny.model), windows, first=12)
    second_half = kld.reshape(2, 23)[:, 12:]
    assert half["tokens"] == second_half.size == 22 and half["first_scored"] == 12
    assert half["kld"]["mean"] == pytest.approx(float(second_half.mean()), rel=1e-4)
    # Both protocols from the one whole-window pass: its second-half perplexities are those of the `first=12` pass.
    assert half["second_half"] is None and stats["second_half"]["tokens"] == 22
    for key in ("ppl", "reference_ppl", "ppl_ratio"):
        assert stats["second_half"][key] == pytest.approx(half[key], rel=1e-5)
    assert stats["second_half"]["ppl"] != pytest.approx(stats["ppl"], rel=1e-3)


def test_cli_kl_reference(tiny_model_dir, tmp_path):
    from conftest import EVAL_FILE

    result = run_cli("eval", str(tiny_model_dir("llama")), "--data", str(EVAL_FILE), "--seq-len", "32",
                     "--max-windows", "2", "--kl-reference", str(tiny_model_dir("qwen2")), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["tokens"] == 62 and payload["kld"]["mean"] > 0 and 0 <= payload["same_top1"]["mean"] <= 1
    assert set(payload["kld"]) >= {"mean", "stderr", "max", "99.9%", "99%", "95%", "90%", "median", "10%", "5%",
                                    "1%", "min"}
    half = run_cli("eval", str(tiny_model_dir("llama")), "--data", str(EVAL_FILE), "--seq-len", "32",
                   "--max-windows", "2", "--kl-reference", str(tiny_model_dir("qwen2")), "--kl-second-half", "--json")
    assert half.exit_code == 0, half.output
    assert json.loads(half.stdout)["tokens"] == 2 * 15


def test_the_task_file_is_found_beside_the_package_from_any_directory(tmp_path, monkeypatch):
    """Run from another working directory, the shared HellaSwag file is still found (it was looked up relative to
    the working directory, and compile's accuracy stage then skipped silently)."""
    from conftest import DATA_DIR

    from slimllm.evaluation.tasks import default_task_file

    monkeypatch.delenv("SLIMLLM_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    expected = DATA_DIR.parent / "hellaswag" / "hellaswag_val_full.txt"
    assert default_task_file("hellaswag").resolve() == expected.resolve() and expected.is_file()
