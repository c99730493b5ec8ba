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
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speed_common import HELLASWAG_FILE, REPO_ROOT, RESULTS_DIR  # noqa: E402

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
from slimllm.pruning.choices import PruneMethod  # noqa: E402
from slimllm.pruning.methods.dress import DressSettings, NeuronScore  # noqa: E402
from slimllm.pruning.methods.trsp import Stage2Mode, TrainScope, TrspSettings  # noqa: E402
from slimllm.pruning.registry import (  # noqa: E402
    BenchmarkVariant,
    PruningMethod,
    all_methods,
    get_method,
    method_settings_sections,
)
from slimllm.pruning.stage import PruneSettings, count_parameters, prune_in_memory  # noqa: E402
from slimllm.pruning.surgery import remove_layers  # noqa: E402
from slimllm.recovery.healing import HealScope, HealSettings, heal_model  # noqa: E402
from slimllm.recovery.repair import RepairMethod, repair_before_removal  # noqa: E402
from slimllm.recovery.training import fine_tune, frozen_teacher  # noqa: E402

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
    method_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Other methods' settings from the recipe's sections (`[2ssp]`, `[dress]`, ...), by method name."""

    def configured(self, method: PruningMethod) -> Any:
        """The settings the benchmark runs `method` with: the recipe's (TRSP's are `trsp`), else its defaults."""
        configured = {"trsp": self.trsp, **self.method_settings}
        return configured.get(method.name) or method.default_settings()


@dataclass
class MethodRun:
    """A method's selection and removal, as `prune_in_memory` made it."""

    model: torch.nn.Module
    removed_layers: list[int]
    details: dict
    summary: str
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
        self._runs: dict[str, MethodRun] = {}

    def method_run(self, method: str, method_settings=None, repair: RepairMethod | None = RepairMethod.NONE,
                   calibration=None, remove: int | None | str = "k") -> MethodRun:
        """`method` with `method_settings` (None: its defaults), repaired with `repair` (None: the method's default
        repair); trains on the training blocks when the method trains. `remove` None: the method sets its own target
        (2SSP, DReSS)."""
        spec = get_method(method)
        if calibration is None:
            calibration = (self.train_calibration or self.calibration) if spec.trains_weights else self.calibration
        prune = dataclasses.replace(self.settings.prune, method=PruneMethod(method), repair=repair)
        if remove != "k":
            prune = dataclasses.replace(prune, remove=remove)
        key = digest({"prune": prune, "method": method_settings, "blocks": list(calibration.blocks.shape)})
        if key not in self._runs:
            pruned, report, selection, seconds = prune_in_memory(self.loaded, prune, calibration,
                                                                 method_settings=method_settings)
            self._runs[key] = MethodRun(pruned, report.removed_layers, selection.details, selection.summary, seconds)
        return self._runs[key]

    def trsp_run(self, trsp: TrspSettings | None = None) -> MethodRun:
        return self.method_run("trsp", trsp or self.settings.trsp)

    @property
    def trsp_tokens(self) -> int:
        """The TRSP row's training tokens: the budget every row that heals at equal tokens gets."""
        return self.trsp_run().details["training_tokens"]

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


def _selection_notes(details: dict, summary: str, settings) -> str:
    """What a selection did, in words: its summary, or TRSP's selection order and stage-2 transfer."""
    if "selection_order" not in details:
        return summary
    transfer = ", ".join(
        f"{k}: {details['delta_before_stage2'][k]:.3f}->{details['delta_after_stage2'][k]:.3f}"
        for k in details.get("delta_before_stage2", {})
    )
    return (f"selection order {details['selection_order']}; stage 2 {settings.stage2.value}; "
            f"relative |y-x| before/after stage 2: {transfer}")


