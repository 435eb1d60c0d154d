"""The fair growth-vs-scratch protocol: currencies the trainer logs, the unigram baseline, annealed end points, health
warnings, and a whole (tiny) study with its sweep, seeds and resume."""

import json
import math
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from hf_stack import HfStackError, StackedConfig, StackingTrainer, StackingTrainingArguments, build_dataset
from hf_stack.analysis.compare import Curve, endpoint_speedup, speedup
from hf_stack.analysis.study import _verdict, load_recipe, model_for, run_study
from hf_stack.data import unigram_loss
from tests.conftest import TEXT, build_checkpoint

CORPUS = [TEXT.replace("a", c) for c in "abcdefghijklmnop"]


def blocks(rows):
    rows = np.array(rows)
    return Dataset.from_dict({"input_ids": rows, "labels": rows}).with_format("torch")


# ---------------------------------------------------------------- the unigram baseline


def test_unigram_loss_is_the_cross_entropy_of_smoothed_training_counts():
    train = blocks([[0, 1, 1, 2], [1, 1, 3, 0]])
    val = blocks([[5, 1, 2, 1]])
    # the first token of a block is not scored: [1, 2, 1]. Counts 0:2 1:4 2:1 3:1, plus one each over the
    # vocabulary: of 6 ids, 3 5 2 2 1 1 (sum 14); by default over the ids seen, 3 5 2 2 (sum 12)
    expected = -(math.log(5 / 14) + math.log(2 / 14) + math.log(5 / 14)) / 3
    assert unigram_loss(train, val, vocab_size=6) == pytest.approx(expected, rel=1e-12)
    expected = -(math.log(5 / 12) + math.log(2 / 12) + math.log(5 / 12)) / 3
    assert unigram_loss(train, val) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- speed-up against annealed end points

ENDS = [
    {"loss": 3.0, "flops": 100.0, "train_seconds": 10.0},
    {"loss": 2.5, "flops": 200.0, "train_seconds": 30.0},
    {"loss": 2.0, "flops": 400.0, "train_seconds": 50.0},
]


def test_endpoint_speedup_interpolates_in_log_cost_between_end_points():
    r = endpoint_speedup({"loss": 2.5, "flops": 100.0, "train_seconds": 20.0}, ENDS)
    assert r["flops"]["speedup"] == pytest.approx(1.0) and r["flops"]["bound"] is None
    assert r["train_seconds"]["speedup"] == pytest.approx(30 / 20 - 1)
    # at equal compute scratch has only reached 3.0: growth is 0.5 ahead
    assert r["flops"]["loss_gap"] == pytest.approx(-0.5)
    # 2.25 is half-way from 2.5 to 2.0: half-way from 200 to 400 in log FLOPs
    r = endpoint_speedup({"loss": 2.25, "flops": 141.4213562373095, "train_seconds": 20.0}, ENDS)
    assert r["flops"]["scratch_cost_to_match"] == pytest.approx(math.sqrt(200 * 400))
    assert r["flops"]["speedup"] == pytest.approx(1.0)  # 282.8 FLOPs for scratch, 141.4 for the grown run
    assert r["flops"]["scratch_loss_at_equal_cost"] == pytest.approx(2.75)
    assert "non_embedding_flops" not in r  # not logged on either side: not reported


def test_endpoint_speedup_outside_the_end_points_is_a_bound():
    below = endpoint_speedup({"loss": 1.9, "flops": 100.0}, ENDS, currencies=["flops"])["flops"]
    assert below["bound"] == "lower" and below["speedup"] == pytest.approx(3.0)
    above = endpoint_speedup({"loss": 3.1, "flops": 100.0}, ENDS, currencies=["flops"])["flops"]
    assert above["bound"] == "upper" and above["speedup"] == pytest.approx(0.0)
    # the gap at equal cost extends the first segment a little below the 1x budget (rounded to whole steps) ...
    near = endpoint_speedup({"loss": 2.9, "flops": 100 / 2**0.1}, ENDS, currencies=["flops"])["flops"]
    assert near["scratch_loss_at_equal_cost"] == pytest.approx(3.0 + 0.05) and near["loss_gap"] == pytest.approx(-0.15)
    # ... and no further
    far = endpoint_speedup({"loss": 2.9, "flops": 50.0}, ENDS, currencies=["flops"])["flops"]
    assert far["scratch_loss_at_equal_cost"] is None and far["loss_gap"] is None


