"""Trainer -> compare: growth against scratch under one protocol for every arm, for `make demo` and `bench/study.py`.

The protocol (what makes the comparison fair, and what a reader of the paper asks of it):

- **The same tuning for every arm.** The small model's, the grown model's and scratch's peak learning rates are each
  chosen by the same sweep (the recipe's `learning_rates`, on the first seed): the small model by its loss at d,
  the grown model by its final loss (growing from the chosen small model), scratch by its final loss at the
  1x budget. Every ablation row reuses the main rows' choices.
- **Scratch read only at the end of its own schedule.** Scratch trains once per budget (`scratch_budgets`, multiples
  of the grown run's all-parameter FLOPs), each run with its complete warmup-cosine schedule; the compute scratch
  needs to reach the grown run's final loss is interpolated between those annealed end points
  (`compare.endpoint_speedup`), in FLOPs with every parameter, non-embedding FLOPs and measured seconds.
- **The small model taken mid-schedule** by default, as the paper took the 10B-token checkpoint of a long run:
  a constant learning rate after warmup (`small_schedule`), so it is not annealed before growth.
- **Seeds** change the initialisation and the order of the training blocks, the same for every arm of a seed; the
  validation blocks are fixed. Each seed's speed-up is computed against that seed's scratch end points.
- **Health**: the small model's validation loss at d beside scratch's after the same tokens and the unigram
  baseline, with a warning when the small model is no better than unigram.

Runs go to a pool of `workers` processes with one torch thread each (two small runs use two cores better than
one run with two threads), each run a real `StackingTrainer` run with its `training_log.json`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from ..errors import HfStackError
from ..training.log import CURRENCIES

DEFAULTS = {
    "data": "corpus",
    "vocab_size": 1024,
    "block_size": 128,
    "batch_size": 16,
    "validation_blocks": 96,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "tie_word_embeddings": False,
    "small_layers": 3,
    "factor": 4,
    "operator": "stack",
    "order": "stack",
    "grow_at_tokens": 2.5e5,
    "total_tokens": 1.0e6,
    "small_schedule": "constant_with_warmup",
    "schedule": "cosine_with_min_lr",
    "min_lr_rate": 0.1,
    "warmup": 0.05,
    "grown_warmup": 0.05,
    "scratch_budgets": [1.0, 1.5, 2.0],
    "learning_rates": [1.0e-3, 2.0e-3, 4.0e-3],
    "seeds": [0, 1, 2],
    "eval_steps": 40,
    "data_seed": 1234,
    "workers": 2,
    "ablations": [],
}
ARM_RESULT = "arm_result.json"
# Keys an ablation row may change; rows that change the target (its depth, width or tying) get their own scratch.
ABLATION_KEYS = {"small_layers", "factor", "operator", "order", "grow_at_tokens", "small_schedule",
                 "tie_word_embeddings", "total_tokens"}  # fmt: skip
# Keys only some rows use (absent means: depth growth, no MSG masks, LiGO's default steps, one growth). For "width" the
# small model has the target's depth (`small_layers`) and half its hidden size and heads; `factor` is not used.
# A row with `growths` grows several times (gradual stacking, MIDAS): a list of {"at": multiple of grow_at_tokens,
# "factor": g, "order": ...}; the phases before the last keep the small model's schedule and learning rate, the last
# takes the grown one (swept like a one-shot growth's).
OPERATOR_KEYS = {"direction", "mask_steps", "learn_steps", "growths"}
# Rows with the same target share its scratch runs, at budgets set by the first such row's grown run.
TARGET_KEYS = ("tie_word_embeddings", "hidden_size", "num_attention_heads")


def load_recipe(recipe: dict) -> dict:
    """The recipe with defaults filled in, checked before anything runs."""
    unknown = sorted(set(recipe) - set(DEFAULTS) - {"name"})
    if not isinstance(recipe, dict):
        raise HfStackError(f"a study recipe is a mapping of settings, got {type(recipe).__name__}")
    if unknown:
        raise HfStackError(f"unknown study recipe keys: {', '.join(unknown)} (known: {', '.join(sorted(DEFAULTS))})")
    r = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(recipe)}
    for key in ("learning_rates", "seeds", "scratch_budgets", "ablations"):
        if not isinstance(r[key], list):
            raise HfStackError(f"{key} must be a list, got {r[key]!r}")
    if len(r["learning_rates"]) < 1 or len(r["seeds"]) < 1 or len(r["scratch_budgets"]) < 2:
        raise HfStackError("a study needs at least one learning rate, one seed and two scratch budgets")
    for row in r["ablations"]:
        bad = sorted(set(row) - ABLATION_KEYS - OPERATOR_KEYS - {"name"})
        if bad or "name" not in row:
            raise HfStackError(
                f"ablation {row!r}: needs a name and may change only "
                f"{', '.join(sorted(ABLATION_KEYS | OPERATOR_KEYS))}"
            )
        _check_setting({**r, **row})
    _check_setting(r)
    return r


def _check_setting(s: dict) -> None:
    at = [g.get("at") for g in s.get("growths", [])]
    if at and (at[0] != 1 or at != sorted(set(at)) or not all(isinstance(g.get("factor"), int) for g in s["growths"])):
        raise HfStackError(
            f"growths {s['growths']!r}: the first at 1 (x grow_at_tokens), then later, each with a factor"
        )
    if at and not at[-1] * s["grow_at_tokens"] < s["total_tokens"]:
        raise HfStackError(f"the last growth ({at[-1]} x grow_at_tokens) must be inside total_tokens")
    if not 0 < s["grow_at_tokens"] < s["total_tokens"]:
        raise HfStackError(f"grow_at_tokens ({s['grow_at_tokens']:.3g}) must be inside total_tokens")
    steps = _steps(s["grow_at_tokens"], s)
    if steps < s["eval_steps"]:
        raise HfStackError(f"grow_at_tokens is {steps} steps, fewer than eval_steps ({s['eval_steps']})")


def _tps(s: dict) -> int:
    return s["block_size"] * s["batch_size"]


def _steps(tokens: float, s: dict) -> int:
    """Whole evaluation intervals, so every run (and each phase) ends on an evaluated step."""
    return max(1, round(tokens / _tps(s) / s["eval_steps"])) * s["eval_steps"]


# ------------------------------------------------------------------------------------------- data, once per study
def prepare_data(recipe: dict, files, work: Path) -> dict:
    """Train the tokenizer, tokenise everything once, hold out fixed random validation blocks."""
    import numpy as np

    from ..data import iter_documents, pack, tokenize_documents, train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    # Finished arms are reused by their settings; if the text changed, none of them may be.
    source = {
        "files": [[str(f), os.path.getsize(f)] for f in files if os.path.isfile(f)],
        "sources": list(map(str, files)),
    }
    source.update({k: recipe[k] for k in ("vocab_size", "block_size", "data_seed", "validation_blocks")})
    marker, summary = work / "source.json", work / "data.json"
    if marker.is_file() and json.loads(marker.read_text()) == source and summary.is_file():
        return json.loads(summary.read_text())  # the same text and settings: tokenised already
    if marker.is_file():
        shutil.rmtree(work.parent / "runs", ignore_errors=True)
    tok = train_tokenizer(files, recipe["vocab_size"], work / "tokenizer")
    tokens = tokenize_documents(iter_documents(files), tok)
    blocks = np.asarray(pack(tokens, recipe["block_size"], recipe["data_seed"]).with_format("numpy")["input_ids"])
    n_val = recipe["validation_blocks"]
    np.save(work / "validation.npy", blocks[:n_val])
    np.save(work / "train.npy", blocks[n_val:])
    data = {"folder": str(work), "tokens": int(len(tokens)), "train_blocks": int(len(blocks) - n_val),
            "validation_blocks": n_val, "vocab": len(tok)}  # fmt: skip
    summary.write_text(json.dumps(data))
    marker.write_text(json.dumps(source))  # last: its presence means the folder is complete
    return data


def target_layers(s: dict) -> int:
    if s.get("growths"):
        return s["small_layers"] * math.prod(g["factor"] for g in s["growths"])
    return s["small_layers"] * (s["factor"] if s.get("direction", "depth") == "depth" else 1)


def _schedule_of(s: dict, tps: int, grown_lr: float) -> list[dict]:
    """The growth schedule of a row with several growths (see OPERATOR_KEYS)."""
    out = []
    for i, g in enumerate(s["growths"]):
        last = i == len(s["growths"]) - 1
        schedule = s["schedule"] if last else s["small_schedule"]
        out.append({"at_tokens": _steps(g["at"] * s["grow_at_tokens"], s) * tps,
                    "stacked_config": {"operator": s["operator"], "factor": g["factor"], "order": g.get("order", s["order"])},
                    "learning_rate": grown_lr if last else None, "warmup_steps": s["grown_warmup"] if last else 0,
                    "lr_scheduler_type": schedule, "lr_scheduler_kwargs": _schedule_kwargs(schedule, s)})  # fmt: skip
    return out


def small_model(s: dict, vocab: int, seed: int):
    """The model that grows: fewer layers (depth growth) or half the hidden size and heads (width growth)."""
    if s.get("direction", "depth") == "depth":
        return model_for(s, s["small_layers"], vocab, seed)
    half = {**s, "hidden_size": s["hidden_size"] // 2, "num_attention_heads": s["num_attention_heads"] // 2}
    return model_for(half, s["small_layers"], vocab, seed)


def growth_settings(s: dict, files=None) -> dict:
    """The StackedConfig of a row: depth by `factor` and `order`, or width x2; LiGO trains on the study's files."""
    growth = {"operator": s["operator"]}
    if s.get("direction", "depth") == "depth":
        growth.update(factor=s["factor"], order=s["order"])
    else:
        growth.update(direction="width", width_factor=2)
    if s["operator"] == "learn":
        growth.update(learn_data=",".join(files or []), learn_block_size=s["block_size"])
        if "learn_steps" in s:
            growth["learn_steps"] = s["learn_steps"]
    return growth


