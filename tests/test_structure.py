"""The rules the code's structure keeps: no import cycles, a pipeline that imports no CLI, short functions,
registries that the CLI, recipes and benchmark read, and benchmark rows that do not depend on their order."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

SOURCES = {"slimllm": REPO_ROOT / "slimllm", "slimllm.exporters": REPO_ROOT / "exporters"}
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    modules = {}
    for prefix, base in SOURCES.items():
        for path in base.rglob("*.py"):
            parts = [p for p in path.relative_to(base).with_suffix("").parts if p != "__init__"]
            modules[".".join([prefix, *parts])] = path
    return modules


def _import_graph() -> dict[str, set[str]]:
    """Module -> the slimllm modules it imports anywhere in its body (function-level imports included)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        imported: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {resolve(a.name) for a in node.names if a.name.startswith("slimllm")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("slimllm"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    imported.add(full if full in modules else resolve(node.module))
        graph[module] = {name for name in imported if name and name != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_cycles():
    graph = _import_graph()
    assert "slimllm.pipeline.compiler" in graph and "slimllm.exporters.onnx" in graph  # the walk sees both trees
    assert _cycles(graph) == []


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


PIPELINE_STEPS = ["pruning", "recovery", "exporters", "evaluation", "latency", "frontier"]
"""The pipeline's steps as packages, in the order a model goes through them."""
FOUNDATIONS = {"core": set(), "models": {"core"}}
"""Packages beneath every step, and the only packages each of them may import."""
TOP_LEVEL = {"__init__.py", "__main__.py", "cli", "pipeline", *FOUNDATIONS, *PIPELINE_STEPS} - {"exporters"}


def _package(module: str) -> str:
    """`slimllm.recovery.healing` -> `recovery`; `slimllm.exporters.onnx` -> `exporters`."""
    return module.split(".")[1]


def _package_edges(graph: dict[str, set[str]]) -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = {}
    for module, imported in graph.items():
        for name in imported:
            if _package(module) != _package(name):
                edges.setdefault((_package(module), _package(name)), []).append(f"{module} -> {name}")
    return edges


def test_the_top_level_reads_as_the_pipeline():
    entries = {p.name for p in (REPO_ROOT / "slimllm").iterdir() if p.name != "__pycache__"}
    assert entries == TOP_LEVEL


def test_no_two_way_dependency_between_packages():
    """Imports inside functions count: a step that reaches back into another step at run time is still tied to it."""
    edges = _package_edges(_import_graph())
    two_way = {pair: edges[pair] + edges[pair[::-1]] for pair in edges if pair[::-1] in edges and pair[0] < pair[1]}
    assert two_way == {}


def test_a_two_way_dependency_would_be_found():
    graph = {"slimllm.pruning.a": {"slimllm.recovery.b"}, "slimllm.recovery.b": {"slimllm.pruning.c"}}
    edges = _package_edges(graph)
    assert ("pruning", "recovery") in edges and ("recovery", "pruning") in edges


def test_foundations_import_no_pipeline_step_and_nothing_imports_the_cli():
    edges = _package_edges(_import_graph())
    for (importer, imported), why in edges.items():
        if importer in FOUNDATIONS:
            assert imported in FOUNDATIONS[importer], why
        if importer in {*PIPELINE_STEPS, *FOUNDATIONS, "pipeline"}:
            assert imported != "cli", why
        if importer in PIPELINE_STEPS:
            assert imported != "pipeline", why


def test_importing_the_pipeline_loads_no_cli_module():
    code = "import sys, slimllm.pipeline.compiler; print(sorted(m for m in sys.modules if m.startswith('slimllm.cli')))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "[]"


def test_no_function_is_longer_than_80_lines():
    """The package, the exporters, the benchmarks, the examples and the tests themselves."""
    long = []
    extra = [path for folder in ("bench", "examples", "tests") for path in (REPO_ROOT / folder).rglob("*.py")]
    for path in [*_modules().values(), *extra]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.name}: {lines}")
    assert long == []


def test_method_registry_drives_choices_recipes_and_benchmark_rows():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import quality

    from slimllm.cli.prune_command import FLAGS
    from slimllm.pipeline.recipes import recipe_sections
    from slimllm.pruning.choices import PruneMethod
    from slimllm.pruning.registry import all_methods, method_settings_sections

    names = list(all_methods())
    builtin = ["trsp", "2ssp", "dress", "shortgpt", "angular", "sleb", "last", "random"]
    assert [name for name in names if name in builtin] == builtin  # a new method takes its place by its rank
    assert [m.value for m in PruneMethod] == names
    assert set(method_settings_sections()) <= set(recipe_sections())
    trsp_flags = {flag.flag for flag in FLAGS if flag.section == "trsp"}
    assert {"--lambda1", "--stage2", "--distill"} <= trsp_flags
    assert {"--sparsity", "--alpha", "--width-multiple", "--stage"} <= {f.flag for f in FLAGS if f.section == "2ssp"}
    variants = [v.name for method in all_methods().values() for v in method.benchmark_variants()]
    assert list(quality.ROW_BUILDERS) == [*variants, "dense+ft"]  # every row is a registered method's variant
    assert {"shortgpt", "shortgpt+lsq", "random+comp", "trsp", "2ssp", "dress", "shortgpt+lsq+heal"} <= set(variants)
    assert {v.kind for method in all_methods().values() for v in method.benchmark_variants()} <= set(quality.ROW_KINDS)


def test_every_settings_field_is_a_flag_and_a_recipe_key_with_help():
    """Adding a settings field adds its flag, recipe key and help: the generated flags cover every field."""
    from slimllm.cli.eval_command import FLAGS as EVAL_FLAGS
    from slimllm.cli.export_command import GGUF_FLAGS, ONNX_FLAGS
    from slimllm.cli.prune_command import FLAGS as PRUNE_FLAGS
    from slimllm.core.settings import field_docs
    from slimllm.pipeline.recipes import recipe_sections

    sections = recipe_sections()
    for flags, section in ((PRUNE_FLAGS, "prune"), (PRUNE_FLAGS, "trsp"), (ONNX_FLAGS, "onnx"), (EVAL_FLAGS, "eval")):
        import dataclasses

        fields = {f.name for f in dataclasses.fields(sections[section])}
        assert fields == {flag.field for flag in flags if flag.section == section}, section
        assert set(field_docs(sections[section])) == fields, f"a [{section}] field has no description"
    gguf_fields = {f.name for f in __import__("dataclasses").fields(sections["gguf"])}
    covered = {flag.field for flag in GGUF_FLAGS} | {flag.field for flag in ONNX_FLAGS}
    assert gguf_fields <= covered


def test_benchmark_rows_do_not_depend_on_their_order(tiny_model_dir, text_file):
    """The TRSP run behind the `trsp` row also sets the healing rows' token budget; whichever row runs first, the
    results are the same."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import quality

    from slimllm.core.data import load_calibration
    from slimllm.models.loading import load_model
    from slimllm.pruning.methods.trsp import TrspSettings
    from slimllm.pruning.stage import PruneSettings

    loaded = load_model(str(tiny_model_dir("llama")), device="cpu", for_training=True)
    calibration = load_calibration(str(text_file), loaded.model, loaded.tokenizer, 4, 32, 0)
    settings = quality.BenchSettings(
        PruneSettings(remove=1, calib_blocks=4, block_len=32), TrspSettings(steps_per_round=1, stage2_steps=2)
    )
    outcomes = []
    for order in (["trsp", "shortgpt+heal"], ["shortgpt+heal", "trsp"]):
        bench = quality.Bench(loaded, settings, calibration, None)
        rows = {name: quality.ROW_BUILDERS[name](bench) for name in order}
        trsp, heal = rows["trsp"], rows["shortgpt+heal"]
        assert heal.training_tokens == trsp.training_tokens == 3 * 2 * 32  # 1 stage-1 + 2 stage-2 steps
        weights = float(sum(p.detach().double().sum() for p in trsp.model.parameters()))
        healed = float(sum(p.detach().double().sum() for p in heal.model.parameters()))
        outcomes.append((trsp.removed_layers, weights, heal.removed_layers, healed))
    assert outcomes[0] == outcomes[1]


TRAINING_MACHINERY = {"backward", "MixedPrecisionStepper", "GradScaler", "LambdaLR", "zero_grad"}
"""What a training loop of its own would use; only `slimllm.recovery.training` may."""


def _training_machinery_outside_the_loop(paths) -> list[str]:
    loop = REPO_ROOT / "slimllm" / "recovery" / "training.py"
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in TRAINING_MACHINERY and path != loop:
                found.append(f"{path.name}:{node.lineno} {name}")
    return found


def test_one_training_loop(tmp_path):
    """Healing, fine-tuning, TRSP and DReSS all train through `slimllm.recovery.training.train`: no other module
    runs a backward pass, scales a loss or schedules a learning rate."""
    assert _training_machinery_outside_the_loop([*_modules().values(), *(REPO_ROOT / "bench").glob("*.py")]) == []
    own_loop = tmp_path / "own_loop.py"
    own_loop.write_text("def fit(model, loss, optimizer):\n    loss.backward()\n    optimizer.step()\n")
    assert _training_machinery_outside_the_loop([own_loop]) == ["own_loop.py:2 backward"]


def test_stages_and_methods_are_found_not_listed():
    """Every module of the stages and methods folders registers itself; the recipe sections, the report stage's
    reads and the method order come from those registrations, and no module list is kept anywhere."""
    import pkgutil

    import slimllm.pipeline.stages as stages_package
    import slimllm.pruning.methods as methods_package
    from slimllm.pipeline.recipes import recipe_sections
    from slimllm.pipeline.stages import compile_stages, stage_sections, stages_read
    from slimllm.pruning.registry import all_methods, method_settings_sections

    stages = compile_stages()
    stage_modules = {spec.run.__module__.rsplit(".", 1)[1] for spec in stages}
    assert stage_modules == {m.name for m in pkgutil.iter_modules(stages_package.__path__)}
    assert [spec.order for spec in stages] == sorted(spec.order for spec in stages)
    assert set(stages_read(stages[-1])) == {spec.name for spec in stages[:-1]}  # the report reads every stage
    method_modules = {type(m).__module__.rsplit(".", 1)[1] for m in all_methods().values()}
    assert method_modules == {m.name for m in pkgutil.iter_modules(methods_package.__path__)}
    assert set(recipe_sections()) == {"compile", "eval", *stage_sections(), *method_settings_sections()}
    for path in _modules().values():
        assert "BUILTIN_" not in path.read_text(), f"{path.name} keeps a hand-written list of modules"
