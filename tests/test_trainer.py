"""Continued pre-training with in-run growth: the real Trainer on real packed data from tiny checkpoints."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from hf_stack import (
    HfStackError,
    StackedConfig,
    StackingTrainer,
    StackingTrainingArguments,
    build_dataset,
    when_to_grow,
)
from hf_stack.analysis.compare import Curve, speedup
from hf_stack.data import fingerprint, iter_documents, pack, tokenize_documents
from tests.conftest import CORPUS, accounting, build_checkpoint, distributed_env


def make_trainer(small, out, data_file, cls=StackingTrainer, callbacks=None, **kw):
    tok = AutoTokenizer.from_pretrained(small)
    train, _ = build_dataset([str(data_file)], tok, 16, seed=0)
    settings = dict(per_device_train_batch_size=4, learning_rate=1e-3, grown_learning_rate=5e-4, warmup_steps=2,
                    logging_steps=2, save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    data_seed=0, stacked_config=StackedConfig(factor=2))  # fmt: skip
    settings.update(kw)
    args = StackingTrainingArguments(str(out), **settings)
    model = AutoModelForCausalLM.from_pretrained(small)
    return cls(model=model, args=args, train_dataset=train, processing_class=tok, callbacks=callbacks)


# ---------------------------------------------------------------- growth timing


@pytest.mark.parametrize(
    "params, tokens, d", [(8e9, 15e12, 6.58e9), (7e9, 2e12, 11.11e9), (13e9, 2e12, 15.84e9), (70e9, 2e12, 42.48e9)]
)
def test_when_to_grow_reproduces_the_papers_table(params, tokens, d):
    timing = when_to_grow(params, tokens)
    assert timing.d == pytest.approx(d, rel=0.005)
    assert timing.growth_factor == 4 and timing.compute == 6 * params * tokens
    assert 0 < timing.flops_saved < timing.compute


@pytest.mark.parametrize(
    ("args", "match"),
    [((-1, 1e9), "target_params must be a positive number, got -1"), ((7e9, 0), "tokens must be a positive number"),
     ((7e9, float("nan")), "got nan"), ((7e9, 1e12, 1), "growth factor must be a whole number >= 2, got 1"),
     ((1, 1), "too small for the formula")],
)  # fmt: skip
def test_when_to_grow_refuses_absurd_numbers(args, match):
    with pytest.raises(HfStackError, match=re.escape(match)):
        when_to_grow(*args)


@pytest.mark.parametrize("command", ["when", "plan"])  # "plan" is the command's first name, kept working
def test_when_cli(command):
    r = subprocess.run([sys.executable, "-m", "hf_stack.cli", command, "--params", "7e9", "--tokens", "300e9"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and "d = 20.5B tokens" in r.stdout


# ---------------------------------------------------------------- data


def test_packing_is_deterministic_with_separators_and_no_padding(llama_small, tmp_path):
    tok = AutoTokenizer.from_pretrained(llama_small)
    tokens = tokenize_documents(["one two", "three"], tok)
    assert (tokens == tok.eos_token_id).sum() == 2 and tokens[-1] == tok.eos_token_id
    stream = np.arange(100)
    a, b, c = pack(stream, 10, seed=1), pack(stream, 10, seed=1), pack(stream, 10, seed=2)
    assert torch.equal(a[:]["input_ids"], b[:]["input_ids"]) and not torch.equal(a[:]["input_ids"], c[:]["input_ids"])
    assert torch.equal(a[:]["input_ids"], a[:]["labels"]) and a[:]["input_ids"].shape == (10, 10)
    assert sorted(a[:]["input_ids"].flatten().tolist()) == list(range(100))  # every token once, nothing padded


def test_data_sources_and_validation_blocks(llama_small, tmp_path, data_file):
    tok = AutoTokenizer.from_pretrained(llama_small)
    (tmp_path / "a.txt").write_text(CORPUS[0])
    import pandas as pd

    pd.DataFrame({"text": CORPUS[:3]}).to_parquet(tmp_path / "b.parquet")
    for src in ([str(tmp_path / "*.txt")], [str(tmp_path / "b.parquet")], [str(data_file)]):
        train, _ = build_dataset(src, tok, 8)
        assert len(train) > 0 and train[:]["input_ids"].shape[1] == 8
    train, val = build_dataset([str(data_file)], tok, 8, validation_fraction=0.2, validation_tokens=60)
    stream = tokenize_documents(iter_documents([str(data_file)]), tok)
    blocks = stream[: len(stream) // 8 * 8].reshape(-1, 8).tolist()
    # validation: every 5th block of the stream from its start, 60 tokens rounded up to 8 blocks; training: the
    # other blocks (shuffled), never the same tokens
    assert val[:]["input_ids"].tolist() == blocks[4:40:5]
    held = set(range(4, 40, 5))
    expected = sorted(tuple(b) for i, b in enumerate(blocks) if i not in held)
    assert sorted(map(tuple, train[:]["input_ids"].tolist())) == expected
    # --text-column: the same documents under another column name give the same stream
    body = tmp_path / "body.jsonl"
    body.write_text("".join(json.dumps({"body": json.loads(line)["text"], "text": ""}) + "\n"
                            for line in data_file.read_text().splitlines()))  # fmt: skip
    same, _ = build_dataset([str(body)], tok, 8, text_column="body")
    assert sorted(map(tuple, same[:]["input_ids"].tolist())) == sorted(tuple(b) for b in blocks)
    with pytest.raises(HfStackError, match="has no 'content' column"):
        build_dataset([str(body)], tok, 8, text_column="content")
    _, everything = build_dataset([str(data_file)], tok, 8, validation_fraction=0.2, validation_tokens=10**9)
    assert everything[:]["input_ids"].tolist() == blocks[4::5]  # a set larger than the data: every 5th block
    for f in (0.3, 0.45):  # a share, not a rounded stride: 3 blocks in 10, 9 in 20
        _, share = build_dataset([str(data_file)], tok, 8, validation_fraction=f, validation_tokens=10**9)
        assert abs(len(share) - f * len(blocks)) <= 1, (f, len(share), len(blocks))


def test_a_budget_stops_reading_the_documents(llama_small):
    """A streamed source (a Hub dataset is read as a generator of documents) is pulled only until the budget is
    tokenised: an endless stream ends, and a long document is cut without a separator after it."""
    import itertools

    tok = AutoTokenizer.from_pretrained(llama_small)
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield CORPUS[i % len(CORPUS)]

    tokens = tokenize_documents(endless(), tok, max_tokens=1000)
    assert 1000 <= len(tokens) < 1000 + 200 and len(pulled) <= 11  # about 100 tokens a document
    whole = tokenize_documents([CORPUS[0] * 2000], tok)
    cut = tokenize_documents([CORPUS[0] * 2000], tok, max_tokens=10)
    assert len(cut) < len(whole) and cut.tolist() == whole[: len(cut)].tolist()  # a prefix: no separator added


def test_validation_and_block_order_do_not_depend_on_the_budget(llama_small, data_file, monkeypatch):
    """Runs of different --max-tokens validate on the same blocks, and the shorter run trains on the longer run's
    first blocks (a window of 64 tokens here, so the small budgets read only part of the data)."""
    import hf_stack.data

    monkeypatch.setattr(hf_stack.data, "SHUFFLE_WINDOW_TOKENS", 64)
    tok = AutoTokenizer.from_pretrained(llama_small)
    stream = tokenize_documents(iter_documents([str(data_file)]), tok)
    runs = {budget: build_dataset([str(data_file)], tok, 8, seed=3, max_tokens=budget, validation_fraction=0.1,
                                  validation_tokens=48) for budget in (100, 1500, None)}  # fmt: skip
    full_train, full_val = runs[None]
    assert len(runs[100][0]) < len(runs[1500][0]) < len(full_train) == len(stream) // 8 - 6  # budgets read less
    for budget in (100, 1500):
        train, val = runs[budget]
        assert val[:]["input_ids"].tolist() == full_val[:]["input_ids"].tolist()
        assert len(train) * 8 >= budget
        assert train[:]["input_ids"].tolist() == full_train[: len(train)]["input_ids"].tolist()
    assert fingerprint(runs[100][1]) == fingerprint(full_val) != fingerprint(full_train)


@pytest.mark.parametrize(
    "content, match",
    [(b"\xff\xfe\x00bad", "not UTF-8"), (b"", "tokenises to nothing"), (b"   \n", "tokenises to nothing")],
)
def test_bad_data_is_refused(llama_small, tmp_path, content, match):
    tok = AutoTokenizer.from_pretrained(llama_small)
    (tmp_path / "x.txt").write_bytes(content)
    with pytest.raises(HfStackError, match=match):
        build_dataset([str(tmp_path / "x.txt")], tok, 8)
    with pytest.raises(HfStackError, match="does not exist"):
        build_dataset([str(tmp_path / "missing.txt")], tok, 8)


# ---------------------------------------------------------------- growth in the run


@pytest.mark.parametrize("grow_at", [None, 1000])
def test_tokens_logged_are_tokens_trained_when_the_data_runs_out(llama_small, tmp_path, data_file, grow_at):
    """Batch 4 x accumulation 3 over a block count that is not a multiple of 12, to 1.7 passes over the data:
    every block fed to the model is counted (Trainer gives a pass's last step only the blocks left), and the
    repetition is warned about and recorded in the log and the card."""
    from transformers import default_data_collator

    fed = []

    def counting(features):
        fed.append(len(features))
        return default_data_collator(features)

    tok = AutoTokenizer.from_pretrained(llama_small)
    train, _ = build_dataset([str(data_file)], tok, 16, seed=0)
    assert len(train) % 12
    budget = int(1.7 * len(train) * 16)
    args = StackingTrainingArguments(
        str(tmp_path / "run"), per_device_train_batch_size=4, gradient_accumulation_steps=3, max_tokens=budget,
        grow_at_tokens=grow_at, stacked_config=StackedConfig(factor=2), learning_rate=1e-3, logging_steps=5,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(llama_small)
    trainer = StackingTrainer(
        model=model, args=args, train_dataset=train, processing_class=tok, data_collator=counting
    )
    with pytest.warns(UserWarning, match=r"runs out at step \d+ \(phase \d\): the run trains on it 1\.\d+ times"):
        trainer.train()
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    training = log["training"]
    assert sum(fed) * 16 == training["total_tokens"] == budget // (12 * 16) * 12 * 16
    assert training["data_epochs"] == round(training["total_tokens"] / (len(train) * 16), 4) > 1.6
    logged = [e for e in log["log_history"] if "loss" in e]
    assert logged and all(e["data_epoch"] == round(e["tokens"] / (len(train) * 16), 4) for e in logged)
    assert all(e["tokens_per_second"] > 0 for e in logged[1:])  # throughput since the last log entry
    assert f"trained on it {training['data_epochs']:.2f} times" in (tmp_path / "run/final/README.md").read_text()
    from hf_stack.analysis.compare import compare

    notes = compare(tmp_path / "run", tmp_path / "run", tmp_path / "c.png")["notes"]
    assert f"run trained on its data {training['data_epochs']:.2f} times (data_epochs in its log)" in notes


class RecordBatches(StackingTrainer):
    """Records the first block of every batch the model trains on, and the phase it was in."""

    def compute_loss(self, model, inputs, *a, **kw):
        self.seen = getattr(self, "seen", [])
        self.seen.append((self.phase, inputs["input_ids"][0].tolist()))
        return super().compute_loss(model, inputs, *a, **kw)


def test_growth_in_the_middle_of_a_run(small2, tmp_path, data_file):
    out = tmp_path / "run"
    trainer = make_trainer(small2, out, data_file, cls=RecordBatches, grow_at_tokens=64 * 6, max_tokens=64 * 16)
    dataset = trainer.train_dataset
    trainer.train()
    # 6 steps of 4 blocks of 16 tokens on the small model, then 10 on the grown one
    assert [p for p, _ in trainer.seen] == [1] * 6 + [2] * 10
    # the grown model continues on the blocks that follow: block 24 first, nothing replayed
    rows = dataset[:]["input_ids"].tolist()
    assert [b for _, b in trainer.seen] == [rows[4 * i] for i in range(16)]

    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert final.config.num_hidden_layers == 4 and type(final).__name__ == "LlamaForCausalLM"
    assert (out / "small" / "checkpoint-6").is_dir() and (out / "grown-init" / "growth_config.json").is_file()
    grown_init = AutoModelForCausalLM.from_pretrained(out / "grown-init")
    small_last = AutoModelForCausalLM.from_pretrained(out / "small" / "checkpoint-6")
    for i in range(4):  # the grown model started as the stack of the small model at the growth step
        assert torch.equal(
            grown_init.model.layers[i].mlp.up_proj.weight, small_last.model.layers[i % 2].mlp.up_proj.weight
        )

    record = json.loads((out / "final" / "growth_config.json").read_text())
    phases = record["training"]["phases"]
    assert [p["tokens"] for p in phases] == [384, 640] and record["layer_map"] == [0, 1, 0, 1]
    assert phases[1]["flops"] == 6 * phases[1]["num_parameters"] * 640
    assert phases[1]["num_parameters"] > phases[0]["num_parameters"]
    # accounting is in trainer_state.json of the checkpoints on both sides of the boundary
    state = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())
    entry = [e for e in state["log_history"] if e.get("step") == 8][0]
    assert entry["tokens"] == 384 + 8 * 64 and entry["phase"] == 2
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    # fresh AdamW and a re-warmed schedule: the LR climbs again after growth, up to the grown peak
    lrs2 = [e["learning_rate"] for e in log if e["phase"] == 2 and "learning_rate" in e]
    assert max(lrs2) <= 5e-4 + 1e-12 and lrs2[0] < lrs2[1]
    tokens = [e["tokens"] for e in log if "loss" in e]
    assert tokens == sorted(tokens) and tokens[-1] == 1024


class Crash(TrainerCallback):
    def __init__(self, at_phase2_step):
        self.at = at_phase2_step

    def on_step_end(self, args, state, control, model=None, **kw):
        if model.config.num_hidden_layers == 4 and state.global_step == self.at:
            raise RuntimeError("simulated crash")


def test_resume_after_growth_matches_an_uninterrupted_run(small2, tmp_path, data_file):
    settings = dict(grow_at_tokens=64 * 6, max_tokens=64 * 14)
    make_trainer(small2, tmp_path / "a", data_file, **settings).train()
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(small2, tmp_path / "b", data_file, callbacks=[Crash(6)], **settings).train()
    assert (tmp_path / "b" / "checkpoint-4").is_dir() and not (tmp_path / "b" / "final").exists()
    make_trainer(small2, tmp_path / "b", data_file, **settings).train(resume_from_checkpoint=True)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    la = json.loads((tmp_path / "a" / "training_log.json").read_text())["training"]
    lb = json.loads((tmp_path / "b" / "training_log.json").read_text())["training"]
    assert accounting(la) == accounting(lb)
    # the resumed phase continues its training seconds from the checkpoint instead of restarting at zero
    seconds = [
        e["train_seconds"] for e in json.loads((tmp_path / "b" / "training_log.json").read_text())["log_history"]
    ]
    assert seconds == sorted(seconds)


def test_resume_refuses_another_runs_folder(small2, tmp_path, data_file):
    make_trainer(small2, tmp_path / "a", data_file, grow_at_tokens=64 * 2, max_tokens=64 * 4).train()
    with pytest.raises(HfStackError, match="belongs to another run"):
        make_trainer(small2, tmp_path / "a", data_file, grow_at_tokens=64 * 3, max_tokens=64 * 4).train(True)
    with pytest.raises(HfStackError, match="already holds a training run"):
        make_trainer(small2, tmp_path / "a", data_file, grow_at_tokens=64 * 2, max_tokens=64 * 4).train()
    with pytest.raises(HfStackError, match="nothing to resume"):
        make_trainer(small2, tmp_path / "new", data_file, max_tokens=64 * 4).train(True)


class CheckMoments(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        if model.config.num_hidden_layers != 4:
            return
        params = dict(model.named_parameters())
        for i in (2, 3):
            new = optimizer.state[params[f"model.layers.{i}.self_attn.q_proj.weight"]]
            old = optimizer.state[params[f"model.layers.{i - 2}.self_attn.q_proj.weight"]]
            assert torch.equal(new["exp_avg"], old["exp_avg"]) and new["exp_avg"].abs().sum() > 0
        self.checked = True


def test_adam_moments_can_be_carried_over_the_growth(small2, tmp_path, data_file):
    check = CheckMoments()
    make_trainer(small2, tmp_path / "r", data_file, callbacks=[check], grow_at_tokens=128, max_tokens=256,
                 carry_optimizer_state=True).train()  # fmt: skip
    assert getattr(check, "checked", False)


class CheckFusedExperts(TrainerCallback):
    """At the grown phase's start: the fused 3-D experts of transformers 5 carry their source layer's moments."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        if model.config.num_hidden_layers != 4:
            return
        params = dict(model.named_parameters())
        for name in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            new, old = (optimizer.state[params[f"model.layers.{i}.{name}"]] for i in (2, 0))
            zeroed = name.endswith("down_proj")  # zero growth: a repeated layer's residual writes start at 0
            assert torch.equal(new["exp_avg"], torch.zeros_like(old["exp_avg"]) if zeroed else old["exp_avg"])
            assert old["exp_avg"].abs().sum() > 0
        self.checked = True


def test_a_mixture_of_experts_grows_in_the_run_with_its_moments(tmp_path, data_file):
    """In-run growth of Mixtral, whose experts transformers 5 holds fused in memory: zero growth keeps the small
    model's logits, and carry_optimizer_state moves the fused experts' moments."""
    from transformers import CONFIG_MAPPING

    from tests.conftest import build_tokenizer

    tok = build_tokenizer(tmp_path / "s")
    config = CONFIG_MAPPING["mixtral"](vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                       num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "s")
    check, out = CheckFusedExperts(), tmp_path / "r"
    make_trainer(tmp_path / "s", out, data_file, callbacks=[check], grow_at_tokens=128, max_tokens=256,
                 carry_optimizer_state=True, stacked_config=StackedConfig(operator="zero", factor=2)).train()  # fmt: skip
    assert getattr(check, "checked", False)
    small = AutoModelForCausalLM.from_pretrained(out / "small" / "checkpoint-2").eval()
    grown = AutoModelForCausalLM.from_pretrained(out / "grown-init").eval()
    ids = torch.tensor([[1, 5, 17, 42, 9, 77]])
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, small(ids).logits, atol=1e-5, rtol=0)