def test_curve_speedup_is_an_upper_bound_when_scratch_starts_below_the_target():
    grown = Curve("g", [1, 2, 3], [1, 2, 3], [3.0, 2.0, 1.5], "loss", 1)
    early = Curve("s", [2, 4], [2, 4], [1.4, 1.0], "loss", None)
    r = speedup(grown, early)
    assert r["upper_bound"] is True and r["lower_bound"] is False
    later = Curve("s", [1, 2, 4, 6], [1, 2, 4, 6], [3.0, 2.5, 2.0, 1.0], "loss", None)
    assert speedup(grown, later)["upper_bound"] is False


# ---------------------------------------------------------------- `hf-stack compare` with end points and health


def write_log(folder, evals, phases, unigram, non_embedding_share):
    """A training_log.json as the trainer writes it: eval entries with every currency, the phases, the baseline."""
    folder.mkdir(parents=True)
    history = [{"eval_loss": loss, "tokens": t, "flops": f, "non_embedding_flops": f * non_embedding_share,
                "train_seconds": s, "phase": p} for loss, t, f, s, p in evals]  # fmt: skip
    log = {"training": {"phases": phases}, "log_history": history, "baselines": {"unigram_eval_loss": unigram}}
    (folder / "training_log.json").write_text(json.dumps(log))


def hf_stack(*args):
    return subprocess.run([sys.executable, "-m", "hf_stack.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("small_loss, warned", [(5.2, False), (5.9, True)])
def test_compare_reads_annealed_end_points_and_warns_about_a_weak_small_model(tmp_path, small_loss, warned):
    phases = [{"phase": 1, "tokens": 60, "flops": 20.0}, {"phase": 2, "tokens": 140, "flops": 80.0}]
    write_log(tmp_path / "grown", [(small_loss, 60, 20.0, 2.0, 1), (2.5, 200, 100.0, 20.0, 2)], phases, 5.8, 0.48)
    # three budgets, each its own schedule; the longest also passes the growth point's 60 tokens between two points
    runs = {"s1": (3.0, 100.0, 10.0, 100), "s2": (2.5, 200.0, 30.0, 100), "s3": (2.0, 400.0, 50.0, 200)}
    for i, (name, (loss, flops, seconds, tokens)) in enumerate(runs.items()):
        evals = [(6.0, 10, flops / 10, 1.0, 1), (5.4 + 0.2 * i, 50, flops / 2, seconds / 2, 1),
                 (5.0 + 0.2 * i, tokens * 3 / 4, flops * 0.7, seconds * 0.7, 1), (loss, tokens, flops, seconds, 1)]  # fmt: skip
        write_log(tmp_path / name, evals, [{"phase": 1, "tokens": tokens, "flops": flops}], 5.8, 0.5)
    r = hf_stack("compare", tmp_path / "grown", *(tmp_path / n for n in runs), "-o", tmp_path / "c.png")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "training FLOPs (6ND, all parameters): speed-up = +100.0%; loss gap at equal cost -0.5000" in lines
    # non-embedding: the grown run has 48 of scratch's 50 per FLOP, so scratch's 100 against 48, and the gap is
    # read 4% below scratch's first end point (ln(48/50) / ln 2 of the way down the first segment)
    assert "non-embedding FLOPs: speed-up = +108.3%; loss gap at equal cost -0.5294" in lines
    # 20 s lies between scratch's 10 s (3.0) and 30 s (2.5) at ln 2 / ln 3 of the way in log seconds
    assert "training wall-clock s: speed-up = +50.0%; loss gap at equal cost -0.1845" in lines
    # the target after the growth point's 60 tokens, read off the longest scratch run (s3: 5.8 at 50, 5.4 at 150),
    # ln(60/50) / ln 3 of the way in log tokens
    at_d = 5.8 - 0.4 * math.log(60 / 50) / math.log(3)
    assert f"health: small model at growth: {small_loss:.4f}; target from scratch after the same tokens: " \
           f"{at_d:.4f}; unigram baseline: 5.8000" in lines  # fmt: skip
    assert any(line.startswith("warning: the small model is no better than unigram") for line in lines) is warned
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "values, verdict",
    [([0.1, 0.5, 0.02], "growth ahead"), ([-0.1, -0.4], "scratch ahead"), ([0.3, -0.01, 0.2], "no difference")],
)
def test_a_claim_holds_only_when_every_seed_agrees(values, verdict):
    assert _verdict(values).startswith(verdict)


# ---------------------------------------------------------------- what the trainer logs


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in CORPUS))
    return path


class SlowEval(TrainerCallback):
    def on_evaluate(self, args, state, control, **kwargs):
        time.sleep(0.5)  # inside the evaluation: must not count as training time


