"""Growth schedules: several growths in one run (gradual stacking, MIDAS's middle block), each a phase of its own."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from hf_stack import HfStackError, StackedConfig, StackingTrainingArguments
from hf_stack.training.log import read_curve

from .test_trainer import hf_stack, make_trainer

SCHEDULE = [
    {"at_tokens": 64 * 3, "stacked_config": {"factor": 2}},  # 2 -> 4 layers
    {"at_tokens": 64 * 6, "stacked_config": {"factor": 2, "order": "middle"}, "learning_rate": 2e-4},  # 4 -> 8
]


class EveryParameterTrains(TrainerCallback):
    """In every phase, every parameter gets a non-zero gradient and moves (the reference code's gradual stacking
    adds layers after the optimizer is built, so they never train)."""

    def __init__(self):
        self.phases = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.start = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.graded = set()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.graded |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    def on_train_end(self, args, state, control, model=None, **kw):
        params = dict(model.named_parameters())
        moved = {n for n, p in params.items() if not torch.equal(p.detach(), self.start[n])}
        self.phases.append((model.config.num_hidden_layers, set(params) - self.graded, set(params) - moved))


def test_two_growths_train_every_parameter_and_account_every_phase(small2, tmp_path, data_file):
    out = tmp_path / "r"
    check = EveryParameterTrains()
    make_trainer(small2, out, data_file, callbacks=[check], growth_schedule=SCHEDULE, max_tokens=64 * 10,
                 warmup_steps=0, logging_steps=1, stacked_config=None).train()  # fmt: skip
    assert [layers for layers, _, _ in check.phases] == [2, 4, 8]
    for layers, without_grad, unmoved in check.phases:
        assert not without_grad and not unmoved, (layers, sorted(without_grad)[:3], sorted(unmoved)[:3])
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    grown1 = AutoModelForCausalLM.from_pretrained(out / "grown-init-1")
    assert grown1.config.num_hidden_layers == 4 and final.config.num_hidden_layers == 8
    # checkpoints on both sides of every growth
    assert (out / "small" / "checkpoint-3").is_dir() and (out / "phase-2" / "checkpoint-3").is_dir()
    assert (out / "grown-init").is_dir()
    record = json.loads((out / "final" / "growth_config.json").read_text())
    assert [g["target_num_layers"] for g in record["growths"]] == [4, 8]
    assert record["growths"][1]["layer_map"] == [0, 1, 2, 1, 2, 1, 2, 3]  # MIDAS: first and last kept, middle repeated
    phases = record["training"]["phases"]
    assert [(p["phase"], p["num_layers"], p["tokens"]) for p in phases] == [(1, 2, 192), (2, 4, 192), (3, 8, 256)]
    n = [sum(p.numel() for p in m.parameters()) for m in (AutoModelForCausalLM.from_pretrained(small2), grown1, final)]
    assert [p["flops"] for p in phases] == [6 * n[0] * 192, 6 * n[1] * 192, 6 * n[2] * 256]
    assert record["training"]["total_flops"] == sum(p["flops"] for p in phases)
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    tokens = [e["tokens"] for e in log if "loss" in e]
    assert tokens == sorted(tokens) and tokens[-1] == 640 and {e["phase"] for e in log} == {1, 2, 3}
    # each phase re-warms to its own peak: phase 3 to its 2e-4, phase 2 to grown_learning_rate (5e-4)
    peak = {p: max(e["learning_rate"] for e in log if e.get("phase") == p and "learning_rate" in e) for p in (2, 3)}
    assert peak == {2: pytest.approx(5e-4), 3: pytest.approx(2e-4)}
    curve = read_curve(out, "loss")
    assert curve.growth_points == [phases[0]["flops"], phases[0]["flops"] + phases[1]["flops"]]
    card = (out / "final" / "README.md").read_text()
    assert "| 3 | 8 |" in card  # the card's table of phases


def test_a_run_killed_mid_phase_after_its_second_growth_resumes_exactly(small2, tmp_path, data_file):
    """A real kill (SIGKILL, not an exception) once the third phase has a checkpoint: the resumed run continues from
    that checkpoint of the twice-grown model and ends where an uninterrupted run ends."""
    import signal
    import subprocess
    import sys
    import time

    from hf_stack.training.run_folder import complete_checkpoints

    def cmd(out, *extra):
        return [sys.executable, "-m", "hf_stack.cli", "train", "--model", str(small2), "--data", str(data_file),
                "--block-size", "16", "--per-device-train-batch-size", "4", "--grow-schedule",
                "192:factor=2;384:factor=2,order=middle,learning_rate=2e-4", "--max-tokens", str(64 * 40),
                "--save-steps", "4", "--logging-steps", "4", "--disable-tqdm", "true", "--use-cpu", "true",
                "-o", str(out), *extra]  # fmt: skip

    r = subprocess.run(cmd(tmp_path / "a"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(cmd(tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not complete_checkpoints(tmp_path / "b") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "final").exists(), "the run finished before it could be killed"
    at_kill = complete_checkpoints(tmp_path / "b")  # phase 3's (the last phase keeps them in the run folder)
    assert at_kill and (tmp_path / "b" / "grown-init").is_dir(), "killed before phase 3 had a checkpoint"
    last = Path(at_kill[max(at_kill)]) / "trainer_state.json"
    written = last.stat().st_mtime_ns
    r = subprocess.run(cmd(tmp_path / "b", "--resume", "true"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    assert len(a) == len(b) and next(iter(b.values())).shape == next(iter(a.values())).shape
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la, lb = (json.loads((tmp_path / r / "training_log.json").read_text()) for r in "ab")
    assert [p["tokens"] for p in la["training"]["phases"]] == [p["tokens"] for p in lb["training"]["phases"]]
    assert la["training"]["total_flops"] == lb["training"]["total_flops"]
    # the resumed run continued after the kill's last checkpoint: a restart from grown-init would have rewritten it
    assert last.stat().st_mtime_ns == written


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        ([{"at_tokens": 600, "stacked_config": {"factor": 2}}, {"at_tokens": 300, "stacked_config": {}}], "out of order"),
        ([{"at_tokens": 64 * 20, "stacked_config": {"factor": 2}}], "beyond the budget"),
        ([{"at_tokens": 128, "stacked_config": {"factor": 2}}, {"at_tokens": 256, "stacked_config": {"layer_map": "0-5"}}],
         "growth 2 (at 256 tokens, from 4 layers): layer map names source layers [4, 5]"),
        ([{"at_tokens": 128, "stacked_config": {"factor": 2}, "lr": 1e-3}], "unknown keys lr"),
        ([{"at_tokens": 100, "stacked_config": {"factor": 2}}, {"at_tokens": 120, "stacked_config": {"factor": 2}}],
         "fall on the same step"),
        ("128:fator=2", "unknown setting 'fator' in 'fator=2'"),
        ([{"at_tokens": 128, "stacked_config": {"operator": "zero", "width_factor": 1.5}},
          {"at_tokens": 256, "stacked_config": {"operator": "zero", "width_factor": 1.5}}],
         "growth 2 (at 256 tokens, from 2 layers): width factor 1.5 gives 4.5 key/value heads from 3"),
        ("128;256:factor=2", "cannot read growth '128'"),
    ],
)  # fmt: skip
def test_bad_schedules_are_refused_before_anything_is_written(small2, tmp_path, data_file, schedule, match):
    with pytest.raises(HfStackError, match=__import__("re").escape(match)):
        make_trainer(small2, tmp_path / "r", data_file, growth_schedule=schedule, max_tokens=64 * 10,
                     stacked_config=None).train()  # fmt: skip
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_grow_at_tokens_is_the_one_entry_schedule():
    args = StackingTrainingArguments("x", grow_at_tokens=128, stacked_config=StackedConfig(factor=3), report_to=[])
    assert [(e["at_tokens"], e["stacked_config"]) for e in args.growths] == [(128, StackedConfig(factor=3))]
    with pytest.raises(HfStackError, match="not both"):
        StackingTrainingArguments("x", grow_at_tokens=128, growth_schedule=SCHEDULE, report_to=[])


def test_cli_grow_schedule(small2, tmp_path, data_file):
    r = hf_stack("train", "--model", small2, "--data", data_file, "--block-size", 16, "--per-device-train-batch-size",
                 4, "--grow-schedule", "192:factor=2;384:factor=2,order=middle,learning_rate=2e-4",
                 "--max-tokens", 640, "--disable-tqdm", "true", "--use-cpu", "true", "-o", tmp_path / "run")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "final" / "growth_config.json").read_text())
    assert [g["target_num_layers"] for g in record["growths"]] == [4, 8]
    r = hf_stack("train", "--model", small2, "--data", data_file, "--grow-schedule", "192:fator=2",
                 "--max-tokens", 640, "-o", tmp_path / "bad")  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: unknown setting 'fator'")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_schedule_settings_checked_and_read_as_given():
    base = dict(report_to=[], lr_scheduler_type="constant_with_warmup")
    args = StackingTrainingArguments("x", **base)
    args.grow_at_tokens = 128  # set after construction: the one growth follows it
    args.check_growth()
    assert [e["at_tokens"] for e in args.growths] == [128]
    with pytest.raises(HfStackError, match="unknown growth_schedule entry 1's lr_scheduler_type 'cosin'"):
        StackingTrainingArguments("x", growth_schedule="128:factor=2,lr_scheduler_type=cosin", **base)
    as_json = StackingTrainingArguments("x", growth_schedule=json.dumps(SCHEDULE), **base)
    assert [e["stacked_config"].order for e in as_json.growths] == ["stack", "middle"]
    # a phase's own schedule arguments are its own; another type than phase 1's starts without phase 1's
    args = StackingTrainingArguments("x", grown_lr_scheduler_type="cosine_with_min_lr", grown_lr_scheduler_kwargs={"min_lr_rate": 0.1},
                                     growth_schedule=[{"at_tokens": 64, "stacked_config": {}, "lr_scheduler_kwargs": {"min_lr": 1e-5}},
                                                      {"at_tokens": 128, "stacked_config": {}},
                                                      {"at_tokens": 192, "stacked_config": {}, "lr_scheduler_type": "linear"}],
                                     **base)  # fmt: skip
    assert [args.phase_settings(p)["lr_scheduler_kwargs"] for p in (2, 3, 4)] == [
        {"min_lr": 1e-5},
        {"min_lr_rate": 0.1},
        {},
    ]
    assert [args.phase_settings(p)["lr_scheduler_type"] for p in (1, 2, 4)] == [
        "constant_with_warmup",
        "cosine_with_min_lr",
        "linear",
    ]


def test_peft_with_several_growths_is_refused(small2, tmp_path, data_file):
    from peft import LoraConfig

    trainer = make_trainer(small2, tmp_path / "r", data_file, growth_schedule=SCHEDULE, max_tokens=64 * 10,
                           stacked_config=None)  # fmt: skip
    trainer.peft_config = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    with pytest.raises(HfStackError, match="give it one growth, not several"):
        trainer.train()


def test_cli_growth_flags_with_a_schedule_are_refused(small2, tmp_path, data_file):
    r = hf_stack("train", "--model", small2, "--data", data_file, "--grow-schedule=192:factor=2", "--operator", "zero",
                 "--max-tokens", 640, "-o", tmp_path / "bad")  # fmt: skip
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert (
        "with --grow-schedule give each growth's settings in the schedule" in r.stderr
        and not (tmp_path / "bad").exists()
    )