def test_carried_moments_take_the_grown_learning_rate_and_survive_a_resume(small2, tmp_path, data_file):
    settings = dict(grow_at_tokens=128, max_tokens=64 * 8, carry_optimizer_state=True, grown_learning_rate=2e-4,
                    logging_steps=1, save_steps=100)  # fmt: skip
    make_trainer(small2, tmp_path / "a", data_file, **settings).train()
    log = json.loads((tmp_path / "a" / "training_log.json").read_text())["log_history"]
    lrs2 = [e["learning_rate"] for e in log if e["phase"] == 2 and "learning_rate" in e]
    assert max(lrs2) == pytest.approx(2e-4)  # re-warmed to the grown peak, not to phase 1's 1e-3
    # killed after growth and before phase 2's first checkpoint: the resume starts from the carried moments
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(small2, tmp_path / "b", data_file, callbacks=[Crash(1)], **settings).train()
    assert not list((tmp_path / "b").glob("checkpoint-*")) and (tmp_path / "b" / "grown-init").is_dir()
    make_trainer(small2, tmp_path / "b", data_file, **settings).train(resume_from_checkpoint=True)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_width_growth_in_the_run_starts_from_the_small_models_function(small2, tmp_path, data_file):
    out = tmp_path / "r"
    make_trainer(small2, out, data_file, grow_at_tokens=128, max_tokens=256,
                 stacked_config=StackedConfig(operator="zero", factor=2, width_factor=2)).train()  # fmt: skip
    small = AutoModelForCausalLM.from_pretrained(out / "small" / "checkpoint-2")
    grown = AutoModelForCausalLM.from_pretrained(out / "grown-init")
    assert grown.config.hidden_size == 64 and grown.config.num_hidden_layers == 4
    ids = torch.tensor([[1, 5, 17, 42, 9, 77]])
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, small(ids).logits, atol=5e-5, rtol=0)
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.hidden_size == 64