def select_row(method: PruningMethod, variant: BenchmarkVariant) -> RowBuilder:
    """The method as the benchmark's recipe configures it ([trsp] for TRSP, defaults otherwise), with the variant's
    options over its settings, removed with the variant's repair. Option `sparsity` "depth": the block-parameter
    sparsity of removing k whole layers; `limit_calibration`: score on the first `--sleb-blocks` blocks."""

    def build(bench: Bench) -> Row:
        options = dict(variant.options)
        calibration, notes = None, ""
        if options.pop("limit_calibration", False) and bench.calibration.blocks.shape[0] > bench.settings.sleb_blocks:
            limit = bench.settings.sleb_blocks
            calibration = dataclasses.replace(bench.calibration, blocks=bench.calibration.blocks[:limit])
            notes = f"first {limit} calibration blocks (cost: one suffix forward per candidate per step)"
        if options.get("sparsity") == "depth":
            options["sparsity"] = bench.settings.prune.remove / bench.loaded.model.config.num_hidden_layers
        base = bench.settings.configured(method)
        settings = dataclasses.replace(base, **options) if base is not None else None
        run = bench.method_run(method.name, settings, _repair(variant), calibration,
                               "k" if method.removes_layers else None)
        row = Row(variant.name, run.model, run.removed_layers, run.seconds,
                  training_tokens=run.details.get("training_tokens", 0),
                  notes=notes or _selection_notes(run.details, run.summary, settings))
        if "repair" in run.details:
            row.extra = {"repair": run.details["repair"]}
        elif method.trains_weights or method.edits_model:
            row.extra = {method.name: run.details}
        return row

    return build


def trsp_stage1_row(_method: PruningMethod, variant: BenchmarkVariant) -> RowBuilder:
    """TRSP's stage-1 selection removed without knowledge transfer (the ablation), with the variant's repair, then
    (option `heal`) healed by distillation for the rest of the trsp row's token budget (its total minus stage 1's)."""
    repair, heal = _repair(variant) or RepairMethod.NONE, dict(variant.options).get("heal", False)

    def build(bench: Bench) -> Row:
        trsp, prune = bench.settings.trsp, bench.settings.prune
        ablation_only = repair is RepairMethod.NONE and not heal
        if ablation_only and trsp.train_scope is not TrainScope.GATES:  # stage 1 trained the weights: run it alone
            run = bench.trsp_run(dataclasses.replace(trsp, stage2=Stage2Mode.NONE))
            return Row(variant.name, run.model, run.removed_layers, run.seconds,
                       training_tokens=run.details["training_tokens"])
        # Gate-only stage 1 leaves the weights untouched: the ablation is the dense model minus the same layers.
        details = bench.trsp_run().details
        stage1_tokens = len(details["stage1_losses"]) * prune.batch_size * prune.block_len
        layers = sorted(details["selection_order"])
        model, record, seconds = bench.removal_with_repair(layers, repair)
        row = Row(variant.name, model, layers, details["stage1_seconds"] + seconds, training_tokens=stage1_tokens,
                  notes="the trsp row's stage-1 selection, " + ("repaired and " if record else "")
                        + "removed without stage 2")
        if record:
            row.extra = {"repair": record}
        if heal:
            model, result, settings = bench.heal(model, details["training_tokens"] - stage1_tokens)
            row = Row(variant.name, model, layers, row.seconds + result.seconds,
                      training_tokens=stage1_tokens + result.tokens,
                      notes=f"trsp stage-1 selection, {repair.value}, then {result.steps} steps of healing "
                            f"(CE + KL, lr {settings.learning_rate})")
            row.extra = {"repair": record, "heal": result.to_dict()}
        return row

    return build


def _repair(variant: BenchmarkVariant) -> RepairMethod | None:
    return RepairMethod(variant.repair) if variant.repair is not None else None


def fine_tune_row(method: PruningMethod, variant: BenchmarkVariant) -> RowBuilder:
    """The method's removal (with the variant's repair), then fine-tuning with as many tokens as the trsp row.

    Plain LM fine-tuning, or (option `distill`) with the distillation term TRSP's stage 2 uses (weight: the recipe's,
    or 1 when it has none), which separates what distillation buys from what regularizing before removal buys.
    """
    distill = dict(variant.options).get("distill", False)

    def build(bench: Bench) -> Row:
        tokens = bench.trsp_tokens
        run = bench.method_run(method.name, repair=_repair(variant))
        pruned = copy.deepcopy(run.model)
        weight = (bench.settings.trsp.distill or 1.0) if distill else 0.0
        teacher = frozen_teacher(bench.loaded.model) if distill else None
        log = bench.fine_tune(pruned, tokens, teacher=teacher, distill=weight)
        loss = f"CE + {weight} x KL to dense" if distill else "CE"
        return Row(variant.name, pruned, run.removed_layers, run.seconds + log.seconds, training_tokens=log.tokens,
                   notes=f"{log.steps} AdamW steps at lr {bench.heal_lr} on {loss} (same tokens as trsp)")

    return build


