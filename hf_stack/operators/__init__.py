"""Growth operators: each file registers one operator that turns a layer map into per-tensor sources."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import HfStackError


@dataclass(frozen=True)
class Operator:
    """A registered growth operator.

    Attributes:
        name: the name used on the CLI (`--operator`), in `growth_config.json` and as a model-card tag.
        direction: "depth" or "width".
        function_preserving: whether the grown model computes the same logits as the source at growth time.
        paper: link to the paper the operator comes from (reused by the model card).
        summary: one line describing the operator.
        layer_ops: maps (target layer index, layer map) -> {parameter suffix: op} overrides for that layer;
            parameters not named are copied from the mapped source layer.
    """

    name: str
    direction: str
    function_preserving: bool
    paper: str
    summary: str
    layer_ops: Callable[[int, tuple[int, ...]], dict[str, str]]


OPERATORS: dict[str, Operator] = {}


def register_operator(operator: Operator) -> Operator:
    if operator.name in OPERATORS:
        raise ValueError(f"operator {operator.name!r} registered twice")
    OPERATORS[operator.name] = operator
    return operator


def get_operator(name: str) -> Operator:
    try:
        return OPERATORS[name]
    except KeyError:
        raise HfStackError(f"unknown operator {name!r}; choose one of: {', '.join(sorted(OPERATORS))}") from None


def operator_table() -> str:
    """The operator claim table (markdown) that README.md carries; generated here so it is written once."""
    rows = ["| operator | direction | function preserving | what it does | paper |", "|---|---|---|---|---|"]
    for op in sorted(OPERATORS.values(), key=lambda o: (o.direction, o.name)):
        fp = "yes" if op.function_preserving else "no"
        rows.append(f"| `{op.name}` | {op.direction} | {fp} | {op.summary} | {op.paper} |")
    return "\n".join(rows)


# One import line per operator file: importing registers it.
from . import stack, zero  # noqa: E402,F401
