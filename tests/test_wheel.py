"""The package as `pip install hf-stack` gives it: a wheel built from the source, installed alone into a fresh
virtual environment, used from a folder outside the checkout (every file read at run time must be inside it)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import build_checkpoint

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A virtual environment holding only the wheel; the dependencies are the test environment's, seen through a
    path entry (not a site dir, so the checkout's editable install is not loaded)."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("hf_stack", "model_cards"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    r = subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(work / "dist")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (work / "dist").glob("hf_stack-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(purelib, "_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", str(wheel)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return venv, Path(purelib)


def test_every_third_party_import_is_a_declared_dependency():
    """The wheel test borrows the test environment's packages, so it cannot see a dependency missing from
    pyproject.toml: every distribution hf_stack imports directly must be declared there (core or an extra)."""
    import ast
    import re
    from importlib.metadata import packages_distributions

    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [
        *project["dependencies"],
        *(r for extra in project["optional-dependencies"].values() for r in extra),
    ]
    declared = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}
    imported = set()
    for path in (REPO / "hf_stack").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    imported -= {*sys.stdlib_module_names, "hf_stack", "__future__"}
    provided = packages_distributions()
    undeclared = {m: provided.get(m) for m in imported
                  if not {d.lower().replace("_", "-") for d in provided.get(m, [m])} & declared}  # fmt: skip
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
    assert "numpy" in imported and "torch" in imported  # the walk sees the imports


def test_the_wheel_lists_every_package():
    """pyproject.toml lists the packages (the card template's top-level folder is mapped into the package): a new
    subpackage missing from the list would be left out of the wheel."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "hf_stack").rglob("__init__.py")}
    assert listed == found | {"hf_stack.model_cards"} and (REPO / "model_cards" / "template.md").is_file()


def run(venv, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env)


def test_the_wheel_grows_trains_and_scores_outside_the_checkout(installed, tmp_path):
    venv, purelib = installed
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    r = run(venv, venv / "bin" / "python", "-c",
            "import hf_stack; from hf_stack.evaluation.benchmarks import SAMPLES_DIR; print(hf_stack.__file__); "
            "print(SAMPLES_DIR)", cwd=outside)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    package, samples = r.stdout.split()
    assert Path(package).is_relative_to(purelib) and Path(samples).is_relative_to(purelib)

    build_checkpoint(outside / "small", "llama", num_layers=2)
    cli = venv / "bin" / "hf-stack"
    r = run(venv, cli, "grow", "small", "--factor", "2", "-o", "grown", cwd=outside)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Grown from `small`" in (outside / "grown" / "README.md").read_text()  # the card template was found

    (outside / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    r = run(venv, cli, "train", "--model", "grown", "--data", "corpus.txt", "--block-size", "16",
            "--per-device-train-batch-size", "4", "--max-tokens", "256", "--logging-steps", "1",
            "--disable-tqdm", "true", "--use-cpu", "true", "-o", "run", cwd=outside)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((outside / "run" / "training_log.json").read_text())
    assert log["training"]["total_tokens"] == 256 and any("loss" in e for e in log["log_history"])

    r = run(venv, cli, "eval", "run/final", "--data-dir", samples, "--tasks", "arc_easy,wikitext", "--limit", "2",
            "-o", "scores.json", cwd=outside)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads((outside / "scores.json").read_text())["results"]
    assert scores["arc_easy"]["sample_len"] == 2 and scores["wikitext"]["word_perplexity,none"] > 1


def test_a_checkout_used_without_installing_finds_the_card_template(tmp_path):
    """On PYTHONPATH, with no install's finder to map hf_stack.model_cards, the template is read from the
    checkout's top-level model_cards/."""
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            "import importlib.util; assert importlib.util.find_spec('hf_stack.model_cards') is None; "
            "from hf_stack.checkpoints.card import TEMPLATE; print(TEMPLATE)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()) == REPO / "model_cards" / "template.md"