def test_learned_growth_in_the_run(small2, tmp_path, data_file):
    out = tmp_path / "r"
    stacked = StackedConfig(operator="learn", factor=2, learn_data=str(data_file), learn_steps=3,
                            learn_batch_size=2, learn_block_size=16)  # fmt: skip
    make_trainer(small2, out, data_file, grow_at_tokens=128, max_tokens=256, stacked_config=stacked).train()
    record = json.loads((out / "grown-init" / "growth_config.json").read_text())
    assert record["operator"] == "learn" and record["learn"]["steps"] == 3
    grown = AutoModelForCausalLM.from_pretrained(out / "final")
    assert grown.config.num_hidden_layers == 4 and not grown.config.tie_word_embeddings
    # the maps' training is compute of the run: 3 steps x 2 blocks x 16 tokens through the grown model, 6N a token
    n_grown = sum(p.numel() for p in grown.parameters())
    assert record["learn"]["flops"] == 6 * n_grown * 3 * 2 * 16
    training = json.loads((out / "training_log.json").read_text())["training"]
    phases = training["phases"]
    assert training["total_flops"] == phases[0]["flops"] + record["learn"]["flops"] + phases[1]["flops"]
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    first_grown = next(e for e in log if e.get("phase") == 2)
    assert first_grown["flops"] > phases[0]["flops"] + record["learn"]["flops"]


