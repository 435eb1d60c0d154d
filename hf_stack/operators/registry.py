"""The operator registry: what an operator is (`Operator`), `register_operator` and `get_operator`.

An operator turns the layer map into per-layer tensor ops (depth) and the grown sizes into
[`~hf_stack.plans.width.Axis`] maps (width); the plan applies both, so depth and width combine in one growth.
Operator files import this module, never the package, so registering one cannot import the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import HfStackError

DIRECTIONS = ("depth", "width")


@dataclass(frozen=True)
class Growth:
    """What an operator does in one direction.

    Attributes:
        paper_name: the operator's name in the paper's operator table (e.g. "G↑direct").
        function_preserving: whether the grown model computes the source's logits at growth time.
        summary: one line describing it.
    """

    paper_name: str
    function_preserving: bool
    summary: str


@dataclass(frozen=True)
class Operator:
    """A registered growth operator.

    Attributes:
        name: the name used on the CLI (`--operator`), in `growth_config.json` and as a model-card tag.
        paper: link to the paper the operator comes from (reused by the model card).
        depth: what it does in depth.
        width: what it does in width.
        layer_ops: (target layer index, layer map) -> {parameter suffix pattern: op} overrides for that layer
            ("zero", "random"); a pattern is a regular expression matched against the whole suffix, `"*"` any
            suffix no other pattern matches; parameters not matched are copied from the mapped source layer.
        width_axes: ([`~hf_stack.plans.width.WidthDims`], noise) -> {axis name: [`~hf_stack.plans.width.Axis`]}; `noise` is
            the `width_noise` setting, for operators that copy units.
        needs_data: the grown tensors are trained (`learn`), so growth needs data.
        width_eps: [`~hf_stack.plans.width.WidthDims`] -> factor on the config's `rms_norm_eps` after width growth.
        keeps_function: (layer map, source layers, each source layer's parameter suffixes) -> whether a
            function-preserving depth rule holds for this map and these layers.
    """

    name: str
    paper: str
    depth: Growth
    width: Growth
    layer_ops: Callable[[int, tuple[int, ...]], dict[str, str]]
    width_axes: Callable
    needs_data: bool = False
    width_eps: Callable = lambda dims: 1.0
    keeps_function: Callable[[tuple[int, ...], int, dict], bool] = lambda layer_map, num_layers, tensors: True

    def growth(self, direction: str) -> Growth:
        return getattr(self, direction)

    def function_preserving(self, directions: tuple[str, ...]) -> bool:
        return all(self.growth(d).function_preserving for d in directions)


OPERATORS: dict[str, Operator] = {}
# Other names for an operator in some directions only: G_stack is the paper's name for depthwise G_direct.
ALIASES: dict[str, tuple[str, tuple[str, ...]]] = {"stack": ("direct", ("depth",))}


def register_operator(operator: Operator) -> Operator:
    if operator.name in OPERATORS or operator.name in ALIASES:
        raise ValueError(f"operator {operator.name!r} registered twice")
    OPERATORS[operator.name] = operator
    return operator


def get_operator(name: str, directions: tuple[str, ...] = ()) -> Operator:
    """The operator registered as `name` (or an alias), refusing directions an alias does not cover."""
    if name in ALIASES:
        target, allowed = ALIASES[name]
        refused = [d for d in directions if d not in allowed]
        if refused:
            raise HfStackError(
                f"operator {name!r} grows {' and '.join(allowed)} only; for {refused[0]} growth use "
                f"--operator {target} (or zero, random, learn)"
            )
        name = target
    try:
        return OPERATORS[name]
    except KeyError:
        names = sorted([*OPERATORS, *ALIASES])
        raise HfStackError(f"unknown operator {name!r}; choose one of: {', '.join(names)}") from None


def copy_all(target_layer: int, layer_map: tuple[int, ...]) -> dict[str, str]:
    """Depth rule of operators whose every target layer copies its mapped source layer."""
    return {}


def repeats(layer_map: tuple[int, ...]) -> set[int]:
    """Target layers that are not the first copy of their source layer: the *new* layers of a growth."""
    seen: set[int] = set()
    out = set()
    for i, j in enumerate(layer_map):
        if j in seen:
            out.add(i)
        seen.add(j)
    return out


def operator_table() -> str:
    """The operator claim table (markdown) that README.md carries; generated here so it is written once."""
    rows = [
        "| `--operator` | direction | paper's name | function preserving | what it does | from |",
        "|---|---|---|---|---|---|",
    ]
    for op in OPERATORS.values():
        for direction in DIRECTIONS:
            g = op.growth(direction)
            fp = "yes" if g.function_preserving else "no"
            rows.append(f"| `{op.name}` | {direction} | {g.paper_name} | {fp} | {g.summary} | {op.paper} |")
    return "\n".join(rows)
