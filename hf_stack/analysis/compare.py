"""After training, comparing: a grown run against from-scratch baselines, the paper's speed-up in every currency
and a health check of the small model."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import HfStackError
from ..training.log import CURRENCIES, CURRENCY_LABELS, Curve, plot, read_curve

__all__ = ["CURRENCIES", "Curve", "compare", "endpoint_speedup", "health", "interpolate_log", "plot", "read_curve",
           "speedup"]  # fmt: skip

# How far beyond scratch's end points the loss gap at equal cost may be read (a ratio of costs).
GAP_REACH = 1.1


def flops_to_reach(curve: Curve, loss: float) -> float | None:
    """FLOPs at which `curve` first reaches `loss` (linear interpolation between logged points)."""
    prev = None
    for f, value in zip(curve.flops, curve.loss):
        if value <= loss:
            if prev is None:
                return f
            f0, v0 = prev
            return f0 + (f - f0) * (v0 - loss) / (v0 - value) if v0 != value else f
        prev = (f, value)
    return None


def speedup(grown: Curve, scratch: Curve) -> dict:
    """The paper's speed-up: FLOPs scratch needs to reach the grown run's final loss, over the grown run's FLOPs,
    minus one. When scratch never gets there, the figure is a lower bound."""
    target = grown.loss[-1]
    reached = flops_to_reach(scratch, target)
    bound = reached is None
    scratch_flops = scratch.flops[-1] if bound else reached
    return {
        "grown_final_loss": target,
        "grown_flops": grown.flops[-1],
        "scratch_flops_to_match": scratch_flops,
        "speedup": scratch_flops / grown.flops[-1] - 1,
        "lower_bound": bound,
        # scratch's first logged point already beats the target: it got there somewhere before, not exactly there
        "upper_bound": scratch.loss[0] <= target,
        "metric": grown.metric,
    }


def interpolate_log(points: list[tuple[float, float]], x: float, reach: float = 1.0) -> float | None:
    """y at x on the polyline through (x, y) points, linear in log x; None outside their range, except that the
    end segments extend to `reach` times beyond the end points (budgets rounded to whole steps miss by a little)."""
    points = sorted(points)
    if len(points) == 1:
        return points[0][1] if points[0][0] == x else None
    if not points[0][0] / reach <= x <= points[-1][0] * reach:
        return None
    segments = list(zip(points, points[1:]))
    (x0, y0), (x1, y1) = next(((a, b) for a, b in segments if x <= b[0]), segments[-1])
    if x1 == x0:
        return y0
    t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return y0 + t * (y1 - y0)


def endpoint_speedup(grown: dict, scratch: list[dict], currencies=CURRENCIES) -> dict:
    """The paper's speed-up against scratch runs read at the end of their own complete schedules.

    Each scratch run is one annealed end point (its final loss and total cost). The cost scratch needs to reach the
    grown run's final loss is interpolated between the two end points that bracket that loss, linearly in log cost;
    speed-up = that cost / the grown run's cost - 1, in each currency. Outside the end points the figure is a bound:
    `"lower"` (every scratch budget ends above the grown loss: speed-up > the largest budget's) or `"upper"` (even
    the smallest budget ends below it: speed-up < the smallest budget's). Also the loss gap at equal cost: the grown
    run's final loss minus scratch's loss interpolated at the grown run's cost (negative: growth is ahead), read up
    to 10% beyond the end points (a 1x budget rounded to whole steps) and None further out.

    Args:
        grown: `{"loss": final loss, "<currency>": total cost, ...}` of the grown run.
        scratch: the same for each scratch run (one schedule and budget each).
        currencies: the cost keys to report.

    Returns:
        `{currency: {"speedup", "bound", "scratch_cost_to_match", "grown_cost", "scratch_loss_at_equal_cost",
        "loss_gap"}}` for each currency both sides have.
    """
    out = {}
    target = grown["loss"]
    for c in currencies:
        if grown.get(c) is None or any(r.get(c) is None for r in scratch) or not scratch:
            continue
        ends = sorted((r[c], r["loss"]) for r in scratch)
        cost, bound = None, None
        for (c0, l0), (c1, l1) in zip(ends, ends[1:]):
            if min(l0, l1) <= target <= max(l0, l1) and l0 != l1:
                t = (l0 - target) / (l0 - l1)
                cost = math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
                break
        if cost is None:
            if target < min(loss for _, loss in ends):
                cost, bound = ends[-1][0], "lower"
            else:
                cost, bound = ends[0][0], "upper"
        at_equal = interpolate_log(ends, grown[c], reach=GAP_REACH)
        out[c] = {
            "speedup": cost / grown[c] - 1,
            "bound": bound,
            "scratch_cost_to_match": cost,
            "grown_cost": grown[c],
            "scratch_loss_at_equal_cost": at_equal,
            "loss_gap": None if at_equal is None else target - at_equal,
        }
    return out


def health(grown: Curve, scratch: list[Curve] = ()) -> dict:
    """The small model's loss at growth beside the target trained from scratch to the same tokens and the
    unigram baseline, with a warning when the small model has learnt no more than token frequencies."""
    small = grown.small_loss()
    at_d = None
    if grown.growth_tokens is not None:
        for c in sorted(scratch, key=lambda c: -c.tokens[-1]):
            points = list(zip(c.tokens, c.loss))
            if points and points[0][0] <= grown.growth_tokens <= points[-1][0]:
                at_d = interpolate_log(points, grown.growth_tokens)
                break
    unigram = grown.unigram_loss
    warning = None
    if small is not None and unigram is not None and small >= unigram:
        warning = (f"the small model is no better than unigram frequencies at growth ({grown.metric} {small:.4f} "
                   f">= {unigram:.4f}): it had not learnt to use context; train it longer or tune its learning rate "
                   "before reading the speed-up")  # fmt: skip
    return {"growth_tokens": grown.growth_tokens, "small_loss_at_growth": small,
            "scratch_loss_at_growth_tokens": at_d, "unigram_loss": unigram, "warning": warning}  # fmt: skip


def check_validation(curves: list[Curve], runs: list) -> list:
    """Refuse runs whose eval losses come from different validation sets; return the runs that log none."""
    logged = {c.validation["sha256"]: (run, c.validation) for c, run in zip(curves, runs) if c.validation}
    if len(logged) > 1:
        (a, fa), (b, fb) = list(logged.values())[:2]
        raise HfStackError(
            f"{a} and {b} were validated on different text ({fa['blocks']} blocks, {fa['sha256']} vs {fb['blocks']} "
            f"blocks, {fb['sha256']}); train them on the same --data with the same --block-size, "
            "--validation-fraction and --validation-tokens"
        )
    return [run for c, run in zip(curves, runs) if not c.validation]


def describe_speedup(r: dict) -> str:
    """One line: the speed-up, or its lower bound when scratch never reached the grown run's loss."""
    if r.get("upper_bound"):
        return (f"speed-up < {r['speedup']:.1%}: scratch's first logged point ({r['scratch_flops_to_match']:.3g} "
                f"FLOPs) is already below the grown run's final {r['metric']} {r['grown_final_loss']:.4f}")  # fmt: skip
    if r["lower_bound"]:
        return (f"speed-up > {r['speedup']:.1%}: scratch never reached the grown run's final {r['metric']} "
                f"{r['grown_final_loss']:.4f} within its {r['scratch_flops_to_match']:.3g} FLOPs")  # fmt: skip
    return (f"speed-up = {r['speedup']:.1%}: scratch needs {r['scratch_flops_to_match']:.3g} FLOPs to reach the grown "
            f"run's final {r['metric']} {r['grown_final_loss']:.4f}, the grown run used {r['grown_flops']:.3g}")  # fmt: skip


def describe_endpoints(figures: dict) -> str:
    """One line per currency for the result of [`endpoint_speedup`]."""
    lines = []
    for c, r in figures.items():
        sign = {"lower": ">", "upper": "<", None: "="}[r["bound"]]
        gap = "" if r["loss_gap"] is None else f"; loss gap at equal cost {r['loss_gap']:+.4f}"
        lines.append(f"{CURRENCY_LABELS[c]}: speed-up {sign} {r['speedup']:+.1%}{gap}")
    return "\n".join(lines)


def describe_health(h: dict) -> str:
    parts = [f"small model at growth: {h['small_loss_at_growth']:.4f}" if h["small_loss_at_growth"] is not None
             else "no loss logged before growth"]  # fmt: skip
    if h["scratch_loss_at_growth_tokens"] is not None:
        parts.append(f"target from scratch after the same tokens: {h['scratch_loss_at_growth_tokens']:.4f}")
    if h["unigram_loss"] is not None:
        parts.append(f"unigram baseline: {h['unigram_loss']:.4f}")
    text = "health: " + "; ".join(parts)
    return text + (f"\nwarning: {h['warning']}" if h["warning"] else "")


def compare(grown_run: str | Path, scratch_run, output: str | Path | None = None) -> dict:
    """Read a grown run and its from-scratch baselines, write the loss-vs-compute plot, return the figures.

    With one scratch run, the speed-up reads its curve (the FLOPs at which it first reaches the grown run's final
    loss). With several, each a complete schedule at its own budget, their end points are the baseline the paper's
    definition asks for ([`endpoint_speedup`]), in every currency the logs carry.

    Args:
        grown_run: a run that grew (its `training_log.json`).
        scratch_run: one from-scratch run folder with the same target, or a list of them at several budgets.
        output: the PNG to write (default `<grown_run>/compare.png`).

    Returns:
        The speed-up figures, `"health"` (the small model's loss at growth, scratch's at the same tokens, the
        unigram baseline, a warning if the small model is no better than unigram) and `"plot"`.
    """
    runs = [scratch_run] if isinstance(scratch_run, (str, Path)) else list(scratch_run)
    grown, scratch = read_curve(grown_run), [read_curve(r) for r in runs]
    if any(s.metric != grown.metric for s in scratch):
        grown, scratch = read_curve(grown_run, "loss"), [read_curve(r, "loss") for r in runs]
    unchecked = check_validation([grown, *scratch], [grown_run, *runs]) if grown.metric == "eval_loss" else []
    names = [s.name for s in scratch]
    if len(set(names)) < len(names):
        scratch = [Curve(**{**s.__dict__, "name": str(r)}) for s, r in zip(scratch, runs)]
    if len(scratch) == 1:
        result = speedup(grown, scratch[0])
    else:
        ends = [{"loss": s.loss[-1], **{c: s.cost_at_last(c) for c in CURRENCIES}} for s in scratch]
        figures = endpoint_speedup({"loss": grown.loss[-1], **{c: grown.cost_at_last(c) for c in CURRENCIES}}, ends)
        f = figures["flops"]
        result = {"grown_final_loss": grown.loss[-1], "grown_flops": grown.cost_at_last("flops"),
                  "scratch_flops_to_match": f["scratch_cost_to_match"], "speedup": f["speedup"],
                  "lower_bound": f["bound"] == "lower", "upper_bound": f["bound"] == "upper",
                  "metric": grown.metric, "currencies": figures, "scratch_end_points": ends}  # fmt: skip
    result["health"] = health(grown, scratch)
    result["notes"] = [f"{r} logs no validation fingerprint (written before hf-stack recorded one): its eval_loss may "
                       "come from other text" for r in unchecked]  # fmt: skip
    result["notes"] += [f"{c.name} trained on its data {c.data_epochs:.2f} times (data_epochs in its log)"
                        for c in [grown, *scratch] if (c.data_epochs or 0) > 1]  # fmt: skip
    out = Path(output) if output else Path(grown_run) / "compare.png"
    bound = ">" if result["lower_bound"] else "<" if result.get("upper_bound") else "="
    title = f"speed-up {bound} {result['speedup']:.1%} (FLOPs scratch needs to reach the grown run's final loss)"
    plot([grown, *scratch], out, title=title)
    result["plot"] = str(out)
    return result