def heal_row(method: PruningMethod, variant: BenchmarkVariant) -> RowBuilder:
    """The method's removal with the variant's repair, then healing by distillation at the trsp row's budget (option
    `scope`: full or lora)."""
    repair, scope = _repair(variant), HealScope(dict(variant.options).get("scope", "full"))

    def build(bench: Bench) -> Row:
        tokens = bench.trsp_tokens
        run = bench.method_run(method.name, repair=repair)
        model, result, settings = bench.heal(copy.deepcopy(run.model), tokens, scope)
        row = Row(variant.name, model, run.removed_layers, run.seconds + result.seconds,
                  training_tokens=result.tokens,
                  notes=f"{result.steps} steps of {scope.value} healing (CE + KL, lr {settings.learning_rate}, "
                        f"{result.trainable_params / 1e6:.2f}M trainable) after "
                        f"{variant.repair or 'the default repair'} (same tokens as trsp)")
        row.extra = {"repair": run.details.get("repair"), "heal": result.to_dict()}
        return row

    return build


def width_row(method: PruningMethod, variant: BenchmarkVariant) -> RowBuilder:
    """FFN width removed at `--width-sparsity` through the method's selection with the variant's `score`;
    `regularize` spends `--dress-tokens` first, `recover` fine-tunes after removal so that every recovered row has
    seen the same tokens."""
    options = dict(variant.options)
    score, regularize, recover = NeuronScore(options["score"]), options["regularize"], options["recover"]

    def build(bench: Bench) -> Row:
        settings = bench.settings
        dress = DressSettings(sparsity=settings.width_sparsity, score=score,
                              reg_tokens=settings.dress_tokens if regularize else 0, lr=bench.heal_lr)
        run = bench.method_run(method.name, dress, calibration=bench.train_calibration, remove=None)
        details, pruned, seconds = run.details, copy.deepcopy(run.model), run.seconds
        notes = f"FFN {details['ffn_width_before']} -> {details['ffn_kept']}"
        tokens = details["training_tokens"]
        if regularize:
            notes += (f"; {details['steps']} regularization steps, selected share of FFN output "
                      f"{details['share_before']:.3f} -> {details['share_after']:.3f}")
        extra = {key: details[key] for key in ("ffn_kept", "achieved_width_sparsity", "share_before", "share_after",
                                               "selected_norm_after", "steps", "penalty")}
        if recover:
            pruned, result, heal = bench.heal(pruned, settings.recovery_tokens + (0 if regularize else
                                                                                   settings.dress_tokens))
            seconds += result.seconds
            tokens += result.tokens
            notes += f"; {result.steps} recovery steps (CE + KL, lr {heal.learning_rate})"
            extra["heal"] = result.to_dict()
        return Row(variant.name, pruned, [], seconds, training_tokens=tokens, notes=notes, extra=extra)

    return build


def dense_ft_row(bench: Bench) -> Row:
    """The dense model fine-tuned with the same tokens: how much of a gain is only domain adaptation."""
    model = copy.deepcopy(bench.loaded.model)
    log = bench.fine_tune(model, bench.trsp_tokens)
    return Row("dense+ft", model, [], log.seconds, training_tokens=log.tokens,
               notes=f"{log.steps} AdamW steps at lr {bench.heal_lr} (same tokens as trsp)")


ROW_KINDS: dict[str, Callable[[PruningMethod, BenchmarkVariant], RowBuilder]] = {
    "select": select_row,
    "trsp-stage1": trsp_stage1_row,
    "fine-tune": fine_tune_row,
    "heal": heal_row,
    "width": width_row,
}
"""How each kind of `BenchmarkVariant` is built."""


def _registered_rows() -> tuple[dict[str, RowBuilder], set[str]]:
    """Every registered method's benchmark variants in registry order, then dense+ft; and the rows that train."""
    builders: dict[str, RowBuilder] = {}
    training: set[str] = {"dense+ft"}
    for method in all_methods().values():
        for variant in method.benchmark_variants():
            builders[variant.name] = ROW_KINDS[variant.kind](method, variant)
            if variant.trains:
                training.add(variant.name)
    builders["dense+ft"] = dense_ft_row
    return builders, training