def _row_setting(row: dict) -> dict:
    return {k: row[k] for k in sorted(ABLATION_KEYS | OPERATOR_KEYS) if k in row}


def model_for(s: dict, num_layers: int, vocab: int, seed: int):
    """The study's Llama (untied by default: the paper's models are) at `num_layers`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    h = s["hidden_size"]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=h, intermediate_size=h * 8 // 3 // 16 * 16, num_hidden_layers=num_layers,
        num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_attention_heads"],
        max_position_embeddings=max(256, s["block_size"]), tie_word_embeddings=s["tie_word_embeddings"],
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def sizes(s: dict, vocab: int) -> dict:
    """Parameter counts of the small and target models (all and non-embedding) and the grown run's FLOPs."""
    from ..plans.timing import training_flops
    from ..training.accounting import count_parameters

    small = small_model(s, vocab, 0)
    big = model_for(s, target_layers(s), vocab, 0)
    d = _steps(s["grow_at_tokens"], s) * _tps(s)
    total = d + _steps(s["total_tokens"] - d, s) * _tps(s)
    n = {"small": count_parameters(small), "small_non_embedding": count_parameters(small, embeddings=False),
         "target": count_parameters(big), "target_non_embedding": count_parameters(big, embeddings=False)}  # fmt: skip
    n["grown_flops"] = training_flops(n["small"], d) + training_flops(n["target"], total - d)
    if s.get("growths"):  # each phase at its own size
        ends = [g["at_tokens"] for g in _schedule_of(s, _tps(s), 0.0)] + [total]
        layers = [s["small_layers"] * math.prod(g["factor"] for g in s["growths"][:i]) for i in range(len(ends))]
        n["grown_flops"] = sum(training_flops(count_parameters(model_for(s, n_layers, vocab, 0)), b - a)
                               for n_layers, a, b in zip(layers, [0, *ends[:-1]], ends))  # fmt: skip
    n["d"], n["total_tokens"] = d, total
    n["target_non_embedding_share"] = n["target_non_embedding"] / n["target"]
    n["tokens_per_small_parameter"] = d / n["small"]
    n["tokens_per_target_parameter"] = total / n["target"]
    return n


