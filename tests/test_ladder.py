"""Cooldown ladders: every budget's branch is the warmup-stable-decay run of that budget, with growth, with resume,
its compute counted as the stable run to its start plus its cooldown; and the regime map built from them."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from hf_stack import HfStackError, StackingTrainer, StackingTrainingArguments
from hf_stack.training.ladder import cooldown_ladder

TPS = 4 * 16  # batch 4 of 16-token blocks


def _model(layers=1, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)  # fmt: skip
    return LlamaForCausalLM(config)


def _data(n=300):
    # a learnable sequence (a noisy cycle), so the loss moves and a wrong schedule shows
    rng = np.random.default_rng(0)
    x = (np.arange(n * 16).reshape(n, 16) * 7 + rng.integers(0, 3, (n, 16))) % 64
    return Dataset.from_dict({"input_ids": x, "labels": x}).with_format("torch")


def _args(out, **kw):
    base = dict(per_device_train_batch_size=4, use_cpu=True, report_to=[], learning_rate=1e-2, warmup_steps=3,
                eval_strategy="steps", eval_steps=5, logging_steps=5, save_strategy="no", disable_tqdm=True, seed=0)  # fmt: skip
    return StackingTrainingArguments(str(out), **{**base, **kw})


def _train(out, model=None, callbacks=(), resume=None, **kw):
    data = _data()
    trainer = StackingTrainer(model=model or _model(), args=_args(out, **kw), train_dataset=data,
                              eval_dataset=data.select(range(12)), callbacks=list(callbacks))  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def _eval_loss(folder):
    from transformers import AutoModelForCausalLM

    blocks = torch.as_tensor(np.asarray(_data().with_format("numpy")[:12]["input_ids"]))
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(input_ids=blocks, labels=blocks).loss.item()


def _same_weights(a, b, atol=1e-6):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"weights differ by {worst}"


def test_the_ladder_is_plain_data():
    rungs = cooldown_ladder([1000, 4000], 0.25, 100, 0, 2)
    assert [(r["steps"], r["decay_start"], r["cooldown_steps"]) for r in rungs] == [(10, 8, 2), (40, 30, 10)]
    with pytest.raises(HfStackError, match="before the end of growth"):
        cooldown_ladder([1000], 0.2, 100, 7, 2)  # decays at step 8, growth at 7 and 2 warmup steps after it


def test_each_branch_is_the_wsd_run_of_its_budget_and_counts_its_own_compute(tmp_path):
    budgets = [16 * TPS, 30 * TPS]
    _train(tmp_path / "ladder", max_tokens=40 * TPS, cooldown_budgets=budgets)
    log = json.loads((tmp_path / "ladder" / "training_log.json").read_text())
    rungs = log["cooldowns"]
    assert [r["tokens"] for r in rungs] == [16 * TPS, 30 * TPS, 40 * TPS]
    assert [r["folder"] for r in rungs] == [f"cooldown-{16 * TPS}", f"cooldown-{30 * TPS}", "."]
    n = sum(p.numel() for p in _model().parameters())
    for rung in rungs:
        steps = rung["tokens"] // TPS
        cooldown = round(0.2 * steps)
        assert rung["decay_start_tokens"] == (steps - cooldown) * TPS
        assert rung["flops"] == 6 * n * rung["tokens"]  # the stable run to its start plus its own cooldown
        # and its seconds: the stable run's, logged at its decay start, plus its own cooldown's
        at_start = [e["train_seconds"] for e in log["log_history"] if e["tokens"] == rung["decay_start_tokens"]]
        assert at_start and 0 < at_start[-1] <= rung["train_seconds"]
        # the same weights as one complete warmup-stable-decay run of that budget, trained on its own
        ref = tmp_path / f"wsd-{steps}"
        _train(ref, max_tokens=rung["tokens"], lr_scheduler_type="warmup_stable_decay",
               lr_scheduler_kwargs={"num_decay_steps": cooldown, "decay_type": "linear"})  # fmt: skip
        _same_weights(tmp_path / "ladder" / rung["folder"] / "final", ref / "final")
        # its final loss is its own final model's, evaluated at its end
        assert rung["eval_loss"] == pytest.approx(_eval_loss(tmp_path / "ladder" / rung["folder"] / "final"), abs=1e-4)
        # read at its own end: the last step's rate is the last of a linear decay to zero over its cooldown
        branch = json.loads((tmp_path / "ladder" / rung["folder"] / "training_log.json").read_text())
        lrs = [e["learning_rate"] for e in branch["log_history"] if "learning_rate" in e]
        assert lrs[-1] == pytest.approx(1e-2 / cooldown)
    # each branch's training log holds the stable run up to its start, then its own cooldown
    small = json.loads((tmp_path / "ladder" / rungs[0]["folder"] / "training_log.json").read_text())
    stable = [e for e in log["log_history"] if e["tokens"] <= rungs[0]["decay_start_tokens"] and "loss" in e]
    assert stable and [e for e in small["log_history"] if e in stable] == stable


def test_a_grown_ladder_branches_after_growth_and_equals_the_grown_wsd_run(tmp_path):
    growth = dict(grow_at_tokens=8 * TPS, stacked_config={"factor": 2})
    _train(tmp_path / "ladder", max_tokens=30 * TPS, cooldown_budgets=[20 * TPS], **growth)
    rungs = json.loads((tmp_path / "ladder" / "training_log.json").read_text())["cooldowns"]
    branch = json.loads((tmp_path / "ladder" / rungs[0]["folder"] / "training_log.json").read_text())
    phases = branch["training"]["phases"]
    assert [p["tokens"] for p in phases] == [8 * TPS, 12 * TPS] and phases[1]["num_layers"] == 2
    assert branch["training"]["total_flops"] == pytest.approx(sum(p["flops"] for p in phases))
    ref = tmp_path / "wsd"
    _train(ref, max_tokens=20 * TPS, grown_lr_scheduler_type="warmup_stable_decay",
           grown_lr_scheduler_kwargs={"num_decay_steps": 4, "decay_type": "linear"}, **growth)  # fmt: skip
    _same_weights(tmp_path / "ladder" / rungs[0]["folder"] / "final", ref / "final")


class _Stop(TrainerCallback):
    """Kills the run (an exception) at a global step of a given Trainer.train call, as a crash would."""

    def __init__(self, call, step):
        self.call, self.step, self.calls = call, step, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.calls += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.calls == self.call and state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    "call, step, save",
    [(1, 20, {}), (3, 28, {}), (3, 27, dict(save_strategy="steps", save_steps=3))],
    ids=["in the stable run", "in the second branch", "in a branch with its own checkpoints"],
)
def test_a_stopped_ladder_resumes_keeping_finished_branches(tmp_path, call, step, save):
    kw = dict(max_tokens=36 * TPS, cooldown_budgets=[12 * TPS, 28 * TPS], **save)
    _train(tmp_path / "whole", **kw)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "stopped", callbacks=[_Stop(call, step)], **kw)
    first = tmp_path / "stopped" / f"cooldown-{12 * TPS}" / "final" / "model.safetensors"
    stamp = first.stat().st_mtime_ns if first.exists() else None
    _train(tmp_path / "stopped", resume=True, **kw)
    if stamp is not None:  # a finished branch is not trained again
        assert first.stat().st_mtime_ns == stamp
    whole = json.loads((tmp_path / "whole" / "training_log.json").read_text())["cooldowns"]
    again = json.loads((tmp_path / "stopped" / "training_log.json").read_text())["cooldowns"]
    for a, b in zip(whole, again):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5) and a["flops"] == b["flops"]
        _same_weights(tmp_path / "whole" / a["folder"] / "final", tmp_path / "stopped" / b["folder"] / "final")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_tokens=10 * TPS, cooldown_budgets=[20 * TPS]), "beyond max_tokens"),
        (dict(cooldown_budgets="1e3,x"), "cannot read cooldown_budgets"),
        (dict(cooldown_budgets=[2000], cooldown_type="step"), "cooldown_type must be one of"),
        (dict(cooldown_budgets=[2000], save_total_limit=2), "unset save_total_limit"),
        (dict(cooldown_budgets=[2000], cooldown_fraction=1.5), "cooldown_fraction must be between"),
    ],
)
def test_ladder_settings_are_refused_before_training(tmp_path, kw, match):
    with pytest.raises(HfStackError, match=match):
        _train(tmp_path / "x", **kw)


def test_the_cli_takes_a_ladder_and_refuses_one_that_starts_before_growth(tmp_path, llama_small, data_file):
    common = [sys.executable, "-m", "hf_stack.cli", "train", "--model", str(llama_small), "--data", str(data_file),
              "--block-size", "16", "--per-device-train-batch-size", "4", "--use-cpu", "true", "--report-to", "none",
              "--validation-fraction", "0.1", "--disable-tqdm", "true"]  # fmt: skip
    bad = subprocess.run([*common, "-o", str(tmp_path / "bad"), "--grow-at-tokens", "1024", "--factor", "2",
                          "--max-tokens", "2048", "--cooldown-budgets", "1100"], capture_output=True, text=True)  # fmt: skip
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("error: cooldown budget") and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
    ok = subprocess.run([*common, "-o", str(tmp_path / "ok"), "--max-tokens", "2048", "--cooldown-budgets", "1024"],
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    rungs = json.loads((tmp_path / "ok" / "training_log.json").read_text())["cooldowns"]
    assert [r["tokens"] for r in rungs] == [1024, 2048] and all(math.isfinite(r["eval_loss"]) for r in rungs)
    assert (tmp_path / "ok" / "cooldown-1024" / "final" / "model.safetensors").is_file()


def test_a_ladder_without_an_eval_set_trains_every_branch(tmp_path):
    data = _data()
    args = _args(tmp_path / "run", eval_strategy="no", max_tokens=24 * TPS, cooldown_budgets=[12 * TPS])
    StackingTrainer(model=_model(), args=args, train_dataset=data).train()
    rungs = json.loads((tmp_path / "run" / "training_log.json").read_text())["cooldowns"]
    assert [(r["tokens"], r["eval_loss"]) for r in rungs] == [(12 * TPS, None), (24 * TPS, None)]
    assert (tmp_path / "run" / f"cooldown-{12 * TPS}" / "final" / "model.safetensors").is_file()


def test_a_branch_that_ended_before_its_outputs_were_written_is_read_back_not_trained_again(tmp_path):
    kw = dict(max_tokens=30 * TPS, cooldown_budgets=[15 * TPS], save_strategy="steps", save_steps=7)
    _train(tmp_path / "run", **kw)
    branch = tmp_path / "run" / f"cooldown-{15 * TPS}"
    assert (branch / "checkpoint-15").is_dir()  # its end, saved before the outputs
    shutil.copytree(branch / "final", tmp_path / "expected")
    shutil.rmtree(branch / "final")
    (branch / "training_log.json").unlink()
    _train(tmp_path / "run", resume=True, **kw)
    _same_weights(branch / "final", tmp_path / "expected", atol=0)
    log = json.loads((branch / "training_log.json").read_text())
    assert log["training"]["total_tokens"] == 15 * TPS
