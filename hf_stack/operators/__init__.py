"""Stage 1, growth operators: each file registers one of the paper's four atomic operators, in depth and in width.

A new operator is one file that calls `register_operator` and one import line below.
"""

from .registry import (
    ALIASES,
    DIRECTIONS,
    OPERATORS,
    Growth,
    Operator,
    get_operator,
    operator_table,
    register_operator,
    repeats,
)

# One import line per operator file: importing registers it, in the paper's order (the README's table follows it).
# isort: off
from . import direct, zero, random, learn  # noqa: F401
# isort: on

__all__ = ["ALIASES", "DIRECTIONS", "OPERATORS", "Growth", "Operator", "get_operator", "operator_table",
           "register_operator", "repeats"]  # fmt: skip