def test_trainer_logs_three_currencies_the_baseline_and_a_schedule_per_phase(tmp_path, data_file):
    build_checkpoint(tmp_path / "small", "llama", num_layers=2)
    tok = AutoTokenizer.from_pretrained(tmp_path / "small")
    train, val = build_dataset([str(data_file)], tok, 16, seed=0, validation_fraction=0.2)
    args = StackingTrainingArguments(
        str(tmp_path / "run"), per_device_train_batch_size=4, learning_rate=1e-3, grown_learning_rate=5e-4,
        warmup_steps=2, lr_scheduler_type="constant_with_warmup", grown_lr_scheduler_type="cosine_with_min_lr",
        grown_lr_scheduler_kwargs='{"min_lr_rate": 0.1}', logging_steps=1, eval_strategy="steps", eval_steps=4,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, grow_at_tokens=64 * 8,
        max_tokens=64 * 20, stacked_config=StackedConfig(factor=2),
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    trainer = StackingTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tok, callbacks=[SlowEval()]
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())

    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    blocks_of = {1: model, 2: grown}
    non_embedding = {
        phase: sum(p.numel() for n, p in m.named_parameters() if n.startswith("model.layers.") or n == "model.norm.weight")
        for phase, m in blocks_of.items()
    }  # fmt: skip
    for e in log["log_history"]:
        phase_tokens = e["tokens"] - (0 if e["phase"] == 1 else 64 * 8)
        before = 0 if e["phase"] == 1 else 6 * non_embedding[1] * 64 * 8
        assert e["non_embedding_flops"] == pytest.approx(before + 6 * non_embedding[e["phase"]] * phase_tokens)
    training = log["training"]
    assert training["total_non_embedding_flops"] == pytest.approx(
        6 * 64 * (8 * non_embedding[1] + 12 * non_embedding[2])
    )

    # wall-clock: monotone, and the evaluations (each slept 0.5 s) are not in it
    seconds = [e["train_seconds"] for e in log["log_history"]]
    assert seconds == sorted(seconds) and seconds[-1] > 0
    n_evals = sum("eval_loss" in e for e in log["log_history"])
    assert n_evals >= 4 and training["total_train_seconds"] < wall - 0.5 * n_evals

    # the baseline: smoothed unigram counts of the training blocks, scored on the validation blocks
    ids = train[:]["input_ids"].reshape(-1).tolist()
    scored = val[:]["input_ids"][:, 1:].reshape(-1).tolist()
    size = max(max(ids + scored) + 1, grown.config.vocab_size)
    counts = Counter(ids)
    total = len(ids) + size
    expected = -sum(math.log((counts[t] + 1) / total) for t in scored) / len(scored)
    assert log["baselines"]["unigram_eval_loss"] == pytest.approx(expected, abs=1e-6)

    # phase 1 constant after warmup at its peak; phase 2 cosine down to a tenth of the grown peak
    lr1 = [e["learning_rate"] for e in log["log_history"] if e["phase"] == 1 and "learning_rate" in e]
    lr2 = [e["learning_rate"] for e in log["log_history"] if e["phase"] == 2 and "learning_rate" in e]
    assert lr1[2:] == [pytest.approx(1e-3)] * len(lr1[2:])
    assert max(lr2) == pytest.approx(5e-4) and lr2[-1] < 1e-4 and min(lr2[2:]) >= 5e-5 - 1e-12


def test_the_study_table_shows_every_bound_and_the_growth_point_it_ran():
    """Each cell marks every kind of bound its seeds hold (the d=0.125M row: one seed an upper bound, the others
    lower ones), and each row the d it grew at (steps are whole evaluation intervals: 0.125M ran at 163,840)."""
    from pathlib import Path

    from hf_stack.analysis.study import describe_study

    study = json.loads((Path(__file__).resolve().parent.parent / "bench/results/study.json").read_text())
    lines = {line.split(" | ")[0][2:]: line for line in describe_study(study).splitlines() if line.startswith("| ")}
    mixed = 0
    for row in study["rows"]:
        bounds = {p["figures"]["flops"]["bound"] for p in row["per_seed"]} - {None}
        cells = lines[row["name"]].split(" | ")
        assert cells[1] == f"{row['sizes']['d']:,}"
        assert ("(>)" in cells[2], "(<)" in cells[2]) == ("lower" in bounds, "upper" in bounds), row["name"]
        mixed += bounds == {"lower", "upper"}
    assert mixed  # the file holds a row with both kinds


def test_unknown_grown_schedule_is_refused():
    with pytest.raises(HfStackError, match="unknown grown_lr_scheduler_type 'cosnie'"):
        StackingTrainingArguments("x", grown_lr_scheduler_type="cosnie", report_to=[])


