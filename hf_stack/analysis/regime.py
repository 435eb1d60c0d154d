"""Trainer -> compare: the regime map, where growth stops paying, for `bench/regime.py`.

The study's protocol (`hf_stack.analysis.study`) with cooldown ladders (`hf_stack.training.ladder`): the grown arm
and scratch each train once per seed and learning rate, at a constant rate after one absolute warmup, and each
budget of their ladder is an annealed end point (its own cooldown branch). The speed-up at every grown budget is
read from that seed's scratch ladder (interpolated in log cost between scratch's end points; outside them a bound),
in all-parameter FLOPs, non-embedding FLOPs and training seconds, with the loss gap at equal FLOPs.

- **Targets**: several model sizes (`targets`), each with its own ladders, tuning, rows and scratch runs.
- **Tuning**: each role's peak rate (the small model's by its loss at the first d; the grown model's and scratch's
  by the ladder's end point at `tune_at` tokens per target parameter) is the best mean over `tuning_seeds`, on a
  grid per role; the table says whether the choice is inside the grid and which rate is best at the longest budget.
- **Rows**: G_stack at each growth point d (tokens per small-model parameter), and controls at the first d
  (`zero`, function preserving; `random` without masks: new layers at random init, a warm start that is not
  stacking). Every row reuses the tuned rates.
- **Statistics**: per-seed figures; a percentile bootstrap over seeds of the mean; "growth ahead" only where the
  interval excludes zero. A fit of the speed-up against log tokens per target parameter with a bootstrap over seeds
  of its slope and of where it would cross zero.
- **Baselines**: unigram and a count bigram (Dirichlet-smoothed towards unigram, its prior mass chosen on the
  validation blocks: the strongest such bigram) on the same validation blocks.
- **Data**: each pass over the training blocks is a fresh permutation of the seed; at most `max_epochs` passes.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..errors import HfStackError
from ..training.log import CURRENCIES
from .study import _steps, _tps, model_for, prepare_data, run_arm

DEFAULTS = {
    "data": "corpus",
    "vocab_size": 512,
    "block_size": 128,
    "batch_size": 16,
    "validation_blocks": 128,
    "data_seed": 1234,
    "seeds": [0, 1, 2],
    "tuning_seeds": [0, 1],
    "learning_rates": {
        "small": [2.0e-3, 4.0e-3, 8.0e-3],
        "grown": [2.0e-3, 4.0e-3, 8.0e-3],
        "scratch": [2.0e-3, 4.0e-3, 8.0e-3],
    },  # fmt: skip
    "warmup_steps": 50,
    "cooldown_fraction": 0.2,
    "max_epochs": 2,
    "eval_steps": 50,
    "workers": 2,
    "targets": [],
}
TARGET_DEFAULTS = {
    "num_attention_heads": 2,
    "controls": ["zero", "random"],
    "tune_at": 8,
    "cosine_check": [],
}
TARGET_KEYS = {"name", "hidden_size", "num_attention_heads", "layers", "small_layers", "d", "budgets",
               "scratch_budgets", "controls", "tune_at", "cosine_check", "learning_rates", "seeds",
               "tuning_seeds"}  # fmt: skip
PAPER_POINT = {"tokens_per_parameter": 300e9 / 6.9e9, "speedup": 0.546, "label": "paper, 7B (300B tokens)"}


def load_recipe(recipe: dict) -> dict:
    """The recipe with defaults filled in, checked before anything runs."""
    if not isinstance(recipe, dict):
        raise HfStackError(f"a regime recipe is a mapping of settings, got {type(recipe).__name__}")
    unknown = sorted(set(recipe) - set(DEFAULTS) - {"name"})
    if unknown:
        raise HfStackError(f"unknown regime recipe keys: {', '.join(unknown)} (known: {', '.join(sorted(DEFAULTS))})")
    r = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(recipe)}
    if not r["targets"]:
        raise HfStackError("a regime recipe needs at least one target")
    targets = []
    for t in r["targets"]:
        bad = sorted(set(t) - TARGET_KEYS)
        missing = sorted({"name", "hidden_size", "layers", "small_layers", "d", "budgets", "scratch_budgets"} - set(t))
        if bad or missing:
            raise HfStackError(f"target {t.get('name', t)!r}: unknown keys {bad}, missing {missing}")
        t = {
            **TARGET_DEFAULTS,
            "seeds": r["seeds"],
            "tuning_seeds": r["tuning_seeds"],
            **t,
        }  # a target may set its own
        if not set(t["tuning_seeds"]) <= set(t["seeds"]):
            raise HfStackError(f"target {t['name']}: tuning_seeds must be among seeds")
        if t["layers"] % t["small_layers"]:
            raise HfStackError(f"target {t['name']}: layers ({t['layers']}) must be a multiple of small_layers")
        for role, grid in {**r["learning_rates"], **t.get("learning_rates", {})}.items():
            if role not in ("small", "grown", "scratch") or not grid:
                raise HfStackError(f"target {t['name']}: learning_rates has a role {role!r} or an empty grid")
        targets.append(t)
    r["targets"] = targets
    return r


def _setting(r: dict, t: dict, d: float | None = None, operator: str = "stack") -> dict:
    """The settings dict `hf_stack.analysis.study.run_arm` trains from."""
    return {"vocab_size": r["vocab_size"], "block_size": r["block_size"], "batch_size": r["batch_size"],
            "hidden_size": t["hidden_size"], "num_attention_heads": t["num_attention_heads"],
            "tie_word_embeddings": False, "small_layers": t["small_layers"],
            "factor": t["layers"] // t["small_layers"], "operator": operator, "order": "stack",
            "small_schedule": "constant_with_warmup", "schedule": "constant_with_warmup", "min_lr_rate": 0.1,
            "warmup": r["warmup_steps"], "grown_warmup": r["warmup_steps"], "eval_steps": r["eval_steps"],
            "cooldown_fraction": r["cooldown_fraction"], "max_epochs": r["max_epochs"],
            "grow_at_tokens": d if d is not None else 1, "total_tokens": 2}  # fmt: skip


def sizes(r: dict, t: dict, vocab: int) -> dict:
    from ..training.accounting import count_parameters

    s = _setting(r, t)
    small, big = model_for(s, t["small_layers"], vocab, 0), model_for(s, t["layers"], vocab, 0)
    n = {"small": count_parameters(small), "small_non_embedding": count_parameters(small, embeddings=False),
         "target": count_parameters(big), "target_non_embedding": count_parameters(big, embeddings=False)}  # fmt: skip
    n["target_non_embedding_share"] = n["target_non_embedding"] / n["target"]
    n["hidden_per_layer"] = t["hidden_size"] / t["layers"]
    return n


def _tokens(x: float, s: dict) -> int:
    """A token count rounded to whole evaluation intervals (every ladder end point and growth on an evaluated step)."""
    return _steps(x, s) * _tps(s)


def plan_target(r: dict, t: dict, n: dict) -> dict:
    """Every token count of a target: growth points, the grown ladders (budgets after each growth's warmup), scratch's
    ladder, the cosine runs of the check."""
    from ..training.ladder import cooldown_ladder

    s = _setting(r, t)
    tps, f, w = _tps(s), r["cooldown_fraction"], r["warmup_steps"]
    ds = [_tokens(d * n["small"], s) for d in t["d"]]
    scratch = sorted({_tokens(b * n["target"], s) for b in t["scratch_budgets"]})
    cooldown_ladder(scratch, f, tps, 0, w)  # the trainer's own check, before hours of runs
    grown = []
    for d in ds:
        fits = []  # the budgets whose cooldown starts after growth and the warmup after it
        for b in sorted({_tokens(b * n["target"], s) for b in t["budgets"]}):
            try:
                fits += [b] if cooldown_ladder([b], f, tps, d // tps, w) else []
            except HfStackError:
                continue
        if not fits:
            raise HfStackError(f"target {t['name']}: no budget of {t['budgets']} ends after growth at {d:,} tokens")
        grown.append({"d": d, "ladder": fits})
    tune = _tokens(t["tune_at"] * n["target"], s)
    return {"d": ds, "grown": grown, "scratch": scratch, "tune_at": tune,
            "cosine": [_tokens(b * n["target"], s) for b in t["cosine_check"]]}  # fmt: skip


def _grown_ladder(plan: dict, d: int) -> list[int]:
    return next(g["ladder"] for g in plan["grown"] if g["d"] == d)


# ---------------------------------------------------------------------------------------------- baselines
def bigram_loss(train_blocks, validation_blocks, vocab: int) -> dict:
    """Validation loss of count n-gram baselines fitted on the training blocks: unigram (add-one) and bigram
    (Dirichlet-smoothed towards the unigram, p(b|a) = (c(a,b) + m p(b)) / (c(a) + m), with the prior mass m that
    scores best on the validation blocks, so the baseline is the strongest of its kind)."""
    import numpy as np

    train, val = np.asarray(train_blocks), np.asarray(validation_blocks)
    uni = np.bincount(train.reshape(-1), minlength=vocab).astype(np.float64) + 1.0
    p_uni = uni / uni.sum()
    pairs = np.bincount((train[:, :-1] * vocab + train[:, 1:]).reshape(-1), minlength=vocab * vocab)
    pairs = pairs.reshape(vocab, vocab).astype(np.float64)
    a, b = val[:, :-1].reshape(-1), val[:, 1:].reshape(-1)
    unigram = float(-np.log(p_uni[b]).mean())
    best = None
    for m in (1, 3, 10, 30, 100, 300, 1000):
        p = (pairs[a, b] + m * p_uni[b]) / (pairs[a].sum(1) + m)
        loss = float(-np.log(p).mean())
        if best is None or loss < best[0]:
            best = (loss, m)
    return {"unigram": unigram, "bigram": best[0], "bigram_prior_mass": best[1]}


# ---------------------------------------------------------------------------------------------- the runs
class _Runner:
    """Arms to a pool of worker processes (one torch thread each), printing a line as each finishes."""

    def __init__(self, workers: int):
        import multiprocessing

        self.executor = None  # workers=1: each arm trains in this process when waited for
        if workers > 1:
            self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.done = 0

    def submit(self, arms: list[dict]) -> list:
        return [self.executor.submit(run_arm, a) for a in arms] if self.executor else list(arms)

    def wait(self, futures: list) -> list[dict]:
        out = []
        for f in futures:
            out.append(f.result() if self.executor else run_arm(f))
            a = out[-1]
            self.done += 1
            lr = f"lr {a['lr']:.2g}" + (f" -> {a['grown_lr']:.2g}" if a.get("grown_lr") else "")
            print(f"  [{self.done}] {a['name']:<40} seed {a['seed']}  {lr:<18} loss {a['final_loss']:.4f}  "
                  f"{a['train_seconds']:.0f} s", flush=True)  # fmt: skip
        return out


def _arm(r, t, data, output, row, role, seed, lr, tokens, grown_lr=None, d=None, operator="stack", ladder=None,
         schedule=None):  # fmt: skip
    s = _setting(r, t, d, operator)
    if schedule:
        s["schedule"] = schedule
    name = f"{t['name']}/{row}/{role}" + ("" if ladder or role == "small" else f"@{int(tokens)}")
    lrs = f"{lr:g}" + (f"-{grown_lr:g}" if grown_lr else "")
    folder = output / "runs" / f"{name.replace('/', '-').replace(' ', '')}-seed{seed}-lr{lrs}"
    return {"name": name, "target": t["name"], "row": row, "role": role, "operator": operator, "d": d, "seed": seed,
            "lr": lr, "grown_lr": grown_lr,
            "tokens": int(max(ladder) if ladder else tokens), "ladder": ladder, "setting": s, "data": data["folder"],
            "output": str(folder)}  # fmt: skip


def _loss_at(arm: dict, tokens: int) -> float:
    """An arm's validation loss at `tokens` of its log (an evaluated step)."""
    return next(e["eval_loss"] for e in arm["log"] if "eval_loss" in e and e["tokens"] == tokens)


def _rung_loss(arm: dict, tokens: int) -> float:
    return next(c["eval_loss"] for c in arm["cooldowns"] if c["tokens"] == tokens)


def _best(arms: list[dict], key: str, score) -> tuple[float, dict]:
    """The rate with the best mean score over the tuning seeds, and every rate's mean."""
    means = {}
    for lr in sorted({a[key] for a in arms}):
        means[lr] = statistics.fmean(score(a) for a in arms if a[key] == lr)
    return min(means, key=means.get), means


def run_regime(recipe: dict, output: Path, files, only: list[str] | None = None, on_update=None) -> dict:
    """Tuning, seeds, rows and controls for every target; returns (and writes to `output/regime.json`, and passes to
    `on_update` as each target finishes) every arm and the map. A stopped run resumes: finished arms are read back
    and a stopped ladder continues from its last decay start (`run_arm`)."""
    r = load_recipe(recipe)
    output = Path(output)
    files = [files] if isinstance(files, (str, Path)) else list(files)
    data = prepare_data(r, files, output / "data")
    import numpy as np

    train_blocks = np.load(Path(data["folder"]) / "train.npy", mmap_mode="r")
    baselines = bigram_loss(train_blocks, np.load(Path(data["folder"]) / "validation.npy"), data["vocab"])
    print(f"data: {data['tokens']:,} tokens, {data['train_blocks']:,} training blocks; unigram "
          f"{baselines['unigram']:.3f}, bigram {baselines['bigram']:.3f}", flush=True)  # fmt: skip
    runner = _Runner(r["workers"])
    targets = [t for t in r["targets"] if not only or t["name"] in only]
    pending, out_targets = [], []
    for t in targets:
        n = sizes(r, t, data["vocab"])
        plan = plan_target(r, t, n)
        grids = {**r["learning_rates"], **t.get("learning_rates", {})}
        print(f"[{t['name']}] target {n['target']:,} parameters ({n['target_non_embedding_share']:.0%} non-embedding, "
              f"{t['layers']} layers, hidden {t['hidden_size']}), small {n['small']:,}; d {plan['d']}; grown ladder "
              f"{_grown_ladder(plan, plan['d'][0])}; scratch ladder {plan['scratch']}", flush=True)  # fmt: skip
        d0 = plan["d"][0]
        arm = functools.partial(_arm, r, t, data, output)
        # Stage 1: the small model's and scratch's sweeps (independent), on the tuning seeds.
        small_f = runner.submit([arm("sweep", "small", s, lr, max(plan["d"])) for s in t["tuning_seeds"]
                                 for lr in grids["small"]])  # fmt: skip
        scratch_f = runner.submit([arm("main", "scratch", s, lr, None, ladder=plan["scratch"])
                                   for s in t["tuning_seeds"] for lr in grids["scratch"]])  # fmt: skip
        small = runner.wait(small_f)
        small_lr, small_means = _best(small, "lr", functools.partial(_loss_at, tokens=d0))
        # Stage 2: the grown model's sweep from the chosen small model.
        grown_f = runner.submit([arm("main", "grown", s, small_lr, None, grown_lr=lr, d=d0, ladder=_grown_ladder(plan, d0))
                                 for s in t["tuning_seeds"] for lr in grids["grown"]])  # fmt: skip
        grown, scratch = runner.wait(grown_f), runner.wait(scratch_f)
        at = _nearest(_grown_ladder(plan, d0), plan["tune_at"])
        grown_lr, grown_means = _best(grown, "grown_lr", functools.partial(_rung_loss, tokens=at))
        at = _nearest(plan["scratch"], plan["tune_at"])
        scratch_lr, scratch_means = _best(scratch, "lr", functools.partial(_rung_loss, tokens=at))
        tuning = {
            "small": _tuning(grids["small"], small_lr, small_means, small, "lr", None),
            "grown": _tuning(grids["grown"], grown_lr, grown_means, grown, "grown_lr", _grown_ladder(plan, d0)),
            "scratch": _tuning(grids["scratch"], scratch_lr, scratch_means, scratch, "lr", plan["scratch"]),
        }
        print(f"[{t['name']}] chosen: small {small_lr:g}, grown {grown_lr:g}, scratch {scratch_lr:g}", flush=True)
        # Stage 3: every seed at the chosen rates, every row, the controls, the cosine check (not waited for here).
        rest = [arm("main", "grown", s, small_lr, None, grown_lr=grown_lr, d=d0, ladder=_grown_ladder(plan, d0))
                for s in t["seeds"] if s not in t["tuning_seeds"]]  # fmt: skip
        rest += [arm("main", "scratch", s, scratch_lr, None, ladder=plan["scratch"])
                 for s in t["seeds"] if s not in t["tuning_seeds"]]  # fmt: skip
        for i, d in enumerate(plan["d"][1:], 1):
            rest += [arm(f"d{i}", "grown", s, small_lr, None, grown_lr=grown_lr, d=d, ladder=_grown_ladder(plan, d))
                     for s in t["seeds"]]  # fmt: skip
        for op in t["controls"]:
            rest += [arm(op, "grown", s, small_lr, None, grown_lr=grown_lr, d=d0, operator=op, ladder=_grown_ladder(plan, d0))
                     for s in t["seeds"]]  # fmt: skip
        rest += [arm("cosine", "scratch", s, scratch_lr, b, schedule="cosine_with_min_lr")
                 for b in plan["cosine"] for s in t["tuning_seeds"]]  # fmt: skip
        pending.append((t, n, plan, tuning, small + grown + scratch, runner.submit(rest)))
    result = {"recipe": r, "data": data, "baselines": baselines, "targets": out_targets, "paper": PAPER_POINT}
    for t, n, plan, tuning, swept, futures in pending:
        arms = swept + runner.wait(futures)
        out_targets.append(summarize_target(r, t, n, plan, tuning, arms, baselines))
        tmp = output / "regime.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, output / "regime.json")
        if on_update is not None:
            on_update(result)
    if runner.executor is not None:
        runner.executor.shutdown()
    return result


def _nearest(ladder: list[int], tokens: int) -> int:
    return min(ladder, key=lambda x: abs(math.log(x / tokens)))


def _tuning(grid, chosen, means, arms, key, ladder) -> dict:
    """A role's sweep: the mean score per rate, the choice, whether it is inside the grid, and (for ladders) the best
    rate at every budget (does the optimum move with the budget?)."""
    out = {"grid": grid, "chosen": chosen, "mean_score": {f"{k:g}": v for k, v in means.items()},
           "inside_grid": len(grid) > 2 and min(grid) < chosen < max(grid)}  # fmt: skip
    if ladder:
        best = {}
        for tokens in ladder:
            per_lr = {lr: statistics.fmean(_rung_loss(a, tokens) for a in arms if a[key] == lr) for lr in grid}
            best[str(tokens)] = {
                "best": min(per_lr, key=per_lr.get),
                "mean_loss": {f"{k:g}": v for k, v in per_lr.items()},
            }
        out["best_per_budget"] = best
        out["best_at_longest"] = best[str(ladder[-1])]["best"]
    return out


# ---------------------------------------------------------------------------------------------- statistics
def bootstrap_mean(values: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over seeds (with 3 seeds it spans nearly min to max)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float(v.mean())
    means = v[np.random.default_rng(seed).integers(0, len(v), (draws, len(v)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def fit_trend(points: list[tuple[int, float, float]], draws: int = 2000) -> dict | None:
    """Speed-up = a + b ln(tokens per target parameter), least squares over (seed, x, speed-up) points; a bootstrap
    over seeds (each draw refits on resampled seeds' points) gives the intervals of b and of where the line would
    cross zero (x0 = exp(-a / b), only where b < 0)."""
    import numpy as np

    seeds = sorted({p[0] for p in points})
    if len({p[1] for p in points}) < 2:
        return None

    def fit(pts):
        x = np.log([p[1] for p in pts])
        y = np.array([p[2] for p in pts])
        if np.ptp(x) == 0:
            return None
        b, a = np.polyfit(x, y, 1)
        return a, b

    a, b = fit(points)
    rng = np.random.default_rng(0)
    slopes, zeros = [], []
    for _ in range(draws):
        pick = rng.choice(seeds, len(seeds))
        got = fit([p for s in pick for p in points if p[0] == s])
        if got is None:
            continue
        slopes.append(got[1])
        zeros.append(_crossing(*got))
    zero = _crossing(a, b)
    zero = None if zero == math.inf else zero
    return {"intercept": float(a), "slope_per_ln": float(b), "slope_interval": [float(np.percentile(slopes, 2.5)),
            float(np.percentile(slopes, 97.5))], "zero_crossing": zero,
            "zero_crossing_interval": [_finite(np.percentile(zeros, 2.5, method="lower")),
                                       _finite(np.percentile(zeros, 97.5, method="higher"))],
            "points": len(points)}  # fmt: skip


def _crossing(a: float, b: float) -> float:
    """Where a + b ln x = 0 (inf if the line never falls to zero, or only beyond any float)."""
    return math.exp(-a / b) if b < 0 and -a / b < 700 else math.inf


def _verdict(lo: float, hi: float, bounds: list[str]) -> str:
    """Growth ahead only where the interval excludes zero, and no seed's figure is an upper bound (its speed-up is
    at most that); scratch ahead likewise, with no lower bound."""
    if lo > 0:
        return "growth ahead" if "upper" not in bounds else "not resolved (upper bounds)"
    if hi < 0:
        return "scratch ahead" if "lower" not in bounds else "not resolved (lower bounds)"
    return "not resolved"


def _finite(x) -> float | None:
    """None for a draw whose line never crosses zero (an unbounded end of the interval)."""
    return float(x) if math.isfinite(x) else None


def summarize_target(r, t, n, plan, tuning, arms, baselines) -> dict:
    """Every row's speed-up at every budget, per seed and over seeds, the fitted trends, health and the checks."""
    from .compare import endpoint_speedup

    chosen = {k: v["chosen"] for k, v in tuning.items()}
    scratch = {
        a["seed"]: a for a in arms if a["row"] == "main" and a["role"] == "scratch" and a["lr"] == chosen["scratch"]
    }
    ends = {seed: [_end(c) for c in a["cooldowns"]]
            for seed, a in scratch.items()}  # fmt: skip
    rows = []
    row_names = ["main", *[f"d{i}" for i in range(1, len(plan["d"]))], *t["controls"]]
    for row in row_names:
        runs = {a["seed"]: a for a in arms if a["row"] == row and a["role"] == "grown"
                and a["grown_lr"] == chosen["grown"] and a["lr"] == chosen["small"]}  # fmt: skip
        if not runs:
            continue
        d_tokens = next(iter(runs.values()))["d"]
        budgets = []
        for tokens in _grown_ladder(plan, d_tokens):
            per_seed = []
            for seed, g in sorted(runs.items()):
                rung = next(c for c in g["cooldowns"] if c["tokens"] == tokens)
                figures = endpoint_speedup(_end(rung), ends[seed])
                per_seed.append(
                    {"seed": seed, "loss": rung["eval_loss"], "epochs": rung["epochs"], "figures": figures}
                )
            entry = {"tokens": tokens, "tokens_per_target_parameter": tokens / n["target"], "per_seed": per_seed}
            for c in CURRENCIES:
                values = [p["figures"][c]["speedup"] for p in per_seed]
                lo, hi = bootstrap_mean(values)
                gaps = [p["figures"][c]["loss_gap"] for p in per_seed if p["figures"][c]["loss_gap"] is not None]
                bounds = sorted({p["figures"][c]["bound"] for p in per_seed if p["figures"][c]["bound"]})
                entry[c] = {"speedup_mean": statistics.fmean(values), "interval": [lo, hi], "bounds": bounds,
                            "loss_gap_mean": statistics.fmean(gaps) if len(gaps) == len(per_seed) else None,
                            "loss_gap_interval": list(bootstrap_mean(gaps)) if len(gaps) == len(per_seed) else None,
                            "verdict": _verdict(lo, hi, bounds)}  # fmt: skip
            entry["grown_loss"] = statistics.fmean(p["loss"] for p in per_seed)
            budgets.append(entry)
        small_at_d = [_loss_at(g, d_tokens) for g in runs.values()]
        scratch_at_d = [_interp(a["log"], d_tokens) for a in scratch.values()]
        # bounds are not values: the fit takes the figures scratch's ladder brackets
        points = [(p["seed"], b["tokens_per_target_parameter"], p["figures"]["flops"]["speedup"])
                  for b in budgets for p in b["per_seed"] if p["figures"]["flops"]["bound"] is None]  # fmt: skip
        rows.append({"name": row, "operator": next(iter(runs.values()))["operator"], "d_tokens": d_tokens,
                     "d_tokens_per_small_parameter": d_tokens / n["small"], "seeds": sorted(runs),
                     "budgets": budgets, "fit_flops": fit_trend(points),
                     "health": {"small_at_d": statistics.fmean(small_at_d), "scratch_at_d": statistics.fmean(scratch_at_d),
                                **baselines}})  # fmt: skip
    retuned = _retuned_per_budget(t, arms, tuning)
    cosine = []
    for a in arms:
        if a["row"] == "cosine" and a["seed"] in scratch:
            rung = next((c for c in scratch[a["seed"]]["cooldowns"] if c["tokens"] == a["tokens_trained"]), None)
            if rung is not None:
                cosine.append({"seed": a["seed"], "tokens": a["tokens_trained"], "cosine_loss": a["final_loss"],
                               "cooldown_loss": rung["eval_loss"], "difference": rung["eval_loss"] - a["final_loss"]})  # fmt: skip
    return {"name": t["name"], "target": {k: t[k] for k in ("hidden_size", "num_attention_heads", "layers", "small_layers")},
            "sizes": n, "plan": plan, "tuning": tuning, "rows": rows, "cosine_check": cosine, "retuned": retuned,
            "scratch_ladder": [{"seed": seed, "rungs": [{"tokens": c["tokens"], "loss": c["eval_loss"], "epochs": c["epochs"]}
                                                         for c in a["cooldowns"]]} for seed, a in sorted(scratch.items())],
            "arms": arms}  # fmt: skip


def _retuned_per_budget(t: dict, arms: list[dict], tuning: dict) -> list[dict]:
    """A sensitivity check of the tuning rule: on the tuning seeds, every budget of the grown ladder and of scratch's
    read at its own best rate (the sweep's `best_per_budget`), instead of one rate chosen at tune_at."""
    from .compare import endpoint_speedup

    small = tuning["small"]["chosen"]

    def rungs(role, key, best):
        """Each seed's rung at every budget, at that budget's best rate."""
        runs = [
            a for a in arms if a["row"] == "main" and a["role"] == role and (role == "scratch" or a["lr"] == small)
        ]
        return {int(tokens): (b["best"], {a["seed"]: next(c for c in a["cooldowns"] if c["tokens"] == int(tokens))
                                          for a in runs if a[key] == b["best"] and a["seed"] in t["tuning_seeds"]})
                for tokens, b in best.items()}  # fmt: skip

    grown = rungs("grown", "grown_lr", tuning["grown"].get("best_per_budget", {}))
    scratch = rungs("scratch", "lr", tuning["scratch"].get("best_per_budget", {}))
    out = []
    for tokens, (lr, per_seed) in grown.items():
        figures = [endpoint_speedup(_end(per_seed[seed]), [_end(v[1][seed]) for v in scratch.values()])["flops"]
                   for seed in t["tuning_seeds"]]  # fmt: skip
        out.append({"tokens": tokens, "grown_lr": lr, "scratch_lrs": {str(k): v[0] for k, v in scratch.items()},
                    "speedup_mean": statistics.fmean(f["speedup"] for f in figures),
                    "per_seed": [f["speedup"] for f in figures],
                    "bounds": sorted({f["bound"] for f in figures if f["bound"]})})  # fmt: skip
    return out


def _end(rung: dict) -> dict:
    """A ladder rung as an annealed end point for `compare.endpoint_speedup`: its final loss and its cost."""
    return {"loss": rung["eval_loss"], **{k: rung[k] for k in CURRENCIES}}


def _interp(log: list[dict], tokens: int) -> float | None:
    from .compare import interpolate_log

    return interpolate_log([(e["tokens"], e["eval_loss"]) for e in log if "eval_loss" in e], tokens)


# ---------------------------------------------------------------------------------------------- tables and plot
def _pct(stats: dict) -> str:
    lo, hi = stats["interval"]
    bound = "".join({"lower": " (>)", "upper": " (<)"}[b] for b in stats["bounds"])
    return f"{stats['speedup_mean']:+.1%} [{lo:+.0%}, {hi:+.0%}]{bound}"


def describe_regime(result: dict) -> str:
    """The map as markdown: per target, its shape and health, its tuning, then every row's speed-up at every budget
    (mean over seeds and 95% bootstrap interval) in three currencies, with the loss gap and the verdict."""
    lines = []
    for t in result["targets"]:
        n, tg = t["sizes"], t["target"]
        b = result["baselines"]
        lines += [f"### {t['name']}: {tg['layers']} layers x hidden {tg['hidden_size']} ({n['target']:,} parameters, "
                  f"{n['target_non_embedding_share']:.0%} non-embedding, hidden/layers {n['hidden_per_layer']:.0f}), "
                  f"grown from {tg['small_layers']} layers ({n['small']:,} parameters)", "",
                  f"unigram {b['unigram']:.3f}, bigram {b['bigram']:.3f} (prior mass {b['bigram_prior_mass']}) on the "
                  "validation blocks. Tuning (mean over the tuning seeds): " + "; ".join(
                      f"{role} {v['chosen']:g} of {v['grid']}" + ("" if v["inside_grid"] else " (at the edge)")
                      + (f", best at the longest budget {v['best_at_longest']:g}" if "best_at_longest" in v else "")
                      for role, v in t["tuning"].items()), ""]  # fmt: skip
        lines += ["| row | d (tok/small param) | tokens / target param | epochs | grown loss | speed-up, FLOPs "
                  "| non-embedding FLOPs | wall-clock | loss gap at equal FLOPs | verdict (FLOPs) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in t["rows"]:
            for e in row["budgets"]:
                f = e["flops"]
                gap = ("n/a" if f["loss_gap_mean"] is None else
                       f"{f['loss_gap_mean']:+.3f} [{f['loss_gap_interval'][0]:+.3f}, {f['loss_gap_interval'][1]:+.3f}]")  # fmt: skip
                epochs = max(p["epochs"] for p in e["per_seed"])
                lines.append(f"| {row['name']} ({row['operator']}) | {row['d_tokens_per_small_parameter']:.1f} "
                             f"| {e['tokens_per_target_parameter']:.1f} | {epochs:.2f} | {e['grown_loss']:.3f} "
                             f"| {_pct(f)} | {_pct(e['non_embedding_flops'])} | {_pct(e['train_seconds'])} | {gap} "
                             f"| {f['verdict']} |")  # fmt: skip
        lines.append("")
        for row in t["rows"]:
            fit = row["fit_flops"]
            h = row["health"]
            lines.append(f"- {row['name']}: small model at d {h['small_at_d']:.3f}, target from scratch at d "
                         f"{h['scratch_at_d']:.3f}" + ("" if fit is None else
                         f"; fit: speed-up = {fit['intercept']:+.3f} {fit['slope_per_ln']:+.3f} ln(tokens/param), slope "
                         f"95% [{fit['slope_interval'][0]:+.3f}, {fit['slope_interval'][1]:+.3f}], zero at "
                         + ("none (slope >= 0)" if fit["zero_crossing"] is None else
                            f"{fit['zero_crossing']:.3g} tokens/param [{_bound(fit['zero_crossing_interval'][0])}, "
                            f"{_bound(fit['zero_crossing_interval'][1])}]")))  # fmt: skip
        for e in t.get("retuned", []):
            lines.append(f"- each budget at its own best rates ({len(e['per_seed'])} tuning seeds): at "
                         f"{e['tokens'] / n['target']:.1f} tokens/param, grown {e['grown_lr']:g}: speed-up "
                         f"{e['speedup_mean']:+.1%}" + (f" ({', '.join(e['bounds'])} bound)" if e["bounds"] else ""))  # fmt: skip
        for c in t["cosine_check"]:
            lines.append(f"- cosine check, seed {c['seed']}, {c['tokens']:,} tokens: complete cosine {c['cosine_loss']:.3f}, "
                         f"cooldown branch {c['cooldown_loss']:.3f} (difference {c['difference']:+.3f})")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def _bound(x: float | None) -> str:
    return "never" if x is None else f"{x:.3g}"


def plot_regime(result: dict, path) -> Path:
    """Speed-up (FLOPs; mean and bootstrap band over seeds) against tokens per target parameter, one line per target
    and growth point, with the paper's point and a dashed zero line; beside it the loss ladders of the main row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, t in enumerate(result["targets"]):
        for j, row in enumerate(r for r in t["rows"] if r["operator"] == "stack"):
            x = [e["tokens_per_target_parameter"] for e in row["budgets"]]
            m = [100 * e["flops"]["speedup_mean"] for e in row["budgets"]]
            lo = [100 * e["flops"]["interval"][0] for e in row["budgets"]]
            hi = [100 * e["flops"]["interval"][1] for e in row["budgets"]]
            color = f"C{2 * i + j}"
            label = f"{t['name']} ({t['sizes']['target'] / 1e6:.2f}M), d = {row['d_tokens_per_small_parameter']:.1f} tok/small param"
            ax.plot(x, m, marker="o", color=color, label=label)
            ax.fill_between(x, lo, hi, color=color, alpha=0.2)
            bounded = [k for k, e in enumerate(row["budgets"]) if e["flops"]["bounds"]]
            ax.scatter([x[k] for k in bounded], [m[k] for k in bounded], marker="^", s=70, facecolors="none",
                       edgecolors=color)  # fmt: skip
        main = t["rows"][0] if t["rows"] else None
        if main is not None:
            xs = [e["tokens_per_target_parameter"] for e in main["budgets"]]
            ax2.plot(xs, [e["grown_loss"] for e in main["budgets"]], marker="o", color=f"C{2 * i}",
                     label=f"{t['name']} G_stack")  # fmt: skip
            ladders = [entry["rungs"] for entry in t["scratch_ladder"]]
            n = min(len(lad) for lad in ladders)
            ax2.plot([ladders[0][k]["tokens"] / t["sizes"]["target"] for k in range(n)],
                     [statistics.fmean(lad[k]["loss"] for lad in ladders) for k in range(n)], marker="s",
                     linestyle="--", color=f"C{2 * i}", label=f"{t['name']} scratch")  # fmt: skip
    p = result["paper"]
    ax.scatter([p["tokens_per_parameter"]], [100 * p["speedup"]], marker="*", s=160, color="black", label=p["label"])
    ax.axhline(0, color="black", linestyle="--", linewidth=1)
    ax2.axhline(result["baselines"]["bigram"], color="grey", linestyle=":", label="bigram")
    for axis, ylabel, title in (
        (ax, "speed-up over scratch in FLOPs, % (mean, 95% bootstrap band over seeds)",
         "where growth stops paying (triangles: bounds)"),
        (ax2, "validation loss at each annealed end point (mean over seeds)", "the ladders: grown (main row) and scratch"),
    ):  # fmt: skip
        axis.set_xscale("log")
        axis.set_xlabel("tokens per target parameter (budget)")
        axis.set_ylabel(ylabel)
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compact_map(result: dict) -> dict:
    """What `hf-stack when` reads (`hf_stack/recipes/regime_map.json`): per target, the G_stack rows' speed-up in
    FLOPs at every budget, at the first growth point (the map's main row)."""
    targets = []
    for t in result["targets"]:
        main = next((row for row in t["rows"] if row["name"] == "main"), None)
        if main is None:
            continue
        points = [{"tokens_per_parameter": round(b["tokens_per_target_parameter"], 3),
                   "speedup": round(b["flops"]["speedup_mean"], 4),
                   "interval": [round(x, 4) for x in b["flops"]["interval"]],
                   "bound": b["flops"]["bounds"][0] if b["flops"]["bounds"] else None,
                   "verdict": b["flops"]["verdict"]} for b in main["budgets"]]  # fmt: skip
        targets.append({"name": t["name"], "target_params": t["sizes"]["target"], "seeds": len(main["seeds"]),
                        "growth_factor": t["target"]["layers"] // t["target"]["small_layers"],
                        "d_tokens_per_small_parameter": round(main["d_tokens_per_small_parameter"], 3),
                        "points": points})  # fmt: skip
    return {"source": "bench/results/regime.json (bench/regime.py)", "targets": targets}


def summary_lines(result: dict) -> list[str]:
    """What the map's first target found, in words: health, the speed-up at each budget, and the regime measured."""
    t = result["targets"][0]
    main = next(row for row in t["rows"] if row["name"] == "main")
    h, n, b = main["health"], t["sizes"], result["baselines"]
    lines = [f"health: small model ({n['small']:,} parameters) at d = {main['d_tokens']:,} tokens: validation loss "
             f"{h['small_at_d']:.3f}; the target from scratch after the same tokens (stable rate, not annealed): "
             f"{h['scratch_at_d']:.3f}; unigram {b['unigram']:.3f}, bigram {b['bigram']:.3f}"]  # fmt: skip
    for e in main["budgets"]:
        f = e["flops"]
        lo, hi = f["interval"]
        bound = {"lower": "at least ", "upper": "at most "}.get(f["bounds"][0], "") if f["bounds"] else ""
        lines.append(f"at {e['tokens_per_target_parameter']:.1f} tokens per target parameter: speed-up in FLOPs "
                     f"{bound}{f['speedup_mean']:+.1%} (95% bootstrap interval over {len(main['seeds'])} seeds "
                     f"[{lo:+.1%}, {hi:+.1%}]): {f['verdict']}")  # fmt: skip
    last = main["budgets"][-1]
    lines.append(f"regime: {main['budgets'][0]['tokens_per_target_parameter']:.1f}-"
                 f"{last['tokens_per_target_parameter']:.1f} tokens per target parameter on a {n['target']:,}-parameter "
                 f"target ({n['target_non_embedding_share']:.0%} non-embedding); at the largest budget the grown model is "
                 f"{abs(b['bigram'] - last['grown_loss']):.2f} nats {'below' if last['grown_loss'] < b['bigram'] else 'above'} "
                 "the bigram baseline. The paper's +54.6% is at ~43 "
                 "tokens per parameter and 7B; bench/README.md maps the trend on this machine.")  # fmt: skip
    return lines
