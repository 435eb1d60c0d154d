"""Scoring parity with lm-eval's own HFLM, task data handling, and scores during training."""

import json
import subprocess
import sys

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_stack import HfStackError
from hf_stack.evaluation.benchmarks import SAMPLES_DIR, TASKS
from hf_stack.evaluation.harness import _task_manager, _task_specs, evaluate_model, make_lm
from tests.conftest import build_checkpoint


@pytest.fixture(scope="module")
def scorer_model(tmp_path_factory):
    # A short context (64 positions) so long prompts exercise HFLM's left truncation too.
    folder = tmp_path_factory.mktemp("scorer") / "m"
    build_checkpoint(folder, "qwen2", num_layers=2, max_position_embeddings=64)
    return folder


def _instances(tasks):
    manager, folder = _task_manager()
    (folder / "hf_stack_run.yaml").write_text(
        yaml.safe_dump({"group": "hf_stack_run", "task": _task_specs(tasks, SAMPLES_DIR)})
    )
    loaded = manager.load(["hf_stack_run"])["tasks"]
    out = {}
    for name, task in loaded.items():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        out[name] = task.instances
    return out


def test_per_request_loglikelihoods_match_hflm(scorer_model):
    """Every request of every task type: multiple choice, Winogrande's partial scoring (many contexts, one
    continuation), Lambada's greedy match and Wikitext's rolling windows."""
    model = AutoModelForCausalLM.from_pretrained(scorer_model).eval()
    tok = AutoTokenizer.from_pretrained(scorer_model)
    fast, ref = make_lm(model, tok, "hf-stack", batch_size=3), make_lm(model, tok, "lm-eval", batch_size=3)
    n_checked = 0
    for name, insts in _instances(list(TASKS)).items():
        kind = insts[0].request_type
        if kind == "loglikelihood":
            a, b = fast.loglikelihood(insts), ref.loglikelihood(insts)
            for (la, ga), (lb, gb) in zip(a, b, strict=True):
                assert la == pytest.approx(lb, abs=1e-4), name
                assert ga == gb, name
        else:
            assert kind == "loglikelihood_rolling" and name == "wikitext"
            a, b = fast.loglikelihood_rolling(insts), ref.loglikelihood_rolling(insts)
            assert a == pytest.approx(b, abs=1e-4)
        n_checked += len(insts)
    assert n_checked > 100


