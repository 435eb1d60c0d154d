"""Stage 1, when to grow: the paper's fitted growth-timing formula and the 6ND FLOP count the trainer logs.

(What to grow into, tensor by tensor, is the growth plan: `hf_stack.plans.plan`.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import HfStackError

# log10(d) = A * log10(N) + B / log10(C) + E  (prts README; C = 6 N D)
A, B, E = 0.88, 163.27, -5.74
# The paper's measured speed-up at 7B / 300B tokens (194B tokens of G_stack reach scratch's 300B loss).
PAPER_SPEEDUP_7B = 300 / 194 - 1


def training_flops(num_params: float, tokens: float) -> float:
    """Training compute, 6 N D, with N counting every parameter (embeddings included, as the paper's "7B" does)."""
    return 6.0 * num_params * tokens


@dataclass(frozen=True)
class GrowthTiming:
    """A growth schedule for a target model and token budget.

    Attributes:
        target_params: N, parameters of the grown (target) model.
        tokens: D, the total training-token budget of a from-scratch run.
        compute: C = 6 N D, in FLOPs.
        d: tokens to train the small model before growing (the paper's fitted formula).
        growth_factor: g, target depth over small depth (the paper fixes g = 4).
        small_params: N / g, the small model's size if growth is depthwise (approximate: embeddings do not grow).
        small_phase_flops: 6 (N / g) d.
        paper_speedup: the paper's measured speed-up at 7B (not a prediction for your setting).
        flops_saved: C - C / (1 + paper_speedup), the compute saved if that speed-up holds.
    """

    target_params: float
    tokens: float
    compute: float
    d: float
    growth_factor: int
    small_params: float
    small_phase_flops: float
    paper_speedup: float
    flops_saved: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return "\n".join(
            [
                f"target: {self.target_params:.3g} parameters, {self.tokens:.3g} tokens, C = 6ND = {self.compute:.3g} FLOPs",
                f"grow after d = {self.d / 1e9:.3g}B tokens (log10 d = {A} log10 N + {B} / log10 C {E:+})",
                f"growth factor g = {self.growth_factor}: small model ~{self.small_params:.3g} parameters, "
                f"small phase {self.small_phase_flops:.3g} FLOPs",
                f"at the paper's measured {self.paper_speedup:.1%} speed-up (7B, 300B tokens): "
                f"{self.flops_saved:.3g} FLOPs saved ({self.flops_saved / self.compute:.1%})",
            ]
        )


def when_to_grow(target_params: float, tokens: float, growth_factor: int = 4) -> GrowthTiming:
    """When to grow, from the paper's fitted formula.

    log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74, with C = 6 N D (Du et al., 2024, arXiv 2405.15319).

    Args:
        target_params: N, the target model's parameter count.
        tokens: D, the total token budget.
        growth_factor: g; the paper found g = 4 best.

    Returns:
        A [`GrowthTiming`].

    Example:

    ```python
    >>> from hf_stack import when_to_grow
    >>> round(when_to_grow(7e9, 2e12).d / 1e9, 1)
    11.1
    ```
    """
    for name, value in (("target_params", target_params), ("tokens", tokens)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise HfStackError(f"{name} must be a positive number, got {value!r}")
    if isinstance(growth_factor, bool) or not isinstance(growth_factor, int) or growth_factor < 2:
        raise HfStackError(f"growth factor must be a whole number >= 2, got {growth_factor!r}")
    compute = training_flops(target_params, tokens)
    if compute <= 10:
        raise HfStackError(f"compute 6ND = {compute:.3g} FLOPs is too small for the formula (log10 C must exceed 1)")
    d = 10 ** (A * math.log10(target_params) + B / math.log10(compute) + E)
    small = target_params / growth_factor
    return GrowthTiming(
        target_params=float(target_params),
        tokens=float(tokens),
        compute=compute,
        d=d,
        growth_factor=growth_factor,
        small_params=small,
        small_phase_flops=training_flops(small, d),
        paper_speedup=PAPER_SPEEDUP_7B,
        flops_saved=compute - compute / (1 + PAPER_SPEEDUP_7B),
    )


# The name before 0.2: "plan" now means the tensor plan only.
plan_growth = when_to_grow
