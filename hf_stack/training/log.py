"""Stage 3, the training log: `training_log.json` (every logged step with its tokens, FLOPs and seconds) read back
as loss curves, and drawn against each currency."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HfStackError

TRAINING_LOG = "training_log.json"
# The currencies a speed-up is counted in: 6ND with every parameter, 6ND without the embedding and head, and
# measured wall-clock seconds of training (evaluation excluded), as the trainer logs them.
CURRENCIES = ("flops", "non_embedding_flops", "train_seconds")
CURRENCY_LABELS = {
    "flops": "training FLOPs (6ND, all parameters)",
    "non_embedding_flops": "non-embedding FLOPs",
    "train_seconds": "training wall-clock s",
    "tokens": "training tokens",
}


@dataclass(frozen=True)
class Curve:
    name: str
    flops: list[float]
    tokens: list[float]
    loss: list[float]
    metric: str  # "eval_loss" or "loss"
    growth_flops: float | None  # where the run grew, if it did
    cost: dict = field(default_factory=dict)  # currency -> values at each point, where the log has them
    phase: list[int] = field(default_factory=list)  # 1 before growth, 2 after
    growth_tokens: float | None = None
    unigram_loss: float | None = None  # validation loss of unigram frequencies (the trainer's baseline)
    growth_points: list[float] = field(default_factory=list)  # FLOPs at every growth of the run, in order
    validation: dict | None = None  # the validation set's fingerprint (hf_stack.data.fingerprint), if logged
    data_epochs: float | None = None  # passes over the run's training data, if logged

    def cost_at_last(self, currency: str) -> float | None:
        """The cost in `currency` at the last logged loss (not the run's total: the two are read together)."""
        values = self.flops if currency == "flops" else self.cost.get(currency)
        return values[-1] if values else None

    def small_loss(self) -> float | None:
        """The small model's last logged loss before growth: its health at d (None for a run that did not grow)."""
        if self.growth_tokens is None:
            return None
        before = [v for v, p in zip(self.loss, self.phase) if p == 1]
        return before[-1] if before else None


def read_curve(run_dir: str | Path, metric: str | None = None) -> Curve:
    """Loss points of a run folder written by `StackingTrainer` (its `training_log.json`)."""
    path = Path(run_dir) / TRAINING_LOG
    if not path.is_file():
        raise HfStackError(f"{run_dir} has no {TRAINING_LOG}; pass a folder written by `hf-stack train`")
    data = json.loads(path.read_text())
    entries = data.get("log_history", [])
    if metric is None:
        metric = "eval_loss" if any("eval_loss" in e for e in entries) else "loss"
    rows = sorted((e for e in entries if metric in e and "flops" in e), key=lambda e: (e["flops"], e["tokens"]))
    if not rows:
        raise HfStackError(f"{path} has no {metric!r} entries to compare")
    training = data.get("training", {})
    phases = training.get("phases", [])
    # where each phase ended: its FLOPs and those of the growth after it (the learn operator's), cumulated
    ends, total = [], 0.0
    for phase in phases[:-1]:
        total += phase["flops"] + phase.get("growth_flops", 0.0)
        ends.append(total)
    growth = ends[0] if ends else None
    cost = {c: [e[c] for e in rows] for c in CURRENCIES[1:] if all(c in e for e in rows)}
    return Curve(
        Path(run_dir).name or str(run_dir), [e["flops"] for e in rows], [e["tokens"] for e in rows],
        [e[metric] for e in rows], metric=metric,
        growth_flops=growth, cost=cost, phase=[e.get("phase", 1) for e in rows],
        growth_tokens=phases[0]["tokens"] if len(phases) > 1 else None,
        unigram_loss=data.get("baselines", {}).get("unigram_eval_loss"), growth_points=ends,
        validation=data.get("validation"), data_epochs=training.get("data_epochs"),
    )  # fmt: skip


def plot(curves: list[Curve], path: str | Path, title: str = "") -> Path:
    """Loss against every logged currency (FLOPs, non-embedding FLOPs, seconds) and tokens, growth marked, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_for = ["flops"] + [c for c in CURRENCIES[1:] if all(c in k.cost for k in curves)] + ["tokens"]
    fig, axes = plt.subplots(1, len(axes_for), figsize=(5.2 * len(axes_for), 4))
    for c in curves:
        for ax, currency in zip(axes, axes_for):
            xs = c.flops if currency == "flops" else c.tokens if currency == "tokens" else c.cost[currency]
            (line,) = ax.plot(xs, c.loss, label=c.name)
            for point in c.growth_points or ([c.growth_flops] if c.growth_flops is not None else []):
                i = min(range(len(c.flops)), key=lambda k: abs(c.flops[k] - point))
                ax.axvline(xs[i], color=line.get_color(), linestyle=":", alpha=0.7)
    for ax, currency in zip(axes, axes_for):
        ax.set_xlabel(CURRENCY_LABELS[currency])
        ax.set_ylabel(curves[0].metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    unigram = next((c.unigram_loss for c in curves if c.unigram_loss is not None), None)
    if unigram is not None:
        for ax in axes:
            ax.axhline(unigram, color="grey", linestyle="--", alpha=0.6, linewidth=1)
    fig.suptitle(title or "loss (dotted: growth; dashed: unigram baseline)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
