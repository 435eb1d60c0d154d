"""Stage 5, the trial: grow the small model with each candidate setting, train each briefly on the same blocks with
`StackingTrainer`, and pick the one with the lowest held-out loss.

Karp et al., "Landscape-Aware Growing" (2024, arXiv 2406.02469): the loss right after growth is a poor guide to
which growth trains best, while the loss after a short run is a good one. Every candidate is grown in memory
(`StackedModelForCausalLM.from_small_pretrained`), evaluated on the held-out blocks, trained for the same optimizer
steps (same batch, block size, learning rate, schedule and seed) on the same packed blocks in the same order, and
evaluated on the held-out blocks again. Each candidate's run is a normal run folder (`<output>/<name>/`, with
`final/` and `training_log.json`), so the best one continues with `hf-stack train --model <output>/<name>/final`.
The trial's compute (6ND of every candidate's run, plus `learn`'s map training) is recorded in `trial.json`, so a
speed-up that chose its growth by a trial can add it to the grown run's cost.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
from pathlib import Path

from ..errors import HfStackError, error_reason
from ..plans.config import StackedConfig

TRIAL_JSON = "trial.json"
# Settings the plan already holds (operator, directions, layer map): two candidates with the same plan and the same
# other settings are the same growth, however they spell it (`factor=2` and `num_layers=4` on a 2-layer model).
_PLAN_SPELLINGS = ("factor", "num_layers", "layer_map", "order", "direction", "operator")
# What defines the trial, set by `trial()`'s own arguments (every candidate gets the same).
_TRIAL_SETTINGS = ("output_dir", "max_steps", "max_tokens", "grow_at_tokens", "stacked_config", "eval_strategy",
                   "eval_steps", "eval_on_start", "save_strategy", "per_device_train_batch_size", "learning_rate",
                   "warmup_steps", "lr_scheduler_type", "seed", "data_seed")  # fmt: skip
FLOPS_NOTE = (
    "trial_flops: training FLOPs of one candidate's trial run, 6 N D with N its grown parameters (as the trainer "
    "counts them), plus growth_flops (the learn operator's map training, 6 N_target a token; 0 for the others); "
    "total_flops: the whole trial (every candidate), the compute to add to a grown run's cost when its growth was "
    "chosen by this trial; held-out evaluations are forward passes and not counted"
)


def parse_candidates(candidates, data=None) -> list[tuple[str, str, StackedConfig]]:
    """`(text, folder name, StackedConfig)` per candidate.

    Args:
        candidates: `"key=value,key=value"` strings (`StackedConfig` field names), `StackedConfig`s or dicts.
        data: the trial's data; a `learn` candidate without `learn_data` trains its maps on it.
    """
    if isinstance(candidates, (str, dict, StackedConfig)):
        candidates = [candidates]
    if not candidates:
        raise HfStackError("give at least one candidate, e.g. --candidates factor=4 factor=2")
    out, names = [], set()
    for c in candidates:
        settings = c.to_dict() if isinstance(c, StackedConfig) else c if isinstance(c, dict) else None
        text = str(c) if settings is None else ",".join(f"{k}={v}" for k, v in settings.items() if v is not None)
        try:
            if settings is None:
                settings = StackedConfig.parse_settings(text)
            if settings.get("operator") == "learn" and not settings.get("learn_data") and data:
                settings = {**settings, "learn_data": ",".join(_sources(data))}
            cfg = StackedConfig(**settings)
        except (HfStackError, TypeError) as e:
            raise HfStackError(f"candidate {text!r}: {e}") from None
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("=", "-").replace(",", "_")).strip("._-")[:80]
        name, n = base or "candidate", 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.add(name)
        out.append((text, name, cfg))
    return out


def _sources(data) -> list[str]:
    return [str(data)] if isinstance(data, (str, os.PathLike)) else [str(d) for d in data]


def trial(
    model,
    data,
    candidates,
    output="trial",
    *,
    steps: int = 200,
    batch_size: int = 8,
    block_size: int = 256,
    learning_rate: float = 3e-4,
    warmup_steps: float = 0.1,
    lr_scheduler_type: str = "constant_with_warmup",
    seed: int = 0,
    validation_fraction: float = 0.1,
    text_column: str = "text",
    revision: str | None = None,
    overwrite: bool = False,
    report=None,
    **training_args,
) -> dict:
    """Grow `model` with each candidate, train each for `steps` steps on the same blocks, and report the best.

    Args:
        model: the small model, a folder or a Hub id.
        data: training text (files, globs, a Hub dataset id), as for `hf-stack train --data`.
        candidates: growth settings, `"key=value,key=value"` strings (`"operator=zero,factor=4"`), `StackedConfig`s
            or dicts; each must differ from the others.
        output: the trial folder; it appears only once the whole trial is done.
        steps, batch_size, block_size: each candidate's optimizer steps, blocks per step and tokens per block.
        learning_rate, warmup_steps, lr_scheduler_type, seed: the same for every candidate (a constant rate after
            a 10% warmup by default: the start of a longer run, not an annealed one).
        validation_fraction: the share of blocks held out (as in `build_dataset`); every candidate is evaluated
            on these blocks right after growth and after its run.
        text_column: column of jsonl / parquet / Hub data.
        revision: Hub revision of `model`.
        overwrite: replace an existing `output`.
        report: called with one line of progress per candidate (e.g. `print`).
        training_args: further `StackingTrainingArguments` (e.g. `use_cpu=True`, `weight_decay=0.1`).

    Returns:
        The contents of `output/trial.json`: one row per candidate (`candidates`), the `best` row's name, the
        small model's held-out loss and the trial's `total_flops`.

    Example:

    ```python
    >>> from hf_stack import trial
    >>> result = trial("./small", "corpus/*.txt", ["factor=4", "factor=2", "operator=zero,factor=4"], "trial")  # doctest: +SKIP
    >>> result["best"]  # doctest: +SKIP
    'factor-4'
    ```

    Paper: https://arxiv.org/abs/2406.02469
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..checkpoints.folders import atomic_output_dir
    from ..checkpoints.in_memory import StackedModelForCausalLM
    from ..checkpoints.source import resolve_source
    from ..data import build_dataset, iter_documents
    from ..plans.plan import build_plan, check_source_shapes
    from ..training.accounting import count_parameters
    from ..training.arguments import StackingTrainingArguments
    from ..training.log import TRAINING_LOG
    from ..training.outputs import FLOPS_CONVENTION
    from ..training.trainer import StackingTrainer, check_run

    # Everything is checked before anything is written: the settings, each candidate's plan, the data.
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HfStackError(f"{name} must be a whole number of at least 1, got {value!r}")
    fixed = sorted(set(training_args) & set(_TRIAL_SETTINGS))
    if fixed:
        raise HfStackError(f"the trial sets {', '.join(fixed)} itself (the same for every candidate)")
    if not 0 < validation_fraction < 1:
        raise HfStackError(
            f"the trial needs held-out blocks: validation_fraction must be in (0, 1), got {validation_fraction}"
        )
    entries = parse_candidates(candidates, data)
    source = resolve_source(model, revision=revision)
    check_source_shapes(source.config, source.tensor_infos)
    seen = {}
    for text, _, cfg in entries:
        try:
            plan = build_plan(source.config, source.tensor_infos, cfg)
        except HfStackError as e:
            raise HfStackError(f"candidate {text!r}: {e}") from None
        settings = {k: v for k, v in cfg.to_dict().items() if k not in _PLAN_SPELLINGS}
        key = json.dumps([plan.to_dict(), settings], sort_keys=True, default=str)
        if key in seen:
            raise HfStackError(f"candidates {seen[key]!r} and {text!r} are the same growth; give each once")
        seen[key] = text
    for text, _, cfg in entries:  # learn reads its data at growth: a missing file should fail now, not then
        for src in (cfg.learn_data or "").split(","):
            if src.strip():
                try:
                    next(iter_documents([src.strip()]), None)
                except HfStackError as e:
                    raise HfStackError(f"candidate {text!r}: {e}") from None
    out, need = Path(output), steps * batch_size

    def arguments(folder: Path) -> StackingTrainingArguments:
        settings = dict(
            max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
            warmup_steps=warmup_steps, lr_scheduler_type=lr_scheduler_type, seed=seed, data_seed=seed,
            eval_strategy="steps", eval_steps=steps, eval_on_start=True, save_strategy="no", report_to=[],
            disable_tqdm=True,
        )  # fmt: skip
        return StackingTrainingArguments(str(folder), **{**settings, **training_args})

    # The context and the settings, as `hf-stack train` checks them (nothing is written).
    check_run(arguments(out / "_"), need, block_size, AutoConfig.from_pretrained(source.folder), None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
    except Exception as e:
        raise HfStackError(f"cannot load a tokenizer from {model}: {error_reason(e)}") from None
    train, held_out = build_dataset(
        _sources(data), tokenizer, block_size, seed=seed, max_tokens=need * block_size,
        validation_fraction=validation_fraction, text_column=text_column,
    )  # fmt: skip
    if len(train) < need:
        raise HfStackError(
            f"the data holds {len(train)} training blocks of {block_size} tokens (after the held-out "
            f"{validation_fraction:g}); a trial of {steps} steps x {batch_size} blocks needs {need}: add data or "
            "lower --steps, --batch-size or --block-size"
        )
    train = train.select(range(need))  # exactly the blocks every candidate trains on, in this order

    def quiet(trainer):
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        return trainer

    say = report or (lambda line: None)
    small = AutoModelForCausalLM.from_pretrained(source.folder, trust_remote_code=False)
    rows = []
    with atomic_output_dir(out, overwrite) as tmp:
        small_trainer = quiet(
            StackingTrainer(model=small, args=arguments(tmp), train_dataset=train, eval_dataset=held_out)
        )
        small_loss = small_trainer.evaluate()["eval_loss"]
        small_row = {"num_layers": small.config.num_hidden_layers, "num_parameters": count_parameters(small),
                     "held_out_loss": small_loss}  # fmt: skip
        del small_trainer, small
        say(f"small model: {small_row['num_layers']} layers, held-out loss {small_loss:.4f}")
        for i, (text, name, cfg) in enumerate(entries, 1):
            say(f"[{i}/{len(entries)}] {text}: growing, then {steps} steps")
            grown = StackedModelForCausalLM.from_small_pretrained(model, cfg, revision=revision)
            growth_flops = (grown.growth_record.get("learn") or {}).get("flops", 0.0)
            trainer = StackingTrainer(model=grown, args=arguments(tmp / name), train_dataset=train,
                                      eval_dataset=held_out, processing_class=tokenizer)  # fmt: skip
            quiet(trainer).train()
            log = json.loads((tmp / name / TRAINING_LOG).read_text())
            evals = [e for e in log["log_history"] if "eval_loss" in e]
            training = log["training"]
            phase = training["phases"][-1]
            row = {
                "name": name, "candidate": text, "settings": cfg.to_dict(),
                "num_layers": phase["num_layers"], "num_parameters": phase["num_parameters"],
                "hidden_size": grown.config.hidden_size,
                "loss_after_growth": evals[0]["eval_loss"], "loss_after_trial": evals[-1]["eval_loss"],
                "steps": phase["steps"], "tokens": training["total_tokens"],
                "training_flops": training["total_flops"], "growth_flops": growth_flops,
                "trial_flops": training["total_flops"] + growth_flops,
                "train_seconds": training["total_train_seconds"], "final": f"{name}/final",
            }  # fmt: skip
            if evals[0]["tokens"] != 0 or evals[-1]["tokens"] != row["tokens"]:
                raise RuntimeError(f"the held-out evaluations of {name} are not at the start and end of its run")
            rows.append(row)
            say(f"    {row['num_layers']} layers, loss {row['loss_after_growth']:.4f} after growth, "
                f"{row['loss_after_trial']:.4f} after the trial")  # fmt: skip
            del trainer, grown
            gc.collect()
        best = min(rows, key=lambda r: r["loss_after_trial"] if math.isfinite(r["loss_after_trial"]) else math.inf)
        for r in rows:
            r["best"] = r is best
        result = {
            "source": str(model),
            "small": small_row,
            "candidates": rows,
            "best": best["name"],
            "continue_with": f"hf-stack train --model {out / best['final']} --data ... --max-tokens ... -o run/",
            "protocol": {
                "steps": steps,
                "batch_size": batch_size,
                "block_size": block_size,
                "tokens_per_candidate": need * block_size,
                "train_blocks": need,
                "held_out_blocks": len(held_out),
                "validation_fraction": validation_fraction,
                "learning_rate": learning_rate,
                "warmup_steps": warmup_steps,
                "lr_scheduler_type": lr_scheduler_type,
                "seed": seed,
                "data": _sources(data),
            },
            "unigram_loss": log.get("baselines", {}).get("unigram_eval_loss"),
            "total_tokens": sum(r["tokens"] for r in rows),
            "total_flops": sum(r["trial_flops"] for r in rows),
            "flops_convention": FLOPS_NOTE + "; per run: " + FLOPS_CONVENTION,
        }
        (tmp / TRIAL_JSON).write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "output": str(out)}


