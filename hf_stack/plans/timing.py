"""Stage 1, when to grow: the paper's fitted growth-timing formula and the 6ND FLOP count the trainer logs.

(What to grow into, tensor by tensor, is the growth plan: `hf_stack.plans.plan`.)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import HfStackError

# log10(d) = A * log10(N) + B / log10(C) + E  (prts README; C = 6 N D)
A, B, E = 0.88, 163.27, -5.74
# The paper's measured speed-up at 7B / 300B tokens (194B tokens of G_stack reach scratch's 300B loss).
PAPER_SPEEDUP_7B = 300 / 194 - 1


# What hf_stack's own regime map measured (bench/regime.py writes it from bench/results/regime.json): per target size,
# the G_stack speed-up in FLOPs at each budget in tokens per target parameter, mean and 95% bootstrap interval over seeds.
MEASURED_MAP = Path(__file__).resolve().parent.parent / "recipes" / "regime_map.json"


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
        measured: per target size of hf_stack's regime map, the measured point nearest D / N
            ([`measured_nearest`]).
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
    measured: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [
            f"target: {self.target_params:.3g} parameters, {self.tokens:.3g} tokens, C = 6ND = {self.compute:.3g} FLOPs",
            f"grow after d = {self.d / 1e9:.3g}B tokens (log10 d = {A} log10 N + {B} / log10 C {E:+})",
            f"growth factor g = {self.growth_factor}: small model ~{self.small_params:.3g} parameters, "
            f"small phase {self.small_phase_flops:.3g} FLOPs",
            f"at the paper's measured {self.paper_speedup:.1%} speed-up (7B, 300B tokens): "
            f"{self.flops_saved:.3g} FLOPs saved ({self.flops_saved / self.compute:.1%})",
        ]
        ratio = self.tokens / self.target_params
        for m in self.measured:
            lo, hi = m["interval"]
            where = (
                ""
                if m["inside"]
                else f" (the nearest it measured: your {ratio:.3g} is outside {m['range'][0]:.3g}-{m['range'][1]:.3g})"
            )
            bound = {"lower": "at least ", "upper": "at most "}.get(m["bound"], "")
            lines.append(
                f"hf_stack's regime map, {m['target_params'] / 1e6:.2f}M-parameter target (g = {m['growth_factor']}, "
                f"{m['seeds']} seeds), at {m['tokens_per_parameter']:.3g} tokens per parameter{where}: speed-up "
                f"{bound}{m['speedup']:+.1%} in FLOPs, 95% interval [{lo:+.1%}, {hi:+.1%}]: {m['verdict']}"
            )
        if self.measured:
            lines.append(f"(your budget: {ratio:.3g} tokens per parameter; the map's models are far smaller than 7B)")
        return "\n".join(lines)


def measured_nearest(tokens_per_parameter: float, path: Path = MEASURED_MAP) -> list[dict]:
    """For each target size of hf_stack's regime map, its measured G_stack point nearest `tokens_per_parameter`
    (in log distance), with whether that budget lies inside the measured range. Empty where no map ships.

    Args:
        tokens_per_parameter: the user's D / N.
        path: the map (default: the one the package ships, written by `bench/regime.py`).
    """
    if not Path(path).is_file():
        return []
    out = []
    for target in json.loads(Path(path).read_text())["targets"]:
        points = target["points"]
        if not points:
            continue
        near = min(points, key=lambda p: abs(math.log(p["tokens_per_parameter"] / tokens_per_parameter)))
        span = (min(p["tokens_per_parameter"] for p in points), max(p["tokens_per_parameter"] for p in points))
        out.append({**{k: target[k] for k in ("name", "target_params", "growth_factor", "seeds")}, **near,
                    "range": span, "inside": span[0] <= tokens_per_parameter <= span[1]})  # fmt: skip
    return out


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
        measured=measured_nearest(tokens / target_params),
    )


# The name before 0.2: "plan" now means the tensor plan only.
plan_growth = when_to_grow