def test_msg_masks_ramp_in_random_growth(small2, tmp_path, data_file):
    out = tmp_path / "r"
    trainer = make_trainer(small2, out, data_file, grow_at_tokens=128, max_tokens=64 * 10, mask_steps=4,
                           logging_steps=1, stacked_config=StackedConfig(operator="random", factor=2, width_factor=2))  # fmt: skip
    trainer.train()
    log = json.loads((out / "training_log.json").read_text())["log_history"]
    masks = [e["growth_mask"] for e in log if e.get("phase") == 2 and "loss" in e]
    assert masks == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]  # logged after each step: the mask that step used
    assert trainer.mask_ramp.masks is None  # removed once fully in: the saved model is the plain one
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.hidden_size == 64


@pytest.mark.parametrize("model_type", ["gemma2", "phi3", "mixtral"])
def test_msg_width_masks_beyond_a_llama_layer_are_refused_before_training(tmp_path, data_file, model_type):
    """MSG's width masks hook a dense Llama-style layer's modules: Gemma 2's sandwich norms would go unmasked
    (a wrong function at m = 0, silently), Phi-3's fused projections and Mixtral's experts have no such modules (a
    crash at growth, after the first phase). Refused when training starts, before anything is written."""
    from tests.families import build_family

    folder = tmp_path / "small"
    build_family(model_type, folder)
    settings = StackedConfig(operator="random", width_factor=2)
    trainer = make_trainer(folder, tmp_path / "r", data_file, grow_at_tokens=128, max_tokens=64 * 4, mask_steps=2,
                           stacked_config=settings)  # fmt: skip
    with pytest.raises(
        HfStackError, match=f"MSG's width masks hook a dense Llama-style layer's modules; '{model_type}'"
    ):
        trainer.train()
    assert not (tmp_path / "r").exists()


