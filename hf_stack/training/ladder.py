"""Stage 3, cooldown ladders: annealed end points at many budgets from one run (warmup-stable-decay with a cooldown
branch per budget; Hägele et al. 2024, arXiv 2405.18392). Plain data, computed from the settings alone.

The last phase trains at its peak rate after warmup (the stable run) to the largest budget's decay start, with a
checkpoint at every budget's decay start. Each budget then resumes from its checkpoint and decays over its own
cooldown (a fraction of that budget's steps): an ended schedule, so its final loss is an annealed end point, and its
compute is the stable run up to its start plus its cooldown.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import HfStackError

COOLDOWN_DIR = "cooldown-{tokens}"
COOLDOWN_TYPES = ("linear", "1-sqrt", "cosine")


def cooldown_ladder(budgets, fraction: float, tps: int, phase_start: int, warmup: int) -> list[dict]:
    """One rung per budget, smallest first: `{"tokens", "steps", "decay_start", "cooldown_steps"}` (global steps).

    Args:
        budgets: total training tokens of each end point (every phase counted).
        fraction: each budget's cooldown as a fraction of its steps.
        tps: training tokens per optimizer step.
        phase_start: the global step the last phase starts at (its growth step; 0 without growth).
        warmup: the last phase's warmup in steps; every decay must start after it ends.

    >>> [r["decay_start"] for r in cooldown_ladder([1000, 4000], 0.25, 100, 0, 2)]
    [8, 30]
    """
    if not 0 < fraction < 1:
        raise HfStackError(f"cooldown_fraction must be between 0 and 1, got {fraction}")
    rungs = []
    for tokens in sorted(set(int(b) for b in budgets)):
        steps = tokens // tps
        cooldown = max(1, round(fraction * steps))
        start = steps - cooldown
        if start < phase_start + warmup or start <= phase_start:  # a decay start is a checkpoint the phase wrote
            where = "its warmup" if phase_start == 0 else f"growth (step {phase_start}) and the warmup after it"
            raise HfStackError(
                f"cooldown budget {tokens:.3g} tokens ({steps} steps at {tps} tokens a step) starts its cooldown at "
                f"step {start}, before the end of {where} (step {phase_start + warmup}); give a larger budget"
            )
        rungs.append({"tokens": steps * tps, "steps": steps, "decay_start": start, "cooldown_steps": cooldown,
                      "decay_start_tokens": start * tps})  # fmt: skip
    if len({r["steps"] for r in rungs}) < len(rungs):
        raise HfStackError(f"cooldown budgets {sorted(budgets)} fall on the same step ({tps} tokens a step)")
    return rungs


def cooldown_dir(out: Path, rung: dict, largest: bool) -> Path:
    """Where a rung's branch keeps its checkpoints, `final/` and `training_log.json`: the run folder itself for the
    largest budget (the run's own end), `cooldown-<tokens>/` inside it for the others."""
    return out if largest else out / COOLDOWN_DIR.format(tokens=rung["tokens"])


def branch_summary(rung: dict, log: dict, folder: str) -> dict:
    """What a finished branch adds to the run's `training_log.json`: its budget, where its cooldown started, its
    final validation loss and its compute in every currency (the stable run up to its start plus its cooldown)."""
    training = log["training"]
    evals = [e for e in log["log_history"] if "eval_loss" in e and e.get("tokens") == training["total_tokens"]]
    return {"tokens": rung["tokens"], "decay_start_tokens": rung["decay_start_tokens"],
            "cooldown_steps": rung["cooldown_steps"], "folder": folder,
            "eval_loss": evals[-1]["eval_loss"] if evals else None, "flops": training["total_flops"],
            "non_embedding_flops": training["total_non_embedding_flops"],
            "train_seconds": training["total_train_seconds"]}  # fmt: skip
