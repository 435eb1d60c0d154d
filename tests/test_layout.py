"""The package's shape: one way through the pipeline, checked on the source with `ast` (imports inside functions
included), and a plans layer that imports neither torch nor transformers."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "hf_stack"
# Stage of each module prefix, in pipeline order: a module may import its own stage or an earlier one only.
STAGES = {
    "hf_stack": 0, "hf_stack.errors": 0, "hf_stack.remote": 0,
    "hf_stack.plans": 1, "hf_stack.operators": 1, "hf_stack.data": 1,
    "hf_stack.checkpoints": 2,
    "hf_stack.training": 3,
    "hf_stack.evaluation": 4,
    "hf_stack.analysis": 5, "hf_stack.hub": 5,
    "hf_stack.cli": 6, "hf_stack.demo": 6,
}  # fmt: skip
# Pairs the stage order alone would allow but the pipeline does not: the evaluator scores any checkpoint, trained
# by hf_stack or not, so it never needs the trainer.
FORBIDDEN = [("hf_stack.evaluation", "hf_stack.training")]


def _lazy_exports() -> dict[str, str]:
    """`hf_stack`'s lazy exports (name -> defining module), read from its source: `from hf_stack import X` is an
    import of the module that defines X, not of stage 0."""
    for node in ast.parse((ROOT / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_EXPORTS"]:
            return {name: f"hf_stack.{module}" for name, module in ast.literal_eval(node.value).items()}
    raise AssertionError("hf_stack/__init__.py has no _EXPORTS table")


EXPORTS = _lazy_exports()


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known) -> set[str]:
    """hf_stack modules `name` imports anywhere in its source (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [base] + [EXPORTS.get(a.name, f"{base}.{a.name}") if base == "hf_stack" else f"{base}.{a.name}"
                              for a in node.names]  # fmt: skip
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known and n != name)
    return found


def stage(name: str) -> int:
    prefix = max((p for p in STAGES if name == p or name.startswith(p + ".")), key=len)
    return STAGES[prefix]


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_the_walk_sees_imports_inside_functions():
    # the graph is only as good as the walk: a lazy import inside a function must count
    assert "hf_stack.checkpoints.ligo" in GRAPH["hf_stack.checkpoints.tensors"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_walk_resolves_the_packages_lazy_exports(tmp_path):
    # `from hf_stack import StackingTrainer` (or `from .. import push`) reaches the trainer (the hub), not stage 0
    known = set(modules())
    harness = tmp_path / "harness.py"
    harness.write_text("def f():\n    from hf_stack import StackingTrainer\n")
    assert "hf_stack.training.trainer" in imports("hf_stack.evaluation.harness", harness, known)
    layers = tmp_path / "layers.py"
    layers.write_text("from .. import push, HfStackError\n")
    assert {"hf_stack.hub", "hf_stack.errors"} <= imports("hf_stack.plans.layers", layers, known)


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_no_stage_imports_a_later_one():
    wrong = [f"{a} (stage {stage(a)}) imports {b} (stage {stage(b)})"
             for a, deps in GRAPH.items() for b in deps if stage(b) > stage(a)]  # fmt: skip
    wrong += [f"{a} imports {b}" for a, deps in GRAPH.items() for b in deps for x, y in FORBIDDEN
              if a.startswith(x) and b.startswith(y)]  # fmt: skip
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_stage_and_says_its_place():
    for name, path in modules().items():
        stage(name)  # raises for a module outside the table
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.strip(), f"{path} does not open with a line on its place in the pipeline"


@pytest.mark.parametrize("heavy", ["torch", "transformers"])
def test_plans_import_neither_torch_nor_transformers(heavy):
    plans = [n for n in modules() if stage(n) <= 1 and n != "hf_stack.data"]  # data packs with numpy / datasets
    code = f"import sys, {', '.join(plans)}; print({heavy!r} in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False", f"importing the plans layer imports {heavy}"