def test_lora_on_a_grown_model(small2, tmp_path, data_file):
    from peft import LoraConfig

    from hf_stack import grow

    grow(small2, tmp_path / "grown", StackedConfig(factor=2))
    before = AutoModelForCausalLM.from_pretrained(tmp_path / "grown").state_dict()
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[2, 3], task_type="CAUSAL_LM")
    trainer = make_trainer(tmp_path / "grown", tmp_path / "r", data_file, max_tokens=256)
    trainer = StackingTrainer(model=AutoModelForCausalLM.from_pretrained(tmp_path / "grown"), args=trainer.args,
                              train_dataset=trainer.train_dataset, peft_config=lora)  # fmt: skip
    trainer.train()
    n = sum(p.numel() for p in trainer.model.parameters())
    n_trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trained = [name for name, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and (".layers.2." in n or ".layers.3." in n) for n in trained)
    merged = trainer.model.merge_and_unload().state_dict()
    assert torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], before["model.layers.0.self_attn.q_proj.weight"]
    )
    assert not torch.equal(
        merged["model.layers.2.self_attn.q_proj.weight"], before["model.layers.2.self_attn.q_proj.weight"]
    )
    assert (tmp_path / "r" / "final" / "adapter_config.json").is_file()
    # frozen weights are run forward and backward but get no weight gradient: 4N + 2 N_trained FLOPs a token
    (phase,) = json.loads((tmp_path / "r" / "training_log.json").read_text())["training"]["phases"]
    assert phase["num_trained_parameters"] == n_trained < n // 10
    assert phase["flops"] == 4 * n * 256 + 2 * n_trained * 256


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(grow_at_tokens=1000, max_tokens=500), "beyond the budget"),
        (dict(grow_at_tokens=-5), "positive number"),
        (dict(max_tokens=64 * 4, grow_at_tokens=64 * 4 - 10), "not before the end"),
        (dict(grow_at_tokens=64 * 10**4, max_tokens=64 * 10**5), "fewer than the last growth point"),
        (dict(), "set max_tokens"),
        (
            dict(
                grow_at_tokens=64 * 2,
                max_tokens=64 * 4,
                mask_steps=2,  # the boundary: the masks would never reach 1
                stacked_config=StackedConfig(operator="random", factor=2),
            ),
            "fewer than the 2 steps",
        ),  # fmt: skip
    ],
)
def test_bad_training_settings_fail_before_training(small2, tmp_path, data_file, settings, match):
    with pytest.raises(HfStackError, match=match):
        make_trainer(small2, tmp_path / "r", data_file, **settings).train()
    # refused before anything was written (transformers' Trainer itself may create the empty output folder)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_block_size_beyond_context_is_refused(tmp_path, data_file):
    build_checkpoint(tmp_path / "s", "llama", num_layers=1, max_position_embeddings=8)
    with pytest.raises(HfStackError, match="larger than the model's context"):
        make_trainer(tmp_path / "s", tmp_path / "r", data_file, max_tokens=256).train()