ROW_BUILDERS, TRAINING_ROWS = _registered_rows()


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


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _bench(args: argparse.Namespace, loaded: LoadedModel, rows_wanted: list[str]) -> Bench:
    """The shared calibration (and training) blocks and every row's settings, from the command line and recipe."""
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
        print(f"[quality] note: the [prune] table of {args.trsp_recipe} is not used here; the command line sets "
              "the shared calibration", file=sys.stderr)
    others = {name: build_settings(cls, recipe[name], {}, f"[{name}]")
              for name, cls in method_settings_sections().items() if name in recipe and name != "trsp"}
    settings = BenchSettings(prune, build_settings(TrspSettings, recipe.get("trsp"), {}, "[trsp]"), args.sleb_blocks,
                             args.heal_lr, args.width_sparsity, args.dress_tokens, args.recovery_tokens, others)
    calibration = load_calibration(
        args.calib, loaded.model, loaded.tokenizer, args.calib_blocks, args.block_len, args.seed, args.dev_fraction
    )
    train_calibration = None
    if any(name in TRAINING_ROWS for name in rows_wanted):
        train_calibration = load_calibration(
            args.calib, loaded.model, loaded.tokenizer, args.train_blocks, args.block_len, args.seed,
            args.dev_fraction,
        )
    return Bench(loaded, settings, calibration, train_calibration)


def _run_rows(bench: Bench, names: list[str]) -> list[Row]:
    rows = []
    for name in names:
        print(f"[quality] {name} ...", file=sys.stderr, flush=True)
        row = ROW_BUILDERS[name](bench)
        # The process peak so far: for the first row, its own peak (plus the loaded dense model and the data).
        row.extra["peak_rss_gib_after_row"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"[quality] {name}: removed {row.removed_layers} in {row.seconds:.1f} s", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def _row_record(name: str, result, model, **fields) -> dict:
    """One row of the result file: its test-split figures and how it was made."""
    return {
        "name": name,
        "perplexity": result.perplexity,
        "mean_nll": result.mean_nll,
        "kl_to_dense": getattr(result, "kl_to_reference", 0.0),
        "top1_agreement": getattr(result, "top1_agreement", 1.0),
        "params": count_parameters(model),
        **fields,
    }


def _payload(args: argparse.Namespace, bench: Bench, rows: list[Row], started: float) -> dict:
    """Score the dense model and every row on the same test windows (and the development slice and HellaSwag),
    and the whole result record."""
    loaded = bench.loaded
    corpus = load_corpus(args.eval_data, DataPurpose.EVALUATION)
    windows = split_windows(
        tokenize_corpus(corpus, loaded.tokenizer), args.seq_len, args.max_windows, bos_prefix_id(loaded.tokenizer)
    )
    print(f"[quality] scoring dense + {len(rows)} rows on {windows.shape[0]} windows ...", file=sys.stderr, flush=True)
    eval_started = time.perf_counter()
    dense_result, results = compare_with_reference(
        torch_logits_fn(loaded.model), {row.name: torch_logits_fn(row.model) for row in rows}, windows
    )
    eval_seconds = time.perf_counter() - eval_started
    development = development_scores(args, loaded, rows)
    hellaswag = hellaswag_scores(args, loaded, rows)
    relative = {key: str(getattr(args, key).relative_to(REPO_ROOT) if getattr(args, key).is_relative_to(REPO_ROOT)
                          else getattr(args, key)) for key in ("out_dir", "trsp_recipe")}
    return {
        "benchmark": "quality",
        "model": args.model,
        "original_num_layers": loaded.model.config.num_hidden_layers,
        "command": _command_line(args),
        "settings": {**vars(args), **relative},
        "calibration": bench.calibration.describe(),
        "training_calibration": bench.train_calibration.describe() if bench.train_calibration is not None else None,
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
            _row_record("dense", dense_result, loaded.model, removed_layers=[], seconds=0.0, training_tokens=0,
                        **development.get("dense", {}), **hellaswag.get("dense", {})),
            *(_row_record(row.name, results[row.name], row.model, removed_layers=row.removed_layers,
                          seconds=row.seconds, training_tokens=row.training_tokens, notes=row.notes,
                          **development.get(row.name, {}), **hellaswag.get(row.name, {}), **row.extra)
              for row in rows),
        ],
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "machine": machine_info(),
        "versions": library_versions(),
        "wall_seconds": time.perf_counter() - started,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows_wanted if r not in ROW_BUILDERS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROW_BUILDERS)}")
    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device, for_training=True)
    bench = _bench(args, loaded, rows_wanted)
    rows = _run_rows(bench, rows_wanted)
    payload = _payload(args, bench, rows, started)
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
