"""The trial (Landscape-Aware Growing): real growth, the real StackingTrainer and real files from a tiny Llama, each
number in the table checked against one computed here without the trial's code."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_stack import HfStackError, StackedConfig, StackedModelForCausalLM, StackingTrainer, trial
from hf_stack.cli import main
from tests.conftest import TEXT, build_checkpoint, refusal, snapshot

# 16 documents of the tokenizer's words in shuffled order: no two 16-token windows alike
CORPUS = [" ".join(random.Random(i).sample(TEXT.split() * 3, k=3 * len(TEXT.split()))) for i in range(16)]
STEPS, BATCH, BLOCK = 4, 4, 16
CANDIDATES = ["factor=2", "operator=zero,factor=2", "layer_map=0-1,1",
              "operator=learn,factor=2,learn_steps=2,learn_batch_size=2,learn_block_size=16"]  # fmt: skip
NAMES = ["factor-2", "operator-zero_factor-2", "layer_map-0-1_1",
         "operator-learn_factor-2_learn_steps-2_learn_batch_size-2_learn_block_size-16"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trial")
    build_checkpoint(root / "small", "llama", num_layers=2)
    (root / "corpus").mkdir()
    for i, text in enumerate(CORPUS):
        (root / "corpus" / f"{i:02d}.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def api(world):
    """One trial through the Python API, recording every batch each trainer computed a loss on."""
    seen = {}
    plain = StackingTrainer.compute_loss

    def recording(self, model, inputs, *a, **kw):
        kind = "train" if model.training else "eval"
        seen.setdefault(Path(self.args.output_dir).name, {"train": [], "eval": []})[kind] += inputs[
            "input_ids"
        ].tolist()
        return plain(self, model, inputs, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StackingTrainer, "compute_loss", recording)
        result = trial(world / "small", [str(world / "corpus" / "*.txt")], CANDIDATES, world / "out", steps=STEPS,
                       batch_size=BATCH, block_size=BLOCK, learning_rate=1e-3, validation_fraction=0.3,
                       use_cpu=True)  # fmt: skip
    return result, seen


def held_out_loss(model, blocks) -> float:
    """Mean next-token loss over the blocks, one forward pass per block (all blocks have the same length)."""
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss.item() for b in blocks]
    return sum(losses) / len(losses)


def n_params(model) -> int:
    return sum(p.numel() for p in {p.data_ptr(): p for p in model.parameters()}.values())


def test_one_row_per_candidate_and_trial_json(api, world):
    result, _ = api
    out = world / "out"
    on_disk = json.loads((out / "trial.json").read_text())
    assert on_disk == {k: v for k, v in result.items() if k != "output"}
    rows = on_disk["candidates"]
    assert [r["name"] for r in rows] == NAMES and [r["candidate"] for r in rows] == CANDIDATES
    fields = {"num_layers", "num_parameters", "loss_after_growth", "loss_after_trial", "trial_flops", "tokens",
              "growth_flops", "training_flops", "best", "final", "settings"}  # fmt: skip
    assert all(fields <= set(r) for r in rows)
    assert [r["num_layers"] for r in rows] == [4, 4, 3, 4] and rows[2]["settings"]["layer_map"] == "0-1,1"
    for r in rows:  # each candidate's folder is a normal run folder; final/ records the growth it came from
        final = out / r["final"]
        assert (out / r["name"] / "training_log.json").is_file() and (final / "model.safetensors").is_file()
        assert StackedConfig.from_pretrained(final).to_dict() == r["settings"]
        assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == r["num_layers"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*NAMES, "trial.json"])
    assert [p.name for p in world.iterdir() if p.name.startswith(".out")] == []  # no temporary folder left


def test_every_candidate_saw_the_same_blocks(api):
    result, seen = api
    runs = [seen[name] for name in NAMES]
    train, held_out = runs[0]["train"], runs[0]["eval"]
    assert len(train) == STEPS * BATCH and all(len(b) == BLOCK for b in train)
    n_eval = result["protocol"]["held_out_blocks"]
    assert n_eval >= 5 and len(held_out) == 2 * n_eval  # evaluated right after growth and after the trial
    assert held_out[:n_eval] == held_out[n_eval:]
    for run in runs[1:]:
        assert run["train"] == train and run["eval"] == held_out  # same blocks, same order
    small = [v for k, v in seen.items() if k not in NAMES]  # the small model's evaluation, in the trial folder
    assert len(small) == 1 and small[0]["eval"] == held_out[:n_eval] and small[0]["train"] == []
    assert not {tuple(b) for b in held_out} & {tuple(b) for b in train}  # held out: never trained on
    assert {r["tokens"] for r in result["candidates"]} == {STEPS * BATCH * BLOCK}


def test_losses_are_the_models_losses_on_the_held_out_blocks(api, world):
    result, seen = api
    n_eval = result["protocol"]["held_out_blocks"]
    blocks = seen[NAMES[0]]["eval"][:n_eval]
    small = AutoModelForCausalLM.from_pretrained(world / "small")
    small_loss = held_out_loss(small, blocks)
    rows = {r["name"]: r for r in result["candidates"]}
    assert result["small"]["held_out_loss"] == pytest.approx(small_loss, abs=1e-4)
    # zero growth keeps the function: its loss right after growth is the small model's; stacking changes it
    assert rows["operator-zero_factor-2"]["loss_after_growth"] == pytest.approx(small_loss, abs=1e-4)
    assert (
        abs(rows["factor-2"]["loss_after_growth"] - small_loss) > 3e-4
    )  # well outside the 1e-4 that "the same" allows above
    stacked = StackedModelForCausalLM.from_small_pretrained(world / "small", StackedConfig(factor=2))
    assert rows["factor-2"]["loss_after_growth"] == pytest.approx(held_out_loss(stacked, blocks), abs=1e-4)
    for r in rows.values():  # after the trial: the saved final model's loss on the same blocks
        final = AutoModelForCausalLM.from_pretrained(world / "out" / r["final"])
        assert r["loss_after_trial"] == pytest.approx(held_out_loss(final, blocks), abs=1e-4)
        assert r["loss_after_trial"] < r["loss_after_growth"]


def test_the_best_row_is_the_argmin(api):
    result, _ = api
    rows = result["candidates"]
    argmin = min(range(len(rows)), key=lambda i: rows[i]["loss_after_trial"])
    assert [r["best"] for r in rows] == [i == argmin for i in range(len(rows))]
    assert result["best"] == rows[argmin]["name"]
    assert result["continue_with"].startswith(
        f"hf-stack train --model {Path(result['output']) / rows[argmin]['final']}"
    )


def test_trial_flops_are_6ND_plus_learns_growth(api, world):
    result, _ = api
    tokens = STEPS * BATCH * BLOCK
    for r in result["candidates"]:
        n = n_params(AutoModelForCausalLM.from_pretrained(world / "out" / r["final"]))
        assert r["num_parameters"] == n and r["training_flops"] == 6 * n * tokens
        learn = r["settings"]["operator"] == "learn"
        # learn trains its maps on the trial's data: 2 steps x 2 blocks x 16 tokens through the 4-layer target
        assert r["growth_flops"] == (6 * n * 2 * 2 * 16 if learn else 0)
        assert r["trial_flops"] == r["training_flops"] + r["growth_flops"]
    assert result["total_flops"] == sum(r["trial_flops"] for r in result["candidates"])
    assert "total_flops" in result["flops_convention"]


def test_candidate_text_is_typed_per_field():
    assert StackedConfig.parse_settings("layer_map=0-1,1,operator=zero") == {"layer_map": "0-1,1", "operator": "zero"}
    typed = StackedConfig.parse_settings("operator=direct,width-factor=2,init_seed=3")
    assert typed == {"operator": "direct", "width_factor": 2.0, "init_seed": 3}
    assert type(typed["width_factor"]) is float and type(typed["init_seed"]) is int
    assert StackedConfig.from_string("factor=4") == StackedConfig(factor=4)
    for text, message in [("factor=two", "factor must be a whole number, got 'two'"), ("colour=red", "unknown setting"),
                          ("factor=2,factor=3", "given twice"), ("4", "write key=value")]:  # fmt: skip
        with pytest.raises(HfStackError, match=message):
            StackedConfig.parse_settings(text)


TRIAL = ["trial", "{small}", "--data", "{corpus}/*.txt", "--steps", "2", "--batch-size", "2", "--block-size", "16",
         "-o", "{out}"]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--candidates", "factor=2", "colour=red"], "candidate 'colour=red': unknown setting 'colour'"),
        (["--candidates", "factor=two"], "factor must be a whole number, got 'two'"),
        (["--candidates", "width_factor=abc,operator=direct"], "width_factor must be a number"),
        (["--candidates", "factor=0"], "factor must be at least 1"),
        (["--candidates", "factor=2", "factor=2"], "are the same growth"),
        (["--candidates", "factor=2", "num_layers=4"], "'factor=2' and 'num_layers=4' are the same growth"),
        (["--candidates", "operator=direct,width_factor=1.1"], "cannot keep heads whole"),
        (["--candidates", "operator=learn,factor=2,learn_data={corpus}/missing.txt"], "does not exist"),
        (["--candidates", "factor=2", "--steps", "0"], "steps must be a whole number of at least 1, got 0"),
        (["--candidates", "factor=2", "--steps", "1000"], "a trial of 1000 steps x 2 blocks needs 2000"),
        (["--candidates", "factor=2", "--validation-fraction", "0"], "the trial needs held-out blocks"),
        (["--candidates", "factor=2", "--block-size", "1000"], "larger than the model's context"),
        (["--candidates"], "expected at least one argument"),
    ],
    ids=["unknown key", "bad int", "bad float", "factor 0", "duplicate", "same growth spelled twice", "split heads",
         "learn data missing", "steps 0", "data too small", "no held-out", "block beyond context", "no candidates"],
)  # fmt: skip
def test_bad_trials_give_one_error_line_and_write_nothing(world, extra, message, capsys):
    places = {"small": world / "small", "corpus": world / "corpus", "out": world / "bad-out"}
    argv = [a.format(**places) for a in TRIAL + extra]
    before = snapshot(world)
    line, _ = refusal(argv, capsys)
    assert message in line
    assert snapshot(world) == before and not (world / "bad-out").exists()


def test_cli_trial_then_the_best_final_continues_as_a_training_run(world, tmp_path):
    cli = [sys.executable, "-m", "hf_stack.cli"]
    r = subprocess.run([*cli, "trial", str(world / "small"), "--data", *sorted(map(str, (world / "corpus").glob("*.txt"))),
                        "--candidates", "factor=2", "operator=zero,factor=2", "--steps", "3", "--batch-size", "2",
                        "--block-size", "16", "--learning-rate", "1e-3", "-o", str(tmp_path / "trial")],
                       capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "trial" / "trial.json").read_text())
    best = next(row for row in result["candidates"] if row["best"])
    assert result["best"] == best["name"] and len(result["candidates"]) == 2
    for row in result["candidates"]:
        assert row["name"] in r.stdout and f"{row['loss_after_trial']:.4f}" in r.stdout
    final = tmp_path / "trial" / best["final"]
    assert f"best: {best['name']}" in r.stdout and f"hf-stack train --model {final}" in r.stdout
    r = subprocess.run([*cli, "train", "--model", str(final), "--data", str(world / "corpus" / "*.txt"),
                        "--block-size", "16", "--max-tokens", "96", "--per-device-train-batch-size", "2",
                        "--use-cpu", "true", "--report-to", "none", "--disable-tqdm", "true", "-o",
                        str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    continued = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert continued.config.num_hidden_layers == best["num_layers"] == 4
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())["training"]
    assert log["total_tokens"] == 96 and len(log["phases"]) == 1
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "final") is not None
    assert math.isfinite(best["loss_after_trial"])


def test_trial_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trial", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "examples:" in out and "--candidates" in out and "hf-stack train --model" in out