# ---------------------------------------------------------------- the command line, compare, multi-process


def hf_stack(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "hf_stack.cli", *map(str, args)], capture_output=True, text=True, **kw
    )


def test_train_and_compare_commands(small2, tmp_path, data_file):
    common = ["--data", data_file, "--block-size", 16, "--per-device-train-batch-size", 4, "--max-tokens", 64 * 12,
              "--logging-steps", 2, "--validation-fraction", 0.2, "--disable-tqdm", "true", "--use-cpu", "true"]  # fmt: skip
    r = hf_stack(
        "train", "--model", small2, "--grow-at-tokens", 64 * 4, "--factor", 2, "-o", tmp_path / "run", *common
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final model:" in r.stdout
    r = hf_stack("train", "--from-scratch-like", tmp_path / "run" / "final", "-o", tmp_path / "base", *common)
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((tmp_path / "base" / "training_log.json").read_text())["log_history"]
    assert any("eval_loss" in e for e in log)
    r = hf_stack("compare", tmp_path / "run", tmp_path / "base", "-o", tmp_path / "cmp.png")
    assert r.returncode == 0, r.stderr
    assert "speed-up" in r.stdout and (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    # a longer scratch run validates on the same text (its fingerprint is the same); one with another validation
    # set is refused
    fingerprints = []
    for name, extra in (("longer", ["--max-tokens", 64 * 30]), ("other", ["--validation-fraction", 0.25])):
        r = hf_stack(
            "train", "--from-scratch-like", tmp_path / "run" / "final", "-o", tmp_path / name, *common, *extra
        )
        assert r.returncode == 0, r.stderr[-3000:]
        fingerprints.append(json.loads((tmp_path / name / "training_log.json").read_text())["validation"])
    base = json.loads((tmp_path / "base" / "training_log.json").read_text())["validation"]
    assert fingerprints[0] == base != fingerprints[1]
    r = hf_stack("compare", tmp_path / "run", tmp_path / "base", tmp_path / "longer")
    assert r.returncode == 0 and "speed-up" in r.stdout, r.stderr
    r = hf_stack("compare", tmp_path / "run", tmp_path / "base", tmp_path / "other")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: ") and "validated on different text" in r.stderr
    # a bad input: one line, exit 2, nothing trained
    (tmp_path / "empty.txt").write_text("")
    r = hf_stack(
        "train", "--model", small2, "--data", tmp_path / "empty.txt", "--max-tokens", 100, "-o", tmp_path / "x"
    )
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert not (tmp_path / "x").exists()
    r = hf_stack("train", "--data", data_file, "-o", tmp_path / "y")
    assert r.returncode == 2 and "exactly one of --model" in r.stderr


def test_speedup_arithmetic():
    grown = Curve("g", [1, 2, 3], [1, 2, 3], [3.0, 2.0, 1.5], "loss", 1)
    scratch = Curve("s", [1, 2, 4, 6], [1, 2, 4, 6], [3.0, 2.5, 2.0, 1.0], "loss", None)
    r = speedup(grown, scratch)
    assert r["scratch_flops_to_match"] == pytest.approx(5.0) and r["speedup"] == pytest.approx(5 / 3 - 1)
    never = Curve("s", [1, 2], [1, 2], [3.0, 2.9], "loss", None)
    assert speedup(grown, never)["lower_bound"] is True


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_processes_grow_together(small2, tmp_path, data_file, launcher):
    """DDP with 2 CPU processes, started as the README's many-GPU lines read (`torchrun`, or `accelerate launch
    --multi_gpu` as on a GPU machine: accelerate's `--cpu` starts one process unless MPI is set up; no --use-cpu /
    --ddp-backend: on a machine without GPUs the arguments choose gloo): the same run, growth included, twice the
    tokens per step."""
    import socket

    env = distributed_env()
    if launcher == "torchrun":  # --standalone: a rendezvous on a free local port (a fixed one collides)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        with socket.socket() as s:  # a free port for the main process
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = [Path(sys.executable).with_name("accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", port]  # fmt: skip
    cmd = [*launch, "-m", "hf_stack.cli", "train", "--model", small2, "--data", data_file, "--block-size", 16,
           "--per-device-train-batch-size", 2, "--grow-at-tokens", 64 * 3, "--max-tokens", 64 * 8, "--factor", 2,
           "--logging-steps", 1, "--disable-tqdm", "true", "-o", tmp_path / "ddp"]  # fmt: skip
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    record = json.loads((tmp_path / "ddp" / "final" / "growth_config.json").read_text())
    assert [p["tokens"] for p in record["training"]["phases"]] == [192, 320]
    assert [p["steps"] for p in record["training"]["phases"]] == [3, 5]  # 2 processes x 2 blocks x 16 tokens a step
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "final").config.num_hidden_layers == 4
    log = json.loads((tmp_path / "ddp" / "training_log.json").read_text())
    assert log["training"]["total_tokens"] == 512
    assert log["parallelism"] == {"strategy": "ddp", "world_size": 2}  # what the run really ran with


def test_a_sharding_request_is_honoured_or_refused(small2, tmp_path, data_file):
    """`--fsdp` on a machine without GPUs would be dropped by accelerate (full replicas under DDP, nothing said):
    refused with one error line before anything is written, as is a DeepSpeed run without DeepSpeed installed (a
    traceback from transformers' argument checks before), and what in-run growth cannot do under --fsdp, before any
    weight loads; an ordinary run records that it ran in one process."""
    common = ["train", "--model", small2, "--data", data_file, "--block-size", 16, "--max-tokens", 512]
    fsdp = ["--fsdp", "full_shard auto_wrap", "--use-cpu", "true", "--grow-at-tokens", 128, "--factor", 2]
    for extra, message in (
        (fsdp[:4], "error: --fsdp shards the model over several processes and this run has one"),
        (["--deepspeed", '{"zero_optimization": {"stage": 2}}'], "error: invalid training arguments: "),
        ([*fsdp, "--fsdp_config", '{"version": 1}'], "error: growth inside an FSDP1 run is not supported: use FSDP2"),
        ([*fsdp, "--carry-optimizer-state", "true"], "error: --carry-optimizer-state is not supported under --fsdp"),
        (
            [*fsdp, "--operator", "learn", "--learn-data", data_file],
            "error: 'learn' growth trains the grown tensors on one process",
        ),
        (
            [*fsdp, "--mask-steps", 4, "--operator", "random"],
            "error: --mask-steps (MSG's masks) is not supported under --fsdp",
        ),
    ):
        r = hf_stack(*common, *extra, "-o", tmp_path / "x")
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and last.startswith(message) and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not (tmp_path / "x").exists()
    r = hf_stack(*common, "--use-cpu", "true", "--disable-tqdm", "true", "-o", tmp_path / "one")
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((tmp_path / "one" / "training_log.json").read_text())
    assert log["parallelism"] == {"strategy": "single process", "world_size": 1}
    from hf_stack.training.trainer import check_strategy

    args = StackingTrainingArguments(str(tmp_path / "p"), fsdp="full_shard auto_wrap", use_cpu=True, report_to=[],
                                     grow_at_tokens=128, max_tokens=512, stacked_config=StackedConfig(factor=2))  # fmt: skip
    with pytest.raises(HfStackError, match="peft_config with growth is not supported under --fsdp"):
        check_strategy(args, peft=True)


def test_resume_point_names_what_a_resume_continues_from(tmp_path):
    from hf_stack.training.run_folder import resume_point, write_growth_state

    def complete(folder):
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": int(folder.name.split("-")[1])}))

    assert resume_point(tmp_path, 1) == "the beginning (no checkpoint is complete yet)"
    complete(tmp_path / "small" / "checkpoint-4")
    (tmp_path / "small" / "checkpoint-8").mkdir()  # partial: never resumed from
    (tmp_path / "small" / "checkpoint-6").mkdir()  # its state cut by a kill mid-write: never resumed from either
    (tmp_path / "small" / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6, "log_hist')
    assert resume_point(tmp_path, 1) == str(tmp_path / "small" / "checkpoint-4")
    write_growth_state(tmp_path, [{}], [{}])
    assert (
        resume_point(tmp_path, 1)
        == f"the grown model in {tmp_path / 'grown-init'} (grown from {tmp_path / 'small' / 'checkpoint-4'})"
    )
    complete(tmp_path / "checkpoint-2")
    assert resume_point(tmp_path, 1) == str(tmp_path / "checkpoint-2")
    # two growths: after the first, phase 2 keeps its checkpoints in phase-2/ and grew into grown-init-1/
    assert (
        resume_point(tmp_path, 2)
        == f"the grown model in {tmp_path / 'grown-init-1'} (grown from {tmp_path / 'small' / 'checkpoint-4'})"
    )
    complete(tmp_path / "phase-2" / "checkpoint-3")
    assert resume_point(tmp_path, 2) == str(tmp_path / "phase-2" / "checkpoint-3")


def test_a_short_cli_run_logs_about_fifty_points_per_phase_by_default(small2, tmp_path, data_file):
    # transformers' default logs every 500 steps: a 150-step run would log no loss at all
    r = hf_stack("train", "--model", small2, "--data", data_file, "--block-size", 16,
                 "--per-device-train-batch-size", 4, "--grow-at-tokens", 64 * 50, "--max-tokens", 64 * 150,
                 "--factor", 2, "--disable-tqdm", "true", "--use-cpu", "true", "-o", tmp_path / "run")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())["log_history"]
    for phase in (1, 2):
        points = [e for e in log if e.get("phase") == phase and "loss" in e]
        assert 45 <= len(points) <= 51, (phase, len(points))
    assert "default 0.02" in hf_stack("train", "--help").stdout


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_the_architectures_formula(tmp_path, tied):
    from hf_stack.training.accounting import count_parameters

    from .conftest import build_checkpoint

    model = build_checkpoint(tmp_path / "m", "llama", num_layers=3, tie_word_embeddings=tied)
    c = model.config
    V, H, F, L, kv = c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads
    kv_dim = kv * (H // c.num_attention_heads)
    layer = 2 * H * H + 2 * H * kv_dim + 3 * H * F + 2 * H  # q, o; k, v; gate, up, down; two norms
    blocks = L * layer + H  # and the final norm
    assert count_parameters(model) == blocks + V * H * (1 if tied else 2)
    assert count_parameters(model, embeddings=False) == blocks


def test_cli_growth_flags_are_checked_as_given(small2, tmp_path, data_file):
    # the growth flags reach the arguments before they are checked: MSG masks with --operator random run
    r = hf_stack("train", "--model", small2, "--data", data_file, "--block-size", 16, "--per-device-train-batch-size",
                 4, "--grow-at-tokens", 128, "--max-tokens", 640, "--operator", "random", "--factor", 2,
                 "--mask-steps", 2, "--logging-steps", 1, "--disable-tqdm", "true", "--use-cpu", "true",
                 "-o", tmp_path / "msg")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    log = json.loads((tmp_path / "msg" / "training_log.json").read_text())["log_history"]
    assert [e["growth_mask"] for e in log if e.get("phase") == 2 and "loss" in e][:3] == [0.0, 0.5, 1.0]
