"""Compare a grown run with a from-scratch baseline: loss against FLOPs and tokens, and the paper's speed-up."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import HfStackError

TRAINING_LOG = "training_log.json"


@dataclass(frozen=True)
class Curve:
    name: str
    flops: list[float]
    tokens: list[float]
    loss: list[float]
    metric: str  # "eval_loss" or "loss"
    growth_flops: float | None  # where the run grew, if it did


def read_curve(run_dir: str | Path, metric: str | None = None) -> Curve:
    """Loss points of a run folder written by `StackingTrainer` (its `training_log.json`)."""
    path = Path(run_dir) / TRAINING_LOG
    if not path.is_file():
        raise HfStackError(f"{run_dir} has no {TRAINING_LOG}; pass a folder written by `hf-stack train`")
    data = json.loads(path.read_text())
    entries = data.get("log_history", [])
    if metric is None:
        metric = "eval_loss" if any("eval_loss" in e for e in entries) else "loss"
    points = sorted((e["flops"], e["tokens"], e[metric]) for e in entries if metric in e and "flops" in e)
    if not points:
        raise HfStackError(f"{path} has no {metric!r} entries to compare")
    phases = data.get("training", {}).get("phases", [])
    growth = phases[0]["flops"] if len(phases) > 1 else None
    return Curve(Path(run_dir).name or str(run_dir), *map(list, zip(*points)), metric=metric, growth_flops=growth)


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
        "metric": grown.metric,
    }


def plot(curves: list[Curve], path: str | Path, title: str = "") -> Path:
    """Loss against FLOPs and against tokens, growth points marked, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for c in curves:
        for ax, xs in zip(axes, (c.flops, c.tokens)):
            (line,) = ax.plot(xs, c.loss, label=c.name)
            if c.growth_flops is not None:
                i = min(range(len(c.flops)), key=lambda k: abs(c.flops[k] - c.growth_flops))
                ax.axvline(xs[i], color=line.get_color(), linestyle=":", alpha=0.7)
    for ax, label in zip(axes, ("training FLOPs (6ND)", "training tokens")):
        ax.set_xlabel(label)
        ax.set_ylabel(curves[0].metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "loss (dotted: growth)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe_speedup(r: dict) -> str:
    """One line: the speed-up, or its lower bound when scratch never reached the grown run's loss."""
    if r["lower_bound"]:
        return (f"speed-up > {r['speedup']:.1%}: scratch never reached the grown run's final {r['metric']} "
                f"{r['grown_final_loss']:.4f} within its {r['scratch_flops_to_match']:.3g} FLOPs")  # fmt: skip
    return (f"speed-up = {r['speedup']:.1%}: scratch needs {r['scratch_flops_to_match']:.3g} FLOPs to reach the grown "
            f"run's final {r['metric']} {r['grown_final_loss']:.4f}, the grown run used {r['grown_flops']:.3g}")  # fmt: skip


def compare(grown_run: str | Path, scratch_run: str | Path, output: str | Path | None = None) -> dict:
    """Read two run folders, write the loss-vs-FLOPs plot and return the speed-up figures.

    Args:
        grown_run: a run that grew (its `training_log.json`).
        scratch_run: the from-scratch baseline with the same target.
        output: the PNG to write (default `<grown_run>/compare.png`).
    """
    grown, scratch = read_curve(grown_run), read_curve(scratch_run)
    if grown.metric != scratch.metric:
        grown, scratch = read_curve(grown_run, "loss"), read_curve(scratch_run, "loss")
    result = speedup(grown, scratch)
    out = Path(output) if output else Path(grown_run) / "compare.png"
    bound = ">" if result["lower_bound"] else "="
    title = f"speed-up {bound} {result['speedup']:.1%} (FLOPs scratch needs to reach the grown run's final loss)"
    plot([grown, scratch], out, title=title)
    result["plot"] = str(out)
    return result
