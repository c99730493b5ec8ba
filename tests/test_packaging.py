"""The built wheel installs anywhere: one top-level name, profiles shipped, the CLI works without the source tree;
and every shipped recipe loads."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from slimllm.pipeline.recipes import build_settings, load_recipe, recipe_sections


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
         str(REPO_ROOT)],
        check=True,
        capture_output=True,
    )
    (path,) = dist.glob("slimllm-*.whl")
    return path


def test_wheel_installs_one_top_level_package_with_its_profiles(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"slimllm"}
    assert "slimllm/exporters/onnx.py" in names and "slimllm/target_profiles/cpu-x86.toml" in names
    # The sources keep the project's layout: exporters/ and profiles/ beside slimllm/, mapped into it by the wheel.
    shipped = {f"slimllm/target_profiles/{p.name}" for p in (REPO_ROOT / "profiles").glob("*.toml")}
    assert shipped and shipped <= set(names) and not (REPO_ROOT / "slimllm" / "target_profiles").is_dir()
    source_modules = {
        "slimllm/" + path.relative_to(REPO_ROOT / "slimllm").as_posix()
        for path in (REPO_ROOT / "slimllm").rglob("*.py")
    }
    missing = sorted(source_modules - set(names))
    assert not missing, f"modules left out of the wheel (add their package to pyproject.toml): {missing}"


@pytest.mark.slow
def test_wheel_runs_from_a_fresh_environment_without_the_source_tree(wheel, tmp_path):
    """A new virtual environment gets the wheel alone; the dependencies come from this environment's
    site-packages through a path file, so nothing is downloaded and nothing of the source tree is visible."""
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    check = (
        "import slimllm, slimllm.exporters.gguf, sys; from slimllm.latency.profiles import load_profile; "
        "assert 'site-packages' in slimllm.__file__ or 'venv' in slimllm.__file__, slimllm.__file__; "
        "print(load_profile('cpu-x86').name, slimllm.__file__)"
    )
    loaded = subprocess.run([str(python), "-c", check], cwd=workdir, capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith("cpu-x86 ") and str(REPO_ROOT) not in loaded.stdout
    helped = subprocess.run(
        [str(python), "-m", "slimllm", "compile", "--help"], cwd=workdir, capture_output=True, text=True
    )
    assert helped.returncode == 0, helped.stderr
    assert "--target" in helped.stdout


@pytest.mark.parametrize("recipe", sorted((REPO_ROOT / "examples" / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_load_into_every_settings_class(recipe):
    sections = load_recipe(recipe)
    assert sections, f"{recipe.name} is empty"
    classes = recipe_sections()
    for name, values in sections.items():
        build_settings(classes[name], values, {})


@pytest.mark.parametrize("script", sorted((REPO_ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_scripts_import_what_exists(script):
    """Each example compiles and every slimllm name it imports exists."""
    import ast
    import importlib

    tree = ast.parse(script.read_text(), filename=str(script))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimllm"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                    f"{script.name}: {node.module}.{alias.name} does not exist"
                )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("slimllm"):
                    importlib.import_module(alias.name)