def print_trial(result: dict) -> None:
    """The trial's table (one row per candidate, the best marked) and where to go from there."""
    from rich.console import Console
    from rich.table import Table

    p, small = result["protocol"], result["small"]
    table = Table(
        title=f"trial: {p['steps']} steps x {p['batch_size']} blocks x {p['block_size']} tokens each, the same blocks",
        caption=f"held-out loss on {p['held_out_blocks']} blocks; the small model ({small['num_layers']} layers): "
        f"{small['held_out_loss']:.4f}",
    )
    rows = [
        [str(r["num_layers"]), f"{r['num_parameters']:,}", f"{r['loss_after_growth']:.4f}",
         f"{r['loss_after_trial']:.4f}", f"{r['trial_flops']:.3g}", "best" if r["best"] else ""]
        for r in result["candidates"]
    ]  # fmt: skip
    table.add_column("candidate", overflow="fold")
    for i, col in enumerate(("layers", "params", "loss after growth", "loss after trial", "trial FLOPs", "")):
        # headers may wrap, numbers never shrink
        table.add_column(col, justify="right", min_width=max(len(row[i]) for row in rows))
    for r, cells in zip(result["candidates"], rows):
        table.add_row(r["name"], *cells, style="bold" if r["best"] else None)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: the whole table, not rich's default 80 columns
        console = Console(width=max(console.width, 120))
    console.print(table)
    best = next(r for r in result["candidates"] if r["best"])
    console.print(
        f"best: {best['name']} ({best['loss_after_trial']:.4f} after the trial). Its final/ is a normal model "
        f"folder; continue it as a normal training run:\n  hf-stack train --model {Path(result['output']) / best['final']} --data ... "
        f"--max-tokens ... -o run/",
        soft_wrap=True,
        highlight=False,
    )
    console.print(
        f"trial.json: {Path(result['output']) / TRIAL_JSON} (the whole trial cost {result['total_flops']:.3g} "
        "FLOPs: add them to the grown run's when counting a speed-up)",
        soft_wrap=True,
        highlight=False,
    )
