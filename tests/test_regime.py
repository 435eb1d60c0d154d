"""The regime map: the bigram baseline, the statistics, and a whole (tiny) map with its tuning, rows, controls,
ladders read at their own ends, and resume."""

import json
import math
import shutil

import numpy as np
import pytest

from hf_stack import HfStackError
from hf_stack.analysis.regime import bigram_loss, bootstrap_mean, fit_trend, load_recipe, run_regime
from hf_stack.training.log import CURRENCIES
from tests.conftest import CORPUS


def test_bigram_baseline_is_the_smoothed_count_model_with_its_best_prior():
    train = np.array([[0, 1, 0, 1], [1, 0, 1, 2]])
    val = np.array([[0, 1, 2]])
    got = bigram_loss(train, val, vocab=4)
    uni = np.bincount(train.reshape(-1), minlength=4) + 1.0  # 0:3 1:4 2:1 3:0, plus one each
    p_uni = uni / uni.sum()
    assert got["unigram"] == pytest.approx(-(math.log(p_uni[1]) + math.log(p_uni[2])) / 2)
    # pairs (0,1) x3, (1,0) x2, (1,2) x1: c(0,.) = 3, c(1,.) = 3
    m = got["bigram_prior_mass"]
    expected = -(math.log((3 + m * p_uni[1]) / (3 + m)) + math.log((1 + m * p_uni[2]) / (3 + m))) / 2
    assert got["bigram"] == pytest.approx(expected)
    for other in (1, 3, 10, 30, 100, 300, 1000):  # the best prior of the grid on these blocks
        worse = -(math.log((3 + other * p_uni[1]) / (3 + other)) + math.log((1 + other * p_uni[2]) / (3 + other))) / 2
        assert got["bigram"] <= worse + 1e-12
    assert got["bigram"] < got["unigram"]  # the sequence is predictable from the previous token


def test_bootstrap_interval_and_trend_fit():
    lo, hi = bootstrap_mean([0.1, 0.3, 0.2])
    assert 0.1 <= lo < 0.2 < hi <= 0.3
    # an exact line: speed-up = 0.6 - 0.15 ln x, so it crosses zero at x = e^4
    points = [(s, x, 0.6 - 0.15 * math.log(x)) for s in (0, 1, 2) for x in (1, 4, 16, 32)]
    fit = fit_trend(points)
    assert fit["intercept"] == pytest.approx(0.6) and fit["slope_per_ln"] == pytest.approx(-0.15)
    assert fit["zero_crossing"] == pytest.approx(math.exp(4))
    assert fit["slope_interval"] == pytest.approx([-0.15, -0.15])
    assert fit["zero_crossing_interval"] == pytest.approx([math.exp(4), math.exp(4)])
    rising = fit_trend([(s, x, 0.1 * math.log(x) + s / 100) for s in (0, 1) for x in (1, 8)])
    assert rising["zero_crossing"] is None and rising["slope_per_ln"] > 0


# budgets in tokens per target parameter (14,800 parameters; the corpus holds about 3,100 tokens)
TARGET = dict(name="T", hidden_size=16, num_attention_heads=2, layers=2, small_layers=1, d=[0.02], budgets=[0.1, 0.2],
              scratch_budgets=[0.05, 0.1, 0.2, 0.25], tune_at=0.1, cosine_check=[0.2], controls=["random"])  # fmt: skip
TINY = dict(vocab_size=300, block_size=16, batch_size=4, validation_blocks=8, eval_steps=2, warmup_steps=2, workers=1,
            seeds=[0, 1], tuning_seeds=[0, 1], max_epochs=2,
            learning_rates={"small": [1e-3, 1e-2], "grown": [1e-3, 1e-2], "scratch": [1e-3, 1e-2]},
            targets=[TARGET])  # fmt: skip


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"targets": []}, "at least one target"),
        ({"targets": [{"name": "T"}]}, "missing"),
        ({"tuning_seeds": [5], "targets": [TARGET]}, "target T: tuning_seeds must be among seeds"),
        ({"targets": [{**TARGET, "seeds": [0], "tuning_seeds": [1]}]}, "target T: tuning_seeds must be among seeds"),
        ({"warmup": 3}, "unknown regime recipe keys: warmup"),
    ],
)
def test_regime_recipe_refusals(recipe, match):
    with pytest.raises(HfStackError, match=match):
        load_recipe(recipe)


def test_a_target_may_set_its_own_seeds():
    r = load_recipe({**TINY, "targets": [TARGET, {**TARGET, "name": "U", "seeds": [3, 4], "tuning_seeds": [4]}]})
    assert [(t["seeds"], t["tuning_seeds"]) for t in r["targets"]] == [([0, 1], [0, 1]), ([3, 4], [4])]