# ------------------------------------------------------------------------------------------------ one run, one arm
def run_arm(arm: dict) -> dict:
    """Train one arm (a plain dict: role, setting, seed, learning rates, tokens) and return its log and end point."""
    import torch
    from transformers.utils import logging as hf_logging

    out = Path(arm["output"])
    spec = {k: v for k, v in arm.items() if k != "output"}
    done = out / ARM_RESULT
    if done.is_file():  # a study that was stopped resumes: finished arms with the same spec are not rerun
        cached = json.loads(done.read_text())
        if _arm_key(cached.get("spec", {})) == _arm_key(json.loads(json.dumps(spec, default=str))):
            return cached["result"]
    started = out / "arm_spec.json"
    # A ladder stopped part-way continues from its checkpoints (finished branches are kept); anything else, or a
    # folder of another spec, starts again.
    resume = bool(arm.get("ladder")) and started.is_file() and (out / "run_config.json").is_file()
    resume = resume and _arm_key(json.loads(started.read_text())) == _arm_key(
        json.loads(json.dumps(spec, default=str))
    )
    if out.exists() and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(spec, default=str))
    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(arm.get("threads", 1))
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return _train_arm(arm, spec, out, done, resume)
    finally:  # workers=1 trains in the caller's process: leave its settings as they were
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _train_arm(arm: dict, spec: dict, out: Path, done: Path, resume: bool = False) -> dict:
    import numpy as np
    from datasets import Dataset
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    from ..plans.config import StackedConfig
    from ..training.arguments import StackingTrainingArguments
    from ..training.trainer import StackingTrainer

    s, role, seed, folder = arm["setting"], arm["role"], arm["seed"], Path(arm["data"])
    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    tps = _tps(s)
    train_blocks = np.load(folder / "train.npy", mmap_mode="r")
    need = arm["tokens"] // s["block_size"]
    epochs = math.ceil(need / len(train_blocks))
    if epochs > s.get("max_epochs", 1):
        raise HfStackError(
            f"the corpus holds {len(train_blocks)} training blocks, the {role} arm needs {need} "
            f"({need / len(train_blocks):.2f} passes; the recipe allows {s.get('max_epochs', 1)})"
        )
    # One permutation per pass, so every run of a seed trains on the same first blocks, whatever its length.
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(train_blocks)) for _ in range(epochs)])[:need]
    blocks = np.asarray(train_blocks[np.sort(order)])[np.argsort(np.argsort(order))]
    train = Dataset.from_dict({"input_ids": blocks, "labels": blocks}).with_format("torch")
    val_blocks = np.load(folder / "validation.npy")
    val = Dataset.from_dict({"input_ids": val_blocks, "labels": val_blocks}).with_format("torch")
    model = model_for(s, target_layers(s), len(tok), seed) if role == "scratch" else small_model(s, len(tok), seed)
    common = dict(
        per_device_train_batch_size=s["batch_size"], per_device_eval_batch_size=48, eval_strategy="steps",
        eval_steps=s["eval_steps"], logging_steps=s["eval_steps"], save_strategy="no", report_to=[], use_cpu=True,
        seed=seed, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, disable_tqdm=True,
        max_tokens=arm["tokens"], learning_rate=arm["lr"], warmup_steps=s["warmup"], dataloader_num_workers=0,
    )  # fmt: skip
    if arm.get("ladder"):  # annealed end points at every budget of the ladder from one run
        common.update(cooldown_budgets=arm["ladder"], cooldown_fraction=s["cooldown_fraction"])
    if role == "grown" and s.get("growths"):
        args = StackingTrainingArguments(
            str(out), growth_schedule=_schedule_of(s, tps, arm["grown_lr"]), lr_scheduler_type=s["small_schedule"],
            lr_scheduler_kwargs=_schedule_kwargs(s["small_schedule"], s), **common,
        )  # fmt: skip
    elif role == "grown":
        args = StackingTrainingArguments(
            str(out), grow_at_tokens=_steps(s["grow_at_tokens"], s) * tps, grown_learning_rate=arm["grown_lr"],
            grown_warmup_steps=s["grown_warmup"], lr_scheduler_type=s["small_schedule"],
            lr_scheduler_kwargs=_schedule_kwargs(s["small_schedule"], s), grown_lr_scheduler_type=s["schedule"],
            grown_lr_scheduler_kwargs=_schedule_kwargs(s["schedule"], s),
            stacked_config=StackedConfig(**growth_settings(s, arm.get("files"))), mask_steps=s.get("mask_steps", 0),
            **common,
        )  # fmt: skip
    else:
        schedule = s["small_schedule"] if role == "small" else s["schedule"]
        args = StackingTrainingArguments(
            str(out), lr_scheduler_type=schedule, lr_scheduler_kwargs=_schedule_kwargs(schedule, s), **common
        )
    start = time.perf_counter()
    trainer = StackingTrainer(model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tok)
    trainer.remove_callback(PrinterCallback)  # many runs at once: one line per finished run, not every log dict
    trainer.train(resume_from_checkpoint=resume or None)
    wall = time.perf_counter() - start
    log = json.loads((out / "training_log.json").read_text())
    keep = ("tokens", "flops", "non_embedding_flops", "train_seconds", "phase", "eval_loss", "loss", "learning_rate")
    history = [{k: e[k] for k in keep if k in e} for e in log["log_history"] if "eval_loss" in e or "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    t = log["training"]
    result = {
        **{k: v for k, v in arm.items() if k not in ("setting", "data", "output")}, "run_dir": str(out),
        "final_loss": evals[-1]["eval_loss"],
        "flops": t["total_flops"], "non_embedding_flops": t["total_non_embedding_flops"],
        "train_seconds": t["total_train_seconds"], "wall_seconds": round(wall, 2), "tokens_trained": t["total_tokens"],
        "small_loss_at_growth": next((e["eval_loss"] for e in reversed(evals) if e.get("phase") == 1), None)
        if role == "grown" else None,
        "unigram_loss": log.get("baselines", {}).get("unigram_eval_loss"),
        "phases": t["phases"], "log": history, "epochs": round(need / len(train_blocks), 4),
    }  # fmt: skip
    if "cooldowns" in log:
        for rung in log["cooldowns"]:  # each rung: its passes over the data, and its branch's own per-step log
            rung["epochs"] = round(rung["tokens"] // s["block_size"] / len(train_blocks), 4)
            if rung["folder"] != ".":
                branch = json.loads((out / rung["folder"] / "training_log.json").read_text())["log_history"]
                rung["log"] = [
                    {k: e[k] for k in keep if k in e} for e in branch if e["tokens"] > rung["decay_start_tokens"]
                ]
        result["cooldowns"] = log["cooldowns"]
    tmp = done.with_name(done.name + ".tmp")
    tmp.write_text(json.dumps({"spec": spec, "result": result}, default=str))
    os.replace(tmp, done)
    return result


# What the study as a whole varies (the sweep, the seeds, the rows): not part of one arm's identity.
STUDY_KEYS = {"learning_rates", "seeds", "scratch_budgets", "ablations", "workers", "data", "name"}


def _arm_key(spec: dict) -> dict:
    """What decides an arm's result: a finished arm is reused when this matches, whatever else the recipe changed."""
    setting = {k: v for k, v in spec.get("setting", {}).items() if k not in STUDY_KEYS}
    return {**{k: v for k, v in spec.items() if k not in ("setting", "data")}, "setting": setting}


def _schedule_kwargs(schedule: str, s: dict) -> dict:
    """Cosine schedules decay to `min_lr_rate` of the peak; the others take no arguments."""
    return {"min_lr_rate": s["min_lr_rate"]} if schedule == "cosine_with_min_lr" else {}


class _Pool:
    """Runs arms in worker processes (or in this one for workers=1), printing a line as each finishes."""

    def __init__(self, workers: int, total_hint: int = 0):
        self.workers, self.done, self.total = workers, 0, total_hint
        self.executor = None
        if workers > 1:
            import multiprocessing

            self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def run(self, arms: list[dict]) -> list[dict]:
        if self.executor is None:
            results = []
            for arm in arms:
                results.append(run_arm(arm))
                self._report(results[-1])
            return results
        futures = [self.executor.submit(run_arm, arm) for arm in arms]
        results = []
        for f in futures:
            results.append(f.result())
            self._report(results[-1])
        return results

    def _report(self, r: dict) -> None:
        self.done += 1
        lr = f"lr {r['lr']:.2g}" + (f" -> {r['grown_lr']:.2g}" if r.get("grown_lr") else "")
        print(f"  [{self.done}/{self.total or '?'}] {r['name']:<34} seed {r['seed']}  {lr:<18} "
              f"loss {r['final_loss']:.4f}  {r['train_seconds']:.0f} s", flush=True)  # fmt: skip

    def close(self):
        if self.executor is not None:
            self.executor.shutdown()


# ---------------------------------------------------------------------------------------------------- the study
def run_study(recipe: dict, output: Path, files) -> dict:
    """Sweep, seeds, ablations; returns (and writes to `output/study.json`) every arm and every row's figures."""
    r = load_recipe(recipe)
    output = Path(output)
    files = [files] if isinstance(files, (str, Path)) else list(files)
    data = prepare_data(r, files, output / "data")
    vocab = data["vocab"]
    rows = [{"name": "main", **_row_setting(r)}] + [
        {**{k: r[k] for k in ABLATION_KEYS}, **row} for row in r["ablations"]
    ]
    row_sizes = {row["name"]: sizes({**r, **row}, vocab) for row in rows}  # builds two models per row: once
    main_sizes = row_sizes["main"]
    print(f"data: {data['tokens']:,} tokens, {data['train_blocks']:,} training blocks, {data['validation_blocks']} "
          f"validation blocks; small model {main_sizes['small']:,} parameters ({r['small_layers']} layers), "
          f"target {main_sizes['target']:,} ({target_layers(r)} layers, "
          f"{main_sizes['target_non_embedding_share']:.0%} non-embedding)", flush=True)  # fmt: skip
    n_lr, n_seeds, n_budgets = len(r["learning_rates"]), len(r["seeds"]), len(r["scratch_budgets"])
    pool = _Pool(r["workers"], n_lr * 3 + (n_seeds - 1) * (1 + n_budgets) + (n_budgets - 1) + len(rows[1:]) * n_seeds)
    arms: list[dict] = []

    def arm(row, role, seed, lr, tokens, grown_lr=None, tag=""):
        s = {**r, **_row_setting(row)}
        name = f"{row['name']}/{role}{tag}"
        lrs = f"{lr:g}" + (f"-{grown_lr:g}" if grown_lr else "")
        folder = output / "runs" / f"{name.replace('/', '-').replace('=', '')}-seed{seed}-lr{lrs}"
        spec = {"name": name, "row": row["name"], "role": role, "seed": seed, "lr": lr, "grown_lr": grown_lr,
                "tokens": int(tokens), "setting": s, "data": data["folder"], "output": str(folder)}  # fmt: skip
        if role == "grown" and s["operator"] == "learn":
            spec["files"] = [str(f) for f in files]  # LiGO trains its maps on the study's text
        return spec

    def budget_tokens(row, mult):
        owner = next(x for x in rows if _target({**r, **x}) == _target({**r, **row}))
        s, n = {**r, **_row_setting(owner)}, row_sizes[owner["name"]]
        return _steps(mult * n["grown_flops"] / (6 * n["target"]), s) * _tps(s)

    main, seed0 = rows[0], r["seeds"][0]
    print(f"[sweep] learning rates {r['learning_rates']} for each role on seed {seed0}", flush=True)
    small_sweep = pool.run([arm(main, "small", seed0, lr, main_sizes["d"]) for lr in r["learning_rates"]])
    small_lr = min(small_sweep, key=lambda a: a["final_loss"])["lr"]
    first = r["scratch_budgets"][0]
    sweep = pool.run(
        [arm(main, "grown", seed0, small_lr, main_sizes["total_tokens"], grown_lr=lr) for lr in r["learning_rates"]]
        + [
            arm(main, "scratch", seed0, lr, budget_tokens(main, first), tag=f"@{first:g}x")
            for lr in r["learning_rates"]
        ]
    )
    grown_sweep, scratch_sweep = sweep[:n_lr], sweep[n_lr:]
    grown_lr = min(grown_sweep, key=lambda a: a["final_loss"])["grown_lr"]
    scratch_lr = min(scratch_sweep, key=lambda a: a["final_loss"])["lr"]
    choice = {"small": small_lr, "grown": grown_lr, "scratch": scratch_lr}
    edges = [k for k, v in choice.items() if v in (min(r["learning_rates"]), max(r["learning_rates"])) and n_lr > 1]
    print(f"[sweep] chosen: small {small_lr:g}, grown {grown_lr:g}, scratch {scratch_lr:g}"
          + (f" (at the sweep's edge: {', '.join(edges)})" if edges else ""), flush=True)  # fmt: skip
    arms += small_sweep + sweep

    # Main rows and ablations: every seed, grown arm per row, scratch per distinct target.
    todo, scratch_done, budgets = [], {}, {}  # budgets: index in todo -> its scratch key
    for s_arm in scratch_sweep:
        if s_arm["lr"] == scratch_lr:
            scratch_done[(_target({**r, **main}), seed0, first)] = s_arm
    grown_done = {("main", seed0): next(a for a in grown_sweep if a["grown_lr"] == grown_lr)}
    for row in rows:
        for seed in r["seeds"]:
            if (row["name"], seed) not in grown_done:
                todo.append(arm(row, "grown", seed, small_lr, row_sizes[row["name"]]["total_tokens"], grown_lr))
            for mult in r["scratch_budgets"]:
                key = (_target({**r, **row}), seed, mult)
                if key not in scratch_done:
                    scratch_done[key] = None
                    todo.append(arm(row, "scratch", seed, scratch_lr, budget_tokens(row, mult), tag=f"@{mult:g}x"))
                    budgets[len(todo) - 1] = key
    pool.total = pool.done + len(todo)
    print(f"[runs] {len(todo)} runs: {len(rows)} rows x {n_seeds} seeds, scratch at {r['scratch_budgets']}x the "
          "grown run's FLOPs", flush=True)  # fmt: skip
    results = pool.run(todo)
    pool.close()
    for i, (a, res) in enumerate(zip(todo, results)):
        if a["role"] == "grown":
            grown_done[(a["row"], a["seed"])] = res
        else:
            scratch_done[budgets[i]] = res
    arms += results

    table = [summarize_row(row, r, grown_done, scratch_done, row_sizes[row["name"]]) for row in rows]
    study = {"recipe": r, "data": data, "sizes": main_sizes, "sweep": {"chosen": choice, "at_edge": edges,
             "criterion": "small: validation loss at d; grown and scratch: final validation loss (scratch at "
             f"{r['scratch_budgets'][0]:g}x), seed {seed0}"}, "rows": table, "arms": arms}  # fmt: skip
    tmp = output / "study.json.tmp"
    tmp.write_text(json.dumps(study, indent=1, default=str))
    os.replace(tmp, output / "study.json")
    return study


def _target(row: dict) -> tuple:
    return (target_layers(row), *(row[k] for k in TARGET_KEYS))


def summarize_row(row: dict, r: dict, grown_done: dict, scratch_done: dict, n: dict) -> dict:
    """Per-seed speed-ups in each currency against that seed's scratch end points; mean, spread, verdict."""
    from .compare import endpoint_speedup

    per_seed = []
    for seed in r["seeds"]:
        g = grown_done[(row["name"], seed)]
        ends = [scratch_done[(_target({**r, **row}), seed, m)] for m in r["scratch_budgets"]]
        figures = endpoint_speedup(_end_point(g), [_end_point(e) for e in ends])
        at_d = _loss_at_tokens(ends[0]["log"], n["d"])
        per_seed.append({"seed": seed, "grown_loss": g["final_loss"], "small_loss_at_growth": g["small_loss_at_growth"],
                         "scratch_loss_at_growth_tokens": at_d, "unigram_loss": g["unigram_loss"],
                         "scratch_end_points": [{"budget": m, "loss": e["final_loss"], **{c: e[c] for c in CURRENCIES}}
                                                for m, e in zip(r["scratch_budgets"], ends)],
                         "figures": figures})  # fmt: skip
    out = {"name": row["name"], "setting": _row_setting(row), "sizes": n, "per_seed": per_seed}
    for c in CURRENCIES:
        values = [p["figures"][c]["speedup"] for p in per_seed if c in p["figures"]]
        gaps = [
            p["figures"][c]["loss_gap"]
            for p in per_seed
            if c in p["figures"] and p["figures"][c]["loss_gap"] is not None
        ]
        bounds = sorted({p["figures"][c]["bound"] for p in per_seed if c in p["figures"] and p["figures"][c]["bound"]})
        out[c] = {"speedup_mean": statistics.fmean(values), "speedup_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                  "speedup_min": min(values), "speedup_max": max(values), "bounds": bounds,
                  "loss_gap_mean": statistics.fmean(gaps) if gaps else None,
                  "loss_gap_std": statistics.stdev(gaps) if len(gaps) > 1 else None,
                  "verdict": _verdict(values)}  # fmt: skip
    health = {
        k: statistics.fmean([p[k] for p in per_seed if p[k] is not None] or [math.nan])
        for k in ("grown_loss", "small_loss_at_growth", "scratch_loss_at_growth_tokens", "unigram_loss")
    }
    # The same check `hf-stack compare` prints: a small model no better than unigram has not learnt to use context.
    health["small_no_better_than_unigram"] = health["small_loss_at_growth"] >= health["unigram_loss"]
    out["health"] = health
    return out


def _end_point(a: dict) -> dict:

    return {"loss": a["final_loss"], **{c: a[c] for c in CURRENCIES}}


def _verdict(values: list[float]) -> str:
    """A claim holds only if every seed agrees on the sign."""
    if all(v > 0 for v in values):
        return "growth ahead"
    if all(v < 0 for v in values):
        return "scratch ahead"
    return "no difference resolved (seeds disagree)"


def _loss_at_tokens(log: list[dict], tokens: float) -> float | None:
    """A run's validation loss after `tokens`, read the way `hf-stack compare`'s health check reads it."""
    from .compare import interpolate_log

    return interpolate_log([(e["tokens"], e["eval_loss"]) for e in log if "eval_loss" in e], tokens)


# ------------------------------------------------------------------------------------------------- table and plot
def _pm(stats: dict, key: str = "speedup", pct: bool = True) -> str:
    m, sd = stats[f"{key}_mean"], stats[f"{key}_std"]
    if m is None:
        return "n/a"
    if pct:
        # every bound the seeds hold: "(>) (<)" when some seeds are lower bounds and others upper ones
        bound = "".join({"lower": " (>)", "upper": " (<)"}[b] for b in stats["bounds"])
        return f"{m:+.1%} ± {sd:.1%}{bound}"
    return f"{m:+.3f} ± {sd:.3f}"


def describe_study(study: dict) -> str:
    """The study as a markdown table: speed-up in three currencies (mean ± std over seeds), gap, health, verdict."""
    lines = [
        "| row | d (tokens, whole steps) | speed-up, FLOPs | non-embedding FLOPs | wall-clock | loss gap at equal FLOPs "
        "| grown loss | small at d | target at d | unigram | tokens / small param | verdict (FLOPs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in study["rows"]:
        h, f = row["health"], row["flops"]
        gap = "n/a" if f["loss_gap_mean"] is None else f"{f['loss_gap_mean']:+.3f} ± {f['loss_gap_std'] or 0:.3f}"
        lines.append(
            f"| {row['name']} | {row['sizes']['d']:,} | {_pm(f)} | {_pm(row['non_embedding_flops'])} | {_pm(row['train_seconds'])} | {gap} "
            f"| {h['grown_loss']:.3f} | {h['small_loss_at_growth']:.3f} | {h['scratch_loss_at_growth_tokens']:.3f} "
            f"| {h['unigram_loss']:.3f} | {row['sizes']['tokens_per_small_parameter']:.2f} | {f['verdict']} |"
        )
    for row in study["rows"]:
        if row["health"]["small_no_better_than_unigram"]:
            lines.append(f"\nwarning: {row['name']}: the small model was no better than unigram frequencies at growth")
    return "\n".join(lines)


def _map_axes(study: dict) -> dict:
    """Rows that differ from the main row in growth timing only, and in target depth only: the map's two axes."""
    main = study["rows"][0]["setting"]
    axes = {"d": [], "depth": []}
    for row in study["rows"]:
        diff = {k for k in ABLATION_KEYS | OPERATOR_KEYS if row["setting"].get(k) != main.get(k)}
        if diff <= {"grow_at_tokens"}:
            axes["d"].append(row)
        if diff <= {"small_layers"}:
            axes["depth"].append(row)
    return axes


def plot_study(study: dict, path: str | Path) -> Path:
    """Main row's loss against FLOPs (mean ± std over seeds, scratch end points with their spread) and the map of
    where growth pays: speed-up against tokens per small-model parameter and against target depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    arms = [a for a in study["arms"] if a["row"] == "main"]
    seeds = study["recipe"]["seeds"]
    chosen = study["sweep"]["chosen"]

    def band(ax, runs, label, color):
        runs = sorted(runs, key=lambda a: a["seed"])
        curves = [[(e["flops"], e["eval_loss"]) for e in a["log"] if "eval_loss" in e] for a in runs]
        n = min(len(c) for c in curves)
        x = np.array([p[0] for p in curves[0][:n]])
        y = np.array([[p[1] for p in c[:n]] for c in curves])
        ax.plot(x, y.mean(0), color=color, label=label)
        ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=color, alpha=0.2)

    ax = axes[0]
    grown = [a for a in arms if a["role"] == "grown" and a["grown_lr"] == chosen["grown"] and a["seed"] in seeds]
    band(ax, grown, f"G_stack (mean ± std, {len(grown)} seeds)", "C0")
    budgets = study["recipe"]["scratch_budgets"]
    for i, m in enumerate(budgets):
        runs = [
            a
            for a in arms
            if a["role"] == "scratch" and a["name"].endswith(f"@{m:g}x") and a["lr"] == chosen["scratch"]
        ]
        band(ax, runs, f"scratch, {m:g}x budget", f"C{i + 1}")
        ends = np.array([[a["flops"], a["final_loss"]] for a in runs])
        ax.errorbar(ends[:, 0].mean(), ends[:, 1].mean(), yerr=ends[:, 1].std(), fmt="o", color=f"C{i + 1}")
    unigram = study["rows"][0]["health"]["unigram_loss"]
    ax.axhline(unigram, color="grey", linestyle="--", linewidth=1, label="unigram baseline")
    ax.set_xlabel("training FLOPs (6ND, all parameters)")
    ax.set_ylabel("validation loss")
    ax.set_ylim(None, unigram + 0.3)
    ax.legend(fontsize=7)
    ax.set_title("main row: loss vs compute (dots: annealed end points)", fontsize=9)
    mapping = _map_axes(study)
    for ax, key, xlabel in ((axes[1], "d", "tokens per small-model parameter at growth (d / N_small)"),
                            (axes[2], "depth", "target depth (layers)")):  # fmt: skip
        rows = mapping[key]
        xs = [r["sizes"]["tokens_per_small_parameter"] if key == "d" else target_layers(r["setting"])
              for r in rows]  # fmt: skip
        order = np.argsort(xs)
        for c, color in (("flops", "C0"), ("non_embedding_flops", "C1"), ("train_seconds", "C2")):
            m = np.array([rows[i][c]["speedup_mean"] for i in order])
            sd = np.array([rows[i][c]["speedup_std"] for i in order])
            ax.errorbar(np.array(xs)[order], 100 * m, yerr=100 * sd, marker="o", capsize=3, color=color, label=c)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speed-up over scratch, % (mean ± std over seeds)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[1].set_title("where growth pays: growth timing", fontsize=9)
    axes[2].set_title("where growth pays: target depth (g fixed)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_lines(study: dict) -> list[str]:
    """What the main row found, in words: health first, then the speed-up with its spread and what it means."""
    row = study["rows"][0]
    h, n = row["health"], row["sizes"]
    seeds = len(row["per_seed"])
    lines = [
        f"health: small model ({n['small']:,} parameters) at d = {n['d']:,} tokens: validation loss "
        f"{h['small_loss_at_growth']:.3f}; the target from scratch after the same tokens: "
        f"{h['scratch_loss_at_growth_tokens']:.3f}; unigram baseline: {h['unigram_loss']:.3f}",
    ]
    if h["small_no_better_than_unigram"]:
        lines.append("warning: the small model is no better than unigram frequencies at growth; the speed-up below "
                     "says little about growth")  # fmt: skip
    labels = {"flops": "FLOPs", "non_embedding_flops": "non-embedding FLOPs", "train_seconds": "wall-clock"}
    for c, label in labels.items():
        f = row[c]
        # A seed whose grown loss lies outside scratch's end points gives a bound, not a figure: say so.
        bound = {"lower": "; a lower bound in some seeds (scratch's largest budget did not reach the grown loss)",
                 "upper": "; an upper bound in some seeds (scratch's smallest budget already beat it)"}  # fmt: skip
        note = "".join(bound[b] for b in f["bounds"])
        lines.append(f"speed-up in {label}: {f['speedup_mean']:+.1%} ± {f['speedup_std']:.1%} over {seeds} seeds "
                     f"(min {f['speedup_min']:+.1%}, max {f['speedup_max']:+.1%}): {f['verdict']}{note}")  # fmt: skip
    f = row["flops"]
    tokens = f"{n['tokens_per_target_parameter']:.1f} tokens per target parameter"
    if f["verdict"] == "growth ahead":
        more = "at least" if "lower" in f["bounds"] else "about"
        meaning = (
            f"meaning: at this scale ({tokens}) G_stack reached scratch's annealed loss with less compute in "
            f"every seed; scratch needs {more} {1 + f['speedup_mean']:.2f}x the grown run's FLOPs (mean over seeds)."
        )
    elif f["verdict"] == "scratch ahead":
        meaning = (
            f"meaning: at this scale ({tokens}) scratch was ahead in every seed: growth did not pay here. "
            "The paper's regime is far longer training; bench/README.md maps the trend."
        )
    else:
        meaning = f"meaning: at this scale ({tokens}) the seeds disagree: no difference is resolved."
    return lines + [meaning]