def test_metrics_are_identical_and_fast_backend_shares_prefixes(scorer_model, tmp_path):
    fast = evaluate_model(
        scorer_model, data_dir=SAMPLES_DIR, batch_size=4, output=tmp_path / "r.json", bootstrap_iters=100
    )
    ref = evaluate_model(scorer_model, data_dir=SAMPLES_DIR, batch_size=4, backend="lm-eval", bootstrap_iters=100)
    assert set(fast["results"]) == set(TASKS)
    for task in TASKS:
        for metric, value in ref["results"][task].items():
            if metric.endswith(",none") and "stderr" not in metric:
                assert fast["results"][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
    avg = fast["groups"]["hf_stack_8"]["acc,none"]
    seven = [fast["results"][t]["acc,none"] for t in TASKS if t != "wikitext"]
    assert avg == pytest.approx(sum(seven) / 7)  # the paper's "Avg." over the seven accuracies
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["results"]["piqa"]["acc,none"] == fast["results"]["piqa"]["acc,none"]
    assert saved["hf_stack"]["add_bos_token"] is False and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["configs"]["arc_easy"]["doc_to_text"] == "Question: {{question}}\nAnswer:"  # lm-eval's own prompt


def test_prefix_sharing_runs_fewer_tokens(scorer_model):
    """The point of the backend: the model sees each shared context once."""
    model = AutoModelForCausalLM.from_pretrained(scorer_model).eval()
    tok = AutoTokenizer.from_pretrained(scorer_model)
    counted = {"n": 0}

    def count(module, args, kwargs):
        counted["n"] += int((kwargs.get("input_ids", args[0] if args else None) != -1).sum())

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    insts = _instances(["arc_easy"])["arc_easy"]
    fast, ref = make_lm(model, tok, "hf-stack", batch_size=1), make_lm(model, tok, "lm-eval", batch_size=1)
    fast.loglikelihood(insts)
    fast_tokens, counted["n"] = counted["n"], 0
    ref.loglikelihood(insts)
    handle.remove()
    assert fast_tokens < 0.5 * counted["n"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tasks="arc_easy,hellaswag"), "unknown task hellaswag; choose from: hf_stack_8, lambada_openai"),
        (dict(tasks="piqa", data_dir="{missing}"), "is not a folder"),
        (dict(tasks="piqa", data_dir="{bad}"), "lacks the fields piqa needs"),
        (dict(tasks="sciq", data_dir="{bad}"), "has no sciq.jsonl"),
        (dict(tasks="piqa", limit=0), "limit must be at least 1"),
    ],
)
def test_bad_evaluation_input(scorer_model, tmp_path, kwargs, match):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "piqa.jsonl").write_text(json.dumps({"goal": "x", "sol1": "a"}) + "\n")
    kwargs = {k: v.format(missing=tmp_path / "nope", bad=bad) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(HfStackError, match=match):
        evaluate_model(scorer_model, output=tmp_path / "out.json", **kwargs)
    assert not (tmp_path / "out.json").exists()


def test_eval_cli(scorer_model, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(scorer_model, folder)
    cmd = [sys.executable, "-m", "hf_stack.cli", "eval", str(folder), "--data-dir", str(SAMPLES_DIR),
           "--tasks", "arc_easy,winogrande", "--limit", "3", "-o", str(tmp_path / "res.json")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "arc_easy" in r.stdout and "average" in r.stdout
    saved = json.loads((tmp_path / "res.json").read_text())
    assert saved["results"]["arc_easy"]["sample_len"] == 3
    r = subprocess.run(
        [*cmd[:-2], "--backend", "lm-eval", "-o", str(tmp_path / "ref.json")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert ref["hf_stack"]["backend"] == "lm-eval"
    assert ref["results"]["arc_easy"]["acc,none"] == saved["results"]["arc_easy"]["acc,none"]
    card = (folder / "README.md").read_text()
    assert card.count("<!-- hf_stack:evaluation -->") == 1
    # local items, first 3 of each: labelled in the text, never claimed as the official split in the model-index
    front_matter = card.split("\n---\n")[0]
    assert "model-index" not in front_matter and "Not the official splits: scored on local files" in card
    assert "the first 3 items of each task" in card
    # failures: one line, exit 2, no results file
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    for args, match in ((["--tasks", "nope"], "unknown task nope"), ([], "config.json needs num_hidden_layers")):
        model = str(folder) if args else str(tmp_path / "broken")
        r = subprocess.run([sys.executable, "-m", "hf_stack.cli", "eval", model, "--data-dir", str(SAMPLES_DIR),
                            *args, "-o", str(tmp_path / "fail.json")], capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-2000:]
        assert match in r.stderr and not (tmp_path / "fail.json").exists()


def test_eval_callback_logs_benchmarks_against_tokens(tmp_path):
    from hf_stack import EvalCallback, StackingTrainer, StackingTrainingArguments, build_dataset

    build_checkpoint(tmp_path / "s", "llama", num_layers=1)
    tok = AutoTokenizer.from_pretrained(tmp_path / "s")
    (tmp_path / "d.txt").write_text(" ".join(["the cat sat on the mat and looked at the dog"] * 200))
    train, _ = build_dataset([str(tmp_path / "d.txt")], tok, 16)
    args = StackingTrainingArguments(str(tmp_path / "run"), max_tokens=64 * 6, per_device_train_batch_size=4,
                                     report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")  # fmt: skip
    trainer = StackingTrainer(
        model=AutoModelForCausalLM.from_pretrained(tmp_path / "s"), args=args, train_dataset=train
    )
    cb = EvalCallback(tok, tasks="arc_easy,piqa", data_dir=SAMPLES_DIR, limit=2, every_n_steps=3, trainer=trainer)
    trainer.add_callback(cb)
    trainer.train()
    assert [h["step"] for h in cb.history] == [3, 6]
    logged = [
        e for e in json.loads((tmp_path / "run" / "training_log.json").read_text())["log_history"] if "bench/piqa" in e
    ]
    assert [e["tokens"] for e in logged] == [192, 384] and all("bench/average" in e for e in logged)


def test_only_full_official_splits_go_to_the_model_index(scorer_model, tmp_path):
    from hf_stack.evaluation.benchmarks import eval_results

    results = evaluate_model(scorer_model, tasks="arc_easy,wikitext", data_dir=SAMPLES_DIR, limit=2, bootstrap_iters=0)
    assert eval_results(results) is None
    assert eval_results({**results, "hf_stack": {**results["hf_stack"], "limit": None}}) is None  # local data
    full = {**results, "hf_stack": {**results["hf_stack"], "data_dir": None, "limit": None}}  # as a Hub run records
    entries = {e.dataset_name: e for e in eval_results(full)}
    assert entries["arc_easy"].dataset_type == "allenai/ai2_arc" and entries["arc_easy"].dataset_split == "test"
    assert entries["wikitext"].metric_type == "word_perplexity"