def test_a_tiny_map_tunes_on_two_seeds_reads_every_budget_and_resumes(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t * 3 for t in CORPUS))
    result = run_regime(TINY, tmp_path / "map", [str(corpus)])
    (t,) = result["targets"]
    arms = t["arms"]
    # tuning: every role at every rate on both tuning seeds, the best mean chosen (at tune_at for the ladders)
    pairs = {
        "small": [(a["seed"], a["lr"]) for a in arms if a["role"] == "small"],
        "grown": [(a["seed"], a["grown_lr"]) for a in arms if a["role"] == "grown" and a["row"] == "main"],
        "scratch": [(a["seed"], a["lr"]) for a in arms if a["role"] == "scratch" and a["row"] == "main"],
    }
    for tried in pairs.values():
        assert sorted(tried) == [(s, lr) for s in (0, 1) for lr in (1e-3, 1e-2)]
    # recomputed from the raw logs: the small model by its eval loss at d, the ladders by the rung nearest tune_at,
    # each rate by its mean over the two tuning seeds
    d0, n = t["plan"]["d"][0], t["sizes"]["target"]

    def pick(role, key, score):
        runs = [a for a in arms if a["role"] == role and a["row"] in ("sweep", "main")]
        means = {lr: np.mean([score(a) for a in runs if a[key] == lr]) for lr in (1e-3, 1e-2)}
        return min(means, key=means.get)

    def rung(a):
        nearest = min(a["cooldowns"], key=lambda c: abs(math.log(c["tokens"] / (TARGET["tune_at"] * n))))
        return nearest["eval_loss"]

    at_d = lambda a: next(e["eval_loss"] for e in a["log"] if e.get("tokens") == d0 and "eval_loss" in e)  # noqa: E731
    assert t["tuning"]["small"]["chosen"] == pick("small", "lr", at_d)
    assert t["tuning"]["scratch"]["chosen"] == pick("scratch", "lr", rung)
    grown_sweep = [a for a in arms if a["lr"] == t["tuning"]["small"]["chosen"]]
    assert {a["lr"] for a in arms if a["role"] == "grown"} == {t["tuning"]["small"]["chosen"]}
    assert t["tuning"]["grown"]["chosen"] == pick("grown", "grown_lr", rung) and grown_sweep
    # every ladder rung is an ended schedule: its own branch, evaluated at its end
    for a in arms:
        for rung in a.get("cooldowns") or []:
            assert rung["epochs"] <= 2
            ended = rung["log"] if rung["folder"] != "." else a["log"]
            evals = [e for e in ended if "eval_loss" in e and e["tokens"] == rung["tokens"]]
            assert evals and evals[-1]["eval_loss"] == rung["eval_loss"]
    # rows: G_stack and the random-layers control, each budget read against that seed's scratch ladder
    assert [row["name"] for row in t["rows"]] == ["main", "random"]
    scratch = {a["seed"]: a for a in arms if a["role"] == "scratch" and a["row"] == "main"
               and a["lr"] == t["tuning"]["scratch"]["chosen"]}  # fmt: skip
    for row in t["rows"]:
        assert row["seeds"] == [0, 1] and row["budgets"]
        for b in row["budgets"]:
            for p in b["per_seed"]:
                ends = [
                    {"loss": c["eval_loss"], **{k: c[k] for k in CURRENCIES}} for c in scratch[p["seed"]]["cooldowns"]
                ]
                # a grown end point below every scratch end point is a lower bound, above every one an upper bound
                f = p["figures"]["flops"]
                if p["loss"] < min(e["loss"] for e in ends):
                    assert f["bound"] == "lower"
                elif p["loss"] > max(e["loss"] for e in ends):
                    assert f["bound"] == "upper"
                else:  # the matched cost lies between two scratch end points whose losses bracket the grown loss
                    assert f["bound"] is None
                    below = max(
                        (e for e in ends if e["flops"] <= f["scratch_cost_to_match"]), key=lambda e: e["flops"]
                    )
                    above = min(
                        (e for e in ends if e["flops"] >= f["scratch_cost_to_match"]), key=lambda e: e["flops"]
                    )
                    assert min(below["loss"], above["loss"]) <= p["loss"] <= max(below["loss"], above["loss"])
                grown = next(
                    a
                    for a in arms
                    if a["role"] == "grown"
                    and a["row"] == row["name"]
                    and a["seed"] == p["seed"]
                    and a["grown_lr"] == t["tuning"]["grown"]["chosen"]
                    and a["lr"] == t["tuning"]["small"]["chosen"]
                )
                rung = next(c for c in grown["cooldowns"] if c["tokens"] == b["tokens"])
                assert (f["grown_cost"], p["loss"]) == (rung["flops"], rung["eval_loss"])
            lo, hi = b["flops"]["interval"]
            assert b["flops"]["verdict"] == (
                "growth ahead" if lo > 0 else "scratch ahead" if hi < 0 else "not resolved"
            )
        h = row["health"]
        assert h["bigram"] < h["unigram"] and math.isfinite(h["small_at_d"])
    # the sensitivity check: each grown budget against scratch's ladder, each budget at its own best rate
    assert [e["tokens"] for e in t["retuned"]] == [b["tokens"] for b in t["rows"][0]["budgets"]]
    grown_main = [a for a in arms if a["role"] == "grown" and a["row"] == "main"]
    for e in t["retuned"]:
        means = {
            lr: np.mean([_rung(a, e["tokens"]) for a in grown_main if a["grown_lr"] == lr]) for lr in (1e-3, 1e-2)
        }
        assert e["grown_lr"] == min(means, key=means.get) and len(e["per_seed"]) == 2
    assert len(t["cosine_check"]) == 2 and {c["seed"] for c in t["cosine_check"]} == {0, 1}
    # a second call trains nothing again
    results = sorted((tmp_path / "map" / "runs").glob("*/arm_result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    again = run_regime(TINY, tmp_path / "map", [str(corpus)])
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert again["targets"][0]["rows"] == t["rows"]
    # a ladder stopped before its largest branch ended continues: its finished branches are kept, the same result
    ladder = next(p.parent for p in results if "-main-scratch-seed1-" in str(p))
    kept = sorted(ladder.glob("cooldown-*/final/model.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in kept]
    before = json.loads((ladder / "arm_result.json").read_text())["result"]["cooldowns"]
    for gone in (ladder / "arm_result.json", ladder / "training_log.json"):
        gone.unlink()
    shutil.rmtree(ladder / "final")
    again = run_regime(TINY, tmp_path / "map", [str(corpus)])
    assert kept and [p.stat().st_mtime_ns for p in kept] == stamps
    after = json.loads((ladder / "arm_result.json").read_text())["result"]["cooldowns"]
    assert [(c["tokens"], c["flops"]) for c in after] == [(c["tokens"], c["flops"]) for c in before]
    assert [c["eval_loss"] for c in after] == pytest.approx([c["eval_loss"] for c in before], abs=1e-5)


def _rung(arm, tokens):
    return next(c["eval_loss"] for c in arm["cooldowns"] if c["tokens"] == tokens)


def test_a_map_needing_more_passes_than_allowed_is_refused(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    recipe = {
        **TINY,
        "max_epochs": 1,
        "targets": [{**TARGET, "scratch_budgets": [0.05, 0.1, 0.2, 0.25], "controls": []}],
    }
    with pytest.raises(HfStackError, match="passes; the recipe allows 1"):
        run_regime(recipe, tmp_path / "map", [str(corpus)])


def test_when_prints_the_measured_point_nearest_the_users_budget(tmp_path):
    from hf_stack.analysis.regime import compact_map
    from hf_stack.plans.timing import GrowthTiming, measured_nearest, when_to_grow

    def budget(x, m, lo, hi, bound=None):
        stats = {"speedup_mean": m, "interval": [lo, hi], "bounds": [bound] if bound else [],
                 "verdict": "growth ahead" if lo > 0 else "not resolved"}  # fmt: skip
        return {"tokens_per_target_parameter": x, "flops": stats}

    result = {"targets": [{"name": "T1", "sizes": {"target": 254_528}, "target": {"layers": 4, "small_layers": 2},
                           "rows": [{"name": "main", "seeds": [0, 1, 2], "d_tokens_per_small_parameter": 1.3,
                                     "budgets": [budget(2, 0.4, 0.3, 0.5), budget(8, 0.1, -0.02, 0.2),
                                                 budget(32, -0.05, -0.1, 0.01, "upper")]}]}]}  # fmt: skip
    path = tmp_path / "map.json"
    path.write_text(json.dumps(compact_map(result)))
    (near,) = measured_nearest(10, path)
    assert (near["tokens_per_parameter"], near["speedup"], near["inside"]) == (8, 0.1, True)
    (far,) = measured_nearest(300, path)
    assert (far["tokens_per_parameter"], far["inside"], far["bound"]) == (32, False, "upper")
    timing = when_to_grow(7e9, 3e11)
    text = GrowthTiming(**{**timing.to_dict(), "measured": [far]}).describe()
    assert "0.25M-parameter target (g = 2, 3 seeds), at 32 tokens per parameter" in text
    assert "outside 2-32" in text and "at most -5.0%" in text and "[-10.0%, +1.0%]" in text
