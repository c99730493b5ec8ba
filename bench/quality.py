"""Quality benchmark: dense against every pruning method, in one run, on the same calibration and evaluation text.

    python bench/quality.py --model smollm2-135m --remove 8 \
        --calib ../shared/data/wikitext2/wiki.valid.tokens --eval-data ../shared/data/wikitext2/wiki.test.raw \
        --seq-len 1024 --max-windows 24

Writes bench/results/quality-<model>-k<k>.json and .md: perplexity, KL to dense, top-1 agreement with dense,
removed layers and time per method, with the machine, library versions and settings.
Every method sees the same calibration blocks; all models are scored in one pass over the same windows.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speed_common import HELLASWAG_FILE  # noqa: E402

from slimllm.core.artifacts import (  # noqa: E402
    atomic_write_json,
    atomic_write_text,
    digest,
    library_versions,
    machine_info,
)
from slimllm.core.data import (  # noqa: E402
    DataPurpose,
    bos_prefix_id,
    load_calibration,
    load_corpus,
    split_development,
    tokenize_corpus,
)
from slimllm.evaluation.accuracy import evaluate_tasks, pad_token_id  # noqa: E402
from slimllm.evaluation.perplexity import compare_with_reference, split_windows, torch_logits_fn  # noqa: E402
from slimllm.evaluation.sequence_scoring import torch_shared_prefix_log_probs  # noqa: E402
from slimllm.evaluation.tasks import read_task  # noqa: E402
from slimllm.models.loading import LoadedModel, load_model  # noqa: E402
from slimllm.pipeline.recipes import build_settings, load_recipe  # noqa: E402
from slimllm.pruning.dress import DressSettings, NeuronScore  # noqa: E402
from slimllm.pruning.methods import BASELINE_METHODS, PruneMethod  # noqa: E402
from slimllm.pruning.stage import PruneSettings, count_parameters, prune_in_memory  # noqa: E402
from slimllm.pruning.surgery import remove_layers  # noqa: E402
from slimllm.pruning.trsp import Stage2Mode, TrainScope, TrspSettings  # noqa: E402
from slimllm.pruning.two_ssp import TwoSspSettings  # noqa: E402
from slimllm.recovery.healing import HealScope, HealSettings, heal_model  # noqa: E402
from slimllm.recovery.repair import RepairMethod, repair_before_removal  # noqa: E402
from slimllm.recovery.training import fine_tune, frozen_teacher  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "examples" / "recipes" / "smollm2-135m-cpu.toml"


def development_scores(args, loaded: LoadedModel, rows: list[Row]) -> dict[str, dict]:
    """Perplexity and KL of every row on the development slice (the tail of --calib no row calibrated or trained
    on): what recipes are chosen by."""
    if not args.dev_fraction:
        return {}
    corpus = load_corpus(args.calib, DataPurpose.CALIBRATION)
    _, dev_ids = split_development(tokenize_corpus(corpus, loaded.tokenizer), args.dev_fraction)
    windows = split_windows(dev_ids, args.seq_len, args.max_windows, bos_prefix_id(loaded.tokenizer))
    print(f"[quality] development slice: {windows.shape[0]} windows ...", file=sys.stderr, flush=True)
    dense, results = compare_with_reference(
        torch_logits_fn(loaded.model), {row.name: torch_logits_fn(row.model) for row in rows}, windows
    )
    scores = {"dense": {"dev_perplexity": dense.perplexity, "dev_windows": int(windows.shape[0])}}
    for name, result in results.items():
        scores[name] = {"dev_perplexity": result.perplexity, "dev_kl_to_dense": result.kl_to_reference}
    return scores


def hellaswag_scores(args, loaded: LoadedModel, rows: list[Row]) -> dict[str, dict]:
    """acc_norm, acc and the per-token rule of the dense model and every row on the same HellaSwag tasks."""
    if not args.hellaswag_tasks:
        return {}
    tasks = read_task("hellaswag", args.hellaswag_file)
    pad = pad_token_id(loaded.tokenizer)
    scores = {}
    for name, model in [("dense", loaded.model), *((row.name, row.model) for row in rows)]:
        print(f"[quality] hellaswag {name} ...", file=sys.stderr, flush=True)
        result = evaluate_tasks(
            torch_shared_prefix_log_probs(model, pad), loaded.tokenizer, tasks, limit=args.hellaswag_tasks
        )
        scores[name] = {
            "hellaswag_acc_norm": result.acc_norm,
            "hellaswag_acc_norm_stderr": result.acc_norm_stderr,
            "hellaswag_acc": result.acc,
            "hellaswag_per_token": result.acc_per_token,
            "hellaswag_seconds": result.seconds,
        }
    return scores


@dataclass
class Row:
    """One benchmark row: a pruned model and how it was made."""

    name: str
    model: torch.nn.Module
    removed_layers: list[int]
    seconds: float
    training_tokens: int = 0
    notes: str = ""
    extra: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class BenchSettings:
    """Everything a row may depend on, given explicitly (no row reads a global)."""

    prune: PruneSettings
    """Shared selection settings: k, protection, calibration blocks, batch size, seed."""
    trsp: TrspSettings
    """TRSP as the recipe configures it."""
    sleb_blocks: int | None = None
    """SLEB scores on the first N calibration blocks."""
    heal_lr: float | None = None
    """LR of the healing and dense+ft rows (None: the recipe's stage2_lr)."""
    width_sparsity: float = 0.25
    """Fraction of every block's FFN neurons the width rows (dress, 2ssp-width) remove."""
    dress_tokens: int = 16_384
    """DReSS's regularization tokens; prune-then-fine-tune gets them as extra fine-tuning."""
    recovery_tokens: int = 16_384
    """The recovery fine-tune (healing: CE + 1 x KL to dense) after the width rows' removal."""


@dataclass
class TrspRun:
    model: torch.nn.Module
    removed_layers: list[int]
    selection_details: dict
    seconds: float


class Bench:
    """The shared inputs of every row, and a cache of shared work keyed by its settings' hash.

    A TRSP run used by several rows (the `trsp` row, the ablation and the healing budget) runs once per distinct
    settings, whichever row asks first, so a row's result never depends on which rows ran before it.
    """

    def __init__(self, loaded: LoadedModel, settings: BenchSettings, calibration, train_calibration) -> None:
        self.loaded = loaded
        self.settings = settings
        self.calibration = calibration
        self.train_calibration = train_calibration
        self._trsp_runs: dict[str, TrspRun] = {}

    def trsp_run(self, trsp: TrspSettings) -> TrspRun:
        key = digest({"prune": self.settings.prune, "trsp": trsp})
        if key not in self._trsp_runs:
            prune = dataclasses.replace(self.settings.prune, method=PruneMethod.TRSP)
            pruned, report, selection, seconds = prune_in_memory(
                self.loaded, prune, self.train_calibration or self.calibration, method_settings=trsp
            )
            self._trsp_runs[key] = TrspRun(pruned, report.removed_layers, selection.details, seconds)
        return self._trsp_runs[key]

    @property
    def heal_lr(self) -> float:
        return self.settings.heal_lr or self.settings.trsp.stage2_lr

    def heal(self, model, tokens: int, scope: HealScope = HealScope.FULL):
        """`slimllm heal` in memory: CE + 1 x KL to the dense model for `tokens` tokens on the training blocks."""
        prune = self.settings.prune
        settings = HealSettings(tokens=tokens, block_len=prune.block_len, batch_size=prune.batch_size,
                                lr=self.heal_lr if scope is HealScope.FULL else None, distill=1.0, scope=scope,
                                seed=prune.seed)
        teacher = frozen_teacher(self.loaded.model)
        healed, result = heal_model(model, (self.train_calibration or self.calibration).blocks, settings, teacher)
        return healed, result, settings

    def removal_with_repair(self, layers: list[int], repair: RepairMethod):
        """The dense model minus `layers`, with the training-free repair folded in first; (model, record, s)."""
        started = time.perf_counter()
        model = copy.deepcopy(self.loaded.model)
        prune = self.settings.prune
        record = repair_before_removal(model, layers, self.calibration.blocks, prune.batch_size, repair,
                                       prune.repair_ridge)
        pruned, _ = remove_layers(model, sorted(layers))
        return pruned, record, time.perf_counter() - started

    def fine_tune(self, model, tokens: int, teacher=None, distill: float = 0.0):
        """LM fine-tuning on the training blocks for `tokens` tokens, at the heal LR; with a teacher and distill > 0
        the loss adds distill x KL(teacher || model)."""
        prune = self.settings.prune
        steps = max(1, round(tokens / (prune.batch_size * prune.block_len)))
        blocks = (self.train_calibration or self.calibration).blocks
        log = fine_tune(model, blocks, steps, self.heal_lr, prune.batch_size, prune.seed, teacher=teacher,
                        distill=distill)
        model.eval()
        return log


RowBuilder = Callable[[Bench], Row]


def baseline_row(method: PruneMethod, repair: RepairMethod = RepairMethod.NONE) -> RowBuilder:
    """A method that selects without training; with `repair`, the training-free repair folded in before removal."""

    def build(bench: Bench) -> Row:
        prune = dataclasses.replace(bench.settings.prune, method=method, repair=repair)
        calibration, notes = bench.calibration, ""
        limit = bench.settings.sleb_blocks if method is PruneMethod.SLEB else None
        if limit is not None and calibration.blocks.shape[0] > limit:
            calibration = dataclasses.replace(calibration, blocks=calibration.blocks[:limit])
            notes = f"first {limit} calibration blocks (cost: one suffix forward per candidate per step)"
        pruned, report, selection, seconds = prune_in_memory(bench.loaded, prune, calibration)
        name = method.value if repair is RepairMethod.NONE else f"{method.value}+{repair.value}"
        row = Row(name, pruned, report.removed_layers, seconds, notes=notes)
        if "repair" in selection.details:
            row.extra = {"repair": selection.details["repair"]}
        return row

    return build


def twossp_row(bench: Bench) -> Row:
    """2SSP at the block-parameter sparsity of removing k whole layers (k / N: every block is the same size)."""
    num_layers = bench.loaded.model.config.num_hidden_layers
    sparsity = bench.settings.prune.remove / num_layers
    prune = dataclasses.replace(bench.settings.prune, method=PruneMethod("2ssp"), remove=None)
    pruned, _, selection, seconds = prune_in_memory(bench.loaded, prune, bench.calibration,
                                                    method_settings=TwoSspSettings(sparsity=sparsity))
    details = selection.details
    return Row("2ssp", pruned, [], seconds, notes=selection.summary,
               extra={key: details[key] for key in ("ffn_kept", "attention_removed", "achieved_sparsity",
                                                    "width_seconds", "attention_seconds")})


def width_row(score: NeuronScore, regularize: bool, recover: bool) -> RowBuilder:
    """FFN-width rows at `--width-sparsity`, all through DReSS's selection so that they remove the same neurons:
    `2ssp-width` removes them at once (2SSP's score, no training), `2ssp-width+ft` then fine-tunes for DReSS's
    regularization plus recovery tokens, `dress` regularizes first and recovers with the same fine-tune (equal
    tokens); `dress-magnitude` and `dress-random` are the ablation of the selection score."""

    def build(bench: Bench) -> Row:
        settings = bench.settings
        dress = DressSettings(sparsity=settings.width_sparsity, score=score,
                              reg_tokens=settings.dress_tokens if regularize else 0, lr=bench.heal_lr)
        prune = dataclasses.replace(settings.prune, method=PruneMethod("dress"), remove=None)
        pruned, _, selection, seconds = prune_in_memory(bench.loaded, prune, bench.train_calibration,
                                                        method_settings=dress)
        details = selection.details
        name = "dress" if regularize else "2ssp-width"
        name += f"-{score.value}" if score is not NeuronScore.ACTIVATION else ""
        notes = f"FFN {details['ffn_width_before']} -> {details['ffn_kept']}"
        tokens = details["training_tokens"]
        if regularize:
            notes += (f"; {details['steps']} regularization steps, selected share of FFN output "
                      f"{details['share_before']:.3f} -> {details['share_after']:.3f}")
        extra = {key: details[key] for key in ("ffn_kept", "achieved_width_sparsity", "share_before", "share_after",
                                               "selected_norm_after", "steps", "penalty")}
        if recover:
            budget = settings.recovery_tokens + (0 if regularize else settings.dress_tokens)
            pruned, result, heal = bench.heal(pruned, budget)
            seconds += result.seconds
            tokens += result.tokens
            notes += f"; {result.steps} recovery steps (CE + KL, lr {heal.learning_rate})"
            name += "" if regularize else "+ft"
            extra["heal"] = result.to_dict()
        return Row(name, pruned, [], seconds, training_tokens=tokens, notes=notes, extra=extra)

    return build


def trsp_row(bench: Bench) -> Row:
    trsp = bench.settings.trsp
    run = bench.trsp_run(trsp)
    details = run.selection_details
    transfer = ", ".join(
        f"{k}: {details['delta_before_stage2'][k]:.3f}->{details['delta_after_stage2'][k]:.3f}"
        for k in details.get("delta_before_stage2", {})
    )
    notes = (
        f"selection order {details['selection_order']}; stage 2 {trsp.stage2.value}; "
        f"relative |y-x| before/after stage 2: {transfer}"
    )
    row = Row("trsp", run.model, run.removed_layers, run.seconds, training_tokens=details["training_tokens"],
              notes=notes)
    row.extra = {"trsp": details}
    return row


def trsp_no_stage2_row(bench: Bench) -> Row:
    """TRSP's stage-1 selection removed without knowledge transfer (the ablation)."""
    trsp = bench.settings.trsp
    prune = bench.settings.prune
    if trsp.train_scope is TrainScope.GATES:
        # Gate-only stage 1 leaves the weights untouched: the ablation is the dense model minus the same layers.
        details = bench.trsp_run(trsp).selection_details
        pruned, report = remove_layers(bench.loaded.model, sorted(details["selection_order"]))
        return Row(
            "trsp-no-stage2",
            pruned,
            report.removed_layers,
            details["stage1_seconds"],
            training_tokens=len(details["stage1_losses"]) * prune.batch_size * prune.block_len,
            notes="the trsp row's stage-1 selection, removed without stage 2",
        )
    run = bench.trsp_run(dataclasses.replace(trsp, stage2=Stage2Mode.NONE))
    return Row("trsp-no-stage2", run.model, run.removed_layers, run.seconds,
               training_tokens=run.selection_details["training_tokens"])


def heal_row(distill: bool) -> RowBuilder:
    """ShortGPT's removal, then fine-tuning with the same number of tokens as the trsp row.

    Plain LM fine-tuning (`shortgpt+heal`), or with the distillation term TRSP's stage 2 uses (`shortgpt+heal-kd`,
    weight: the recipe's, or 1 when it has none), which separates what distillation buys from what regularizing
    before removal buys.
    """

    def build(bench: Bench) -> Row:
        tokens = bench.trsp_run(bench.settings.trsp).selection_details["training_tokens"]
        prune = dataclasses.replace(bench.settings.prune, method=PruneMethod.SHORTGPT)
        pruned, report, _, selection_seconds = prune_in_memory(bench.loaded, prune, bench.calibration)
        weight = (bench.settings.trsp.distill or 1.0) if distill else 0.0
        teacher = frozen_teacher(bench.loaded.model) if distill else None
        log = bench.fine_tune(pruned, tokens, teacher=teacher, distill=weight)
        loss = f"CE + {weight} x KL to dense" if distill else "CE"
        return Row(
            "shortgpt+heal-kd" if distill else "shortgpt+heal",
            pruned,
            report.removed_layers,
            selection_seconds + log.seconds,
            training_tokens=log.tokens,
            notes=f"{log.steps} AdamW steps at lr {bench.heal_lr} on {loss} (same tokens as trsp)",
        )

    return build


def trsp_selection_with_repair_row(repair: RepairMethod, heal: bool) -> RowBuilder:
    """TRSP's stage-1 selection removed with a training-free repair, then (with `heal`) healed by distillation for
    the rest of the trsp row's token budget (its total minus what stage 1 used)."""

    def build(bench: Bench) -> Row:
        details = bench.trsp_run(bench.settings.trsp).selection_details
        stage1_tokens = len(details["stage1_losses"]) * bench.settings.prune.batch_size * bench.settings.prune.block_len
        layers = sorted(details["selection_order"])
        model, record, seconds = bench.removal_with_repair(layers, repair)
        name = f"trsp-no-stage2+{repair.value}"
        row = Row(name, model, layers, details["stage1_seconds"] + seconds, training_tokens=stage1_tokens,
                  notes="the trsp row's stage-1 selection, repaired and removed without stage 2")
        row.extra = {"repair": record}
        if heal:
            model, result, settings = bench.heal(model, details["training_tokens"] - stage1_tokens)
            row = Row(f"trsp+{repair.value}+heal", model, layers, row.seconds + result.seconds,
                      training_tokens=stage1_tokens + result.tokens,
                      notes=f"trsp stage-1 selection, {repair.value}, then {result.steps} steps of healing "
                            f"(CE + KL, lr {settings.learning_rate})")
            row.extra = {"repair": record, "heal": result.to_dict()}
        return row

    return build


def shortgpt_repair_heal_row(repair: RepairMethod, scope: HealScope) -> RowBuilder:
    """ShortGPT's removal with a training-free repair, then healing by distillation at the trsp row's budget."""

    def build(bench: Bench) -> Row:
        tokens = bench.trsp_run(bench.settings.trsp).selection_details["training_tokens"]
        prune = dataclasses.replace(bench.settings.prune, method=PruneMethod.SHORTGPT, repair=repair)
        pruned, report, selection, seconds = prune_in_memory(bench.loaded, prune, bench.calibration)
        model, result, settings = bench.heal(pruned, tokens, scope)
        suffix = "heal" if scope is HealScope.FULL else "heal-lora"
        row = Row(f"shortgpt+{repair.value}+{suffix}", model, report.removed_layers, seconds + result.seconds,
                  training_tokens=result.tokens,
                  notes=f"{result.steps} steps of {scope.value} healing (CE + KL, lr {settings.learning_rate}, "
                        f"{result.trainable_params / 1e6:.2f}M trainable) after {repair.value} (same tokens as trsp)")
        row.extra = {"repair": selection.details.get("repair"), "heal": result.to_dict()}
        return row

    return build


def dense_ft_row(bench: Bench) -> Row:
    """The dense model fine-tuned with the same tokens: how much of a gain is only domain adaptation."""
    tokens = bench.trsp_run(bench.settings.trsp).selection_details["training_tokens"]
    model = copy.deepcopy(bench.loaded.model)
    log = bench.fine_tune(model, tokens)
    return Row("dense+ft", model, [], log.seconds, training_tokens=log.tokens,
               notes=f"{log.steps} AdamW steps at lr {bench.heal_lr} (same tokens as trsp)")


TRAINING_ROWS = ("trsp", "trsp-no-stage2", "trsp-no-stage2+lsq", "trsp+lsq+heal", "shortgpt+heal",
                 "shortgpt+heal-kd", "shortgpt+lsq+heal", "shortgpt+lsq+heal-lora", "dense+ft", "2ssp-width",
                 "2ssp-width+ft", "dress", "dress-magnitude", "dress-random")

# The rows this benchmark knows, in report order: the TRSP rows, the healing rows, then one row per registered
# method that selects without training.
ROW_BUILDERS: dict[str, RowBuilder] = {
    "trsp": trsp_row,
    "trsp-no-stage2": trsp_no_stage2_row,
    "trsp-no-stage2+lsq": trsp_selection_with_repair_row(RepairMethod.LSQ, heal=False),
    "trsp+lsq+heal": trsp_selection_with_repair_row(RepairMethod.LSQ, heal=True),
    "shortgpt+lsq+heal": shortgpt_repair_heal_row(RepairMethod.LSQ, HealScope.FULL),
    "shortgpt+lsq+heal-lora": shortgpt_repair_heal_row(RepairMethod.LSQ, HealScope.LORA),
    "shortgpt+heal": heal_row(distill=False),
    "shortgpt+heal-kd": heal_row(distill=True),
    "dense+ft": dense_ft_row,
    "2ssp": twossp_row,
    "2ssp-width": width_row(NeuronScore.ACTIVATION, regularize=False, recover=False),
    "2ssp-width+ft": width_row(NeuronScore.ACTIVATION, regularize=False, recover=True),
    "dress": width_row(NeuronScore.ACTIVATION, regularize=True, recover=True),
    "dress-magnitude": width_row(NeuronScore.MAGNITUDE, regularize=True, recover=True),
    "dress-random": width_row(NeuronScore.RANDOM, regularize=True, recover=True),
    **{method.value: baseline_row(method) for method in BASELINE_METHODS},
    **{
        f"{method.value}+{repair.value}": baseline_row(method, repair)
        for repair in RepairMethod
        if repair is not RepairMethod.NONE
        for method in BASELINE_METHODS
    },
}


def _command_line(args: argparse.Namespace) -> str:
    """The full command that reproduces this run, every setting spelled out."""
    parts = ["python bench/quality.py"]
    for key, value in vars(args).items():
        if key == "out_dir" or value is None:
            continue
        if isinstance(value, Path) and value.is_absolute() and value.is_relative_to(REPO_ROOT):
            value = value.relative_to(REPO_ROOT)
        parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", Path(name).name.lower()).strip("-")


def _format_layers(layers: list[int]) -> str:
    return ", ".join(str(i) for i in layers)


def write_markdown(path: Path, payload: dict) -> None:
    settings = payload["settings"]
    width_rows = [row["name"] for row in payload["rows"] if row["name"].startswith(("dress", "2ssp-width"))]
    if width_rows and len(width_rows) == len(payload["rows"]) - 1:
        title = f"FFN width sparsity {settings['width_sparsity']:.0%} in every block"
    else:
        title = f"{settings['remove']} of {payload['original_num_layers']} layers removed"
    lines = [
        f"# Quality: {payload['model']}, {title}",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Calibration: `{settings['calib']}` ({settings['calib_blocks']} blocks x {settings['block_len']} tokens, "
        f"seed {settings['seed']}); evaluation: `{settings['eval_data']}` ({payload['eval']['windows']} windows x "
        f"{settings['seq_len']} tokens, {payload['eval']['tokens_scored']} tokens scored).",
        "",
        (f"HellaSwag: the first {payload['eval']['hellaswag_tasks']} validation tasks, acc_norm ± standard error "
         "(lm-evaluation-harness's rule)." if payload["eval"].get("hellaswag_tasks") else "HellaSwag: not scored."),
        "",
        (f"Development slice (tuning only): the last {settings.get('dev_fraction', 0)} of `{settings['calib']}`, "
         "held apart from calibration and training." if settings.get("dev_fraction") else ""),
        "",
        "| method | PPL | KL to dense (nats) | top-1 agree | HellaSwag acc_norm | dev PPL | removed layers | params "
        "| training tokens | time s |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    footnotes = [f"- {row['name']}: {row['notes']}" for row in payload["rows"] if row.get("notes")]
    first = payload["rows"][1] if len(payload["rows"]) > 1 else None
    if first is not None and "peak_rss_gib_after_row" in first:
        footnotes.append(
            f"- {first['name']} ran first: {first['seconds']:.0f} s wall, process peak RSS "
            f"{first['peak_rss_gib_after_row']:.1f} GiB at its end (the dense model and the data included)"
        )
    for row in payload["rows"]:
        kl = "" if row["name"] == "dense" else f"{row['kl_to_dense']:.4f}"
        agree = "" if row["name"] == "dense" else f"{100 * row['top1_agreement']:.1f} %"
        ppl = f"{row['perplexity']:.4g}" if row["perplexity"] < 1e4 else f"{row['perplexity']:.3e}"
        hellaswag = (
            f"{100 * row['hellaswag_acc_norm']:.2f} ± {100 * row['hellaswag_acc_norm_stderr']:.2f}"
            if "hellaswag_acc_norm" in row else ""
        )
        dev = f"{row['dev_perplexity']:.4g}" if "dev_perplexity" in row else ""
        lines.append(
            f"| {row['name']} | {ppl} | {kl} | {agree} | {hellaswag} | {dev} | {_format_layers(row['removed_layers'])}"
            f" | {row['params'] / 1e6:.1f}M | {row['training_tokens']} | {row['seconds']:.1f} |"
        )
    if footnotes:
        lines += ["", "Notes:", *footnotes]
    machine = payload["machine"]
    versions = payload["versions"]
    lines += [
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_count']} cores), {machine.get('gpu', 'no GPU')}; "
        f"device {payload['device']}, dtype {payload['dtype']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        f"Wall time: {payload['wall_seconds']:.0f} s; peak RSS {payload['peak_rss_gib']:.1f} GiB.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--remove", type=int, default=8)
    parser.add_argument("--calib", default="../shared/data/wikitext2/wiki.valid.tokens")
    parser.add_argument("--eval-data", default="../shared/data/wikitext2/wiki.test.raw")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-windows", type=int, default=24)
    parser.add_argument("--calib-blocks", type=int, default=16)
    parser.add_argument("--block-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--protect-first", type=int, default=0)
    parser.add_argument("--protect-last", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sleb-blocks",
        type=int,
        default=4,
        help="SLEB scores on the first N calibration blocks (its greedy search costs ~k x L forwards).",
    )
    parser.add_argument(
        "--trsp-recipe", type=Path, default=DEFAULT_RECIPE, help="TOML recipe whose [trsp] table configures TRSP rows."
    )
    parser.add_argument(
        "--train-blocks",
        type=int,
        default=192,
        help="Calibration blocks the training rows (trsp, heals, dense+ft) draw their batches from.",
    )
    parser.add_argument(
        "--heal-lr",
        type=float,
        default=None,
        help="LR of the shortgpt+heal and dense+ft rows (default: the recipe's stage2_lr).",
    )
    parser.add_argument(
        "--hellaswag-tasks",
        type=int,
        default=1000,
        help="Score every row on the first N HellaSwag validation tasks (0: skip).",
    )
    parser.add_argument("--hellaswag-file", type=Path, default=HELLASWAG_FILE)
    parser.add_argument(
        "--dev-fraction",
        type=float,
        default=0.1,
        help="The last fraction of --calib, held apart from calibration and training: every row's perplexity on it "
        "is the figure settings are tuned on (the --eval-data figures are reported, never tuned on).",
    )
    parser.add_argument("--width-sparsity", type=float, default=0.25,
                        help="Fraction of every block's FFN neurons the width rows (dress, 2ssp-width) remove.")
    parser.add_argument("--dress-tokens", type=int, default=16_384, help="DReSS's regularization tokens.")
    parser.add_argument("--recovery-tokens", type=int, default=16_384,
                        help="Recovery fine-tune tokens after the width rows' removal (2ssp-width+ft also gets "
                        "--dress-tokens, so both see the same tokens).")
    parser.add_argument("--rows", default=",".join(ROW_BUILDERS), help="Comma-separated rows to run.")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--tag", default="", help="Suffix for the result file names (e.g. trsp).")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows_wanted if r not in ROW_BUILDERS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROW_BUILDERS)}")

    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, for_training=True)
    prune = PruneSettings(
        remove=args.remove,
        protect_first=args.protect_first,
        protect_last=args.protect_last,
        calib=args.calib,
        calib_blocks=args.calib_blocks,
        block_len=args.block_len,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    recipe = load_recipe(args.trsp_recipe) if args.trsp_recipe else {}
    if recipe.get("prune"):
        print(
            f"[quality] note: the [prune] table of {args.trsp_recipe} is not used here; the command line sets "
            "the shared calibration",
            file=sys.stderr,
        )
    settings = BenchSettings(prune, build_settings(TrspSettings, recipe.get("trsp"), {}, "[trsp]"), args.sleb_blocks,
                             args.heal_lr, args.width_sparsity, args.dress_tokens, args.recovery_tokens)
    calibration = load_calibration(
        args.calib, loaded.model, loaded.tokenizer, args.calib_blocks, args.block_len, args.seed, args.dev_fraction
    )
    train_calibration = None
    if any(name in TRAINING_ROWS for name in rows_wanted):
        train_calibration = load_calibration(
            args.calib, loaded.model, loaded.tokenizer, args.train_blocks, args.block_len, args.seed,
            args.dev_fraction,
        )
    bench = Bench(loaded, settings, calibration, train_calibration)
    rows: list[Row] = []
    for name in rows_wanted:
        print(f"[quality] {name} ...", file=sys.stderr, flush=True)
        row = ROW_BUILDERS[name](bench)
        # The process peak so far: for the first row, its own peak (plus the loaded dense model and the data).
        row.extra["peak_rss_gib_after_row"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(
            f"[quality] {name}: removed {row.removed_layers} in {row.seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)

    corpus = load_corpus(args.eval_data, DataPurpose.EVALUATION)
    windows = split_windows(
        tokenize_corpus(corpus, loaded.tokenizer), args.seq_len, args.max_windows, bos_prefix_id(loaded.tokenizer)
    )
    print(
        f"[quality] scoring dense + {len(rows)} rows on {windows.shape[0]} windows ...",
        file=sys.stderr,
        flush=True,
    )
    eval_started = time.perf_counter()
    dense_result, results = compare_with_reference(
        torch_logits_fn(loaded.model), {row.name: torch_logits_fn(row.model) for row in rows}, windows
    )
    eval_seconds = time.perf_counter() - eval_started
    development = development_scores(args, loaded, rows)
    hellaswag = hellaswag_scores(args, loaded, rows)

    num_layers = loaded.model.config.num_hidden_layers
    payload = {
        "benchmark": "quality",
        "model": args.model,
        "original_num_layers": num_layers,
        "command": _command_line(args),
        "settings": {
            **vars(args),
            "out_dir": str(
                args.out_dir.relative_to(REPO_ROOT) if args.out_dir.is_relative_to(REPO_ROOT) else args.out_dir
            ),
            "trsp_recipe": str(
                args.trsp_recipe.relative_to(REPO_ROOT)
                if args.trsp_recipe.is_relative_to(REPO_ROOT)
                else args.trsp_recipe
            ),
        },
        "calibration": calibration.describe(),
        "training_calibration": train_calibration.describe() if train_calibration is not None else None,
        "eval": {
            "data": args.eval_data,
            "data_sha256": corpus.sha256,
            "windows": int(windows.shape[0]),
            "seq_len": args.seq_len,
            "tokens_scored": dense_result.tokens_scored,
            "seconds": eval_seconds,
            "hellaswag_tasks": args.hellaswag_tasks,
            "hellaswag_file": str(args.hellaswag_file),
        },
        "rows": [
            {
                "name": "dense",
                "perplexity": dense_result.perplexity,
                "mean_nll": dense_result.mean_nll,
                "kl_to_dense": 0.0,
                "top1_agreement": 1.0,
                "removed_layers": [],
                "params": count_parameters(loaded.model),
                "seconds": 0.0,
                "training_tokens": 0,
                **development.get("dense", {}),
                **hellaswag.get("dense", {}),
            }
        ]
        + [
            {
                "name": row.name,
                "perplexity": results[row.name].perplexity,
                "mean_nll": results[row.name].mean_nll,
                "kl_to_dense": results[row.name].kl_to_reference,
                "top1_agreement": results[row.name].top1_agreement,
                "removed_layers": row.removed_layers,
                "params": count_parameters(row.model),
                "seconds": row.seconds,
                "training_tokens": row.training_tokens,
                "notes": row.notes,
                **development.get(row.name, {}),
                **hellaswag.get(row.name, {}),
                **row.extra,
            }
            for row in rows
        ],
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "machine": machine_info(),
        "versions": library_versions(),
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    stem = f"quality-{_slug(args.model)}-k{args.remove}" + (f"-{args.tag}" if args.tag else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out_dir / f"{stem}.json", payload)
    write_markdown(args.out_dir / f"{stem}.md", payload)
    for row in payload["rows"]:
        print(f"{row['name']:>10}  PPL {row['perplexity']:.4g}  removed {row['removed_layers']}")
    print(f"wrote {args.out_dir / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