# ---------------------------------------------------------------- a whole study


@pytest.mark.parametrize(
    "recipe, match",
    [
        ({"learning_rate": 1e-3}, "unknown study recipe keys: learning_rate"),
        ({"ablations": [{"name": "x", "hidden_size": 32}]}, "may change only"),
        ({"ablations": [{"factor": 2}]}, "needs a name"),
        ({"grow_at_tokens": 2e6}, "must be inside total_tokens"),
        ({"scratch_budgets": [1.0]}, "two scratch budgets"),
    ],
)
def test_study_recipe_refusals(recipe, match):
    with pytest.raises(HfStackError, match=match):
        load_recipe(recipe)


TINY = dict(vocab_size=300, block_size=16, batch_size=4, validation_blocks=8, hidden_size=16, num_attention_heads=2,
            small_layers=1, factor=2, grow_at_tokens=256, total_tokens=768, eval_steps=2, learning_rates=[1e-3, 1e-2],
            seeds=[0, 1], scratch_budgets=[1.0, 2.0], workers=1,
            ablations=[{"name": "late", "grow_at_tokens": 512}])  # fmt: skip


def test_a_tiny_study_sweeps_every_role_reads_annealed_ends_and_resumes(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(t * 4 for t in CORPUS))
    study = run_study(TINY, tmp_path / "study", [str(corpus)])
    arms = study["arms"]
    # the sweep: each role tried at every learning rate on seed 0, and the best of each chosen
    for role, key in (("small", "lr"), ("grown", "grown_lr")):
        tried = [a for a in arms if a["role"] == role and a["seed"] == 0 and a["row"] == "main"]
        assert sorted(a[key] for a in tried) == [1e-3, 1e-2]
        assert study["sweep"]["chosen"][role] == min(tried, key=lambda a: a["final_loss"])[key]
    # scratch: one run per seed and budget, each read at the end of its own annealed schedule
    scratch = [a for a in arms if a["role"] == "scratch" and a["lr"] == study["sweep"]["chosen"]["scratch"]]
    assert sorted((a["seed"], a["name"]) for a in scratch) == [
        (s, f"main/scratch@{m}x") for s in (0, 1) for m in ("1", "2")
    ]
    for a in scratch:
        assert a["final_loss"] == [e["eval_loss"] for e in a["log"] if "eval_loss" in e][-1]
        lrs = [e["learning_rate"] for e in a["log"] if "learning_rate" in e]
        assert lrs[-1] < 0.2 * max(lrs)  # annealed: cosine down to min_lr_rate 0.1 of the peak
    one = next(a for a in scratch if a["name"].endswith("@1x"))
    two = next(a for a in scratch if a["name"].endswith("@2x") and a["seed"] == one["seed"])
    assert two["flops"] == pytest.approx(2 * one["flops"], rel=0.15)
    # the grown runs' FLOPs: 6 N_small d + 6 N_target (T - d), N counted here with plain numel (the models are untied)
    vocab = study["data"]["vocab"]
    setting = {**TINY, "tie_word_embeddings": False}
    n_small, n_target = (
        sum(p.numel() for p in model_for(setting, layers, vocab, 0).parameters()) for layers in (1, 2)
    )
    grown = next(a for a in arms if a["name"] == "main/grown" and a["seed"] == 1)
    assert grown["flops"] == 6 * n_small * 256 + 6 * n_target * 512
    # both rows, both seeds; the verdict follows the seeds' signs and the gap's sign follows the speed-up's
    assert [row["name"] for row in study["rows"]] == ["main", "late"]
    signs_checked = 0
    for row in study["rows"]:
        values = [p["figures"]["flops"]["speedup"] for p in row["per_seed"]]
        assert len(values) == 2 and row["flops"]["speedup_mean"] == pytest.approx(sum(values) / 2)
        assert (row["flops"]["verdict"] == "growth ahead") == all(v > 0 for v in values)
        checked = 0
        for p in row["per_seed"]:
            f = p["figures"]["flops"]
            if f["loss_gap"] is not None and f["bound"] is None and abs(f["speedup"]) > 0.05:
                assert (f["loss_gap"] < 0) == (f["speedup"] > 0)
                checked += 1
        signs_checked += checked
        assert row["health"]["unigram_loss"] > 0 and row["health"]["small_loss_at_growth"] > 0
    assert signs_checked >= 1
    # a second call reads every finished arm back instead of training it again
    results = sorted((tmp_path / "study" / "runs").glob("*/arm_result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    again = run_study(TINY, tmp_path / "study", [str(corpus)])
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert again["rows"] == study["rows"]
