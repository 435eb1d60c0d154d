"""Standard checkpoint -> trainer: continued pre-training that can grow the model in the middle of the run.

The paper's recipe (Du et al., 2024, arXiv 2405.15319): train the small model for d tokens, grow it, then train
the grown model with a fresh AdamW and a re-warmed schedule on the data that follows. `StackingTrainer` runs the
two phases as two passes of the stock `Trainer` loop, so checkpoints, resuming, DDP and logging integrations are
transformers' own; it only adds the growth between them and token/FLOP accounting.

Folder layout of a run with growth:
    output_dir/small/checkpoint-*   phase 1 (small model) checkpoints, the last one at the growth step
    output_dir/grown-init/          the grown model right after growth (+ growth_config.json)
    output_dir/checkpoint-*         phase 2 (grown model) checkpoints
    output_dir/final/               the final model, tokenizer and growth_config.json with both phases
    output_dir/training_log.json    every logged step of both phases with tokens and FLOPs
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, default_data_collator
from transformers.trainer_callback import ProgressCallback, TrainerCallback

from .config import StackedConfig
from .errors import HfStackError
from .masks import GrowthMasks
from .timing import training_flops

RUN_CONFIG = "run_config.json"
GROWTH_STATE = "growth_state.json"
TRAINING_LOG = "training_log.json"


@dataclass
class StackingTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus growth inside the run. `learning_rate`, `warmup_steps` and the optimizer settings
    apply to the small model (phase 1); the `grown_*` fields to the grown model (phase 2)."""

    grow_at_tokens: float | None = field(
        default=None, metadata={"help": "Grow once this many training tokens have been seen (the paper's d)."}
    )
    max_tokens: float | None = field(
        default=None, metadata={"help": "Total training-token budget over both phases (sets max_steps)."}
    )
    stacked_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Growth settings: a StackedConfig, a dict or JSON like '{\"factor\": 4}' (default: G_stack, g=4)."
        },
    )
    grown_learning_rate: float | None = field(
        default=None, metadata={"help": "Peak learning rate after growth (default: learning_rate; the paper: 3e-4)."}
    )
    grown_warmup_steps: float | None = field(
        default=None, metadata={"help": "Warmup of the re-started schedule after growth (default: warmup_steps)."}
    )
    grown_lr_scheduler_type: str | None = field(
        default=None,
        metadata={
            "help": "Learning-rate schedule after growth, a transformers SchedulerType (default: lr_scheduler_type). "
            "E.g. a constant small phase (taken mid-schedule, as the paper's 10B-token checkpoint) and a "
            "cosine grown phase."
        },
    )
    grown_lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the schedule after growth, a dict or JSON (default: lr_scheduler_kwargs)."
        },
    )
    mask_steps: int = field(
        default=0,
        metadata={
            "help": "random operator: ramp the new layers and units in from 0 to 1 over this many steps after "
            "growth (MSG masks; 0: no masks)."
        },
    )
    carry_optimizer_state: bool = field(
        default=False,
        metadata={
            "help": "Carry AdamW moments over the growth, grown by the same plan (default: fresh, as the paper)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.grown_lr_scheduler_kwargs, str):
            try:
                self.grown_lr_scheduler_kwargs = json.loads(self.grown_lr_scheduler_kwargs)
            except json.JSONDecodeError:
                raise HfStackError(
                    f"grown_lr_scheduler_kwargs is not JSON: {self.grown_lr_scheduler_kwargs!r}"
                ) from None
        if self.grown_lr_scheduler_type is not None:
            from transformers.trainer_utils import SchedulerType

            try:
                SchedulerType(self.grown_lr_scheduler_type)
            except ValueError:
                names = ", ".join(t.value for t in SchedulerType)
                raise HfStackError(
                    f"unknown grown_lr_scheduler_type {self.grown_lr_scheduler_type!r}; choose one of {names}"
                ) from None
        if isinstance(self.stacked_config, str):
            try:
                self.stacked_config = json.loads(self.stacked_config)
            except json.JSONDecodeError:
                raise HfStackError(f"stacked_config is not JSON: {self.stacked_config!r}") from None
        if isinstance(self.stacked_config, dict):
            self.stacked_config = StackedConfig(**self.stacked_config)
        elif self.stacked_config is None:
            self.stacked_config = StackedConfig()
        for name in ("grow_at_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None:
                if not math.isfinite(value) or value <= 0:
                    raise HfStackError(f"{name} must be a positive number of tokens, got {value!r}")
                setattr(self, name, int(value))
        if self.carry_optimizer_state and (
            "width" in self.stacked_config.directions or self.stacked_config.operator in ("random", "learn")
        ):
            raise HfStackError(
                "carry_optimizer_state moves AdamW moments of copied tensors; it supports depth growth with the "
                "direct (stack) and zero operators only"
            )
        if self.mask_steps < 0:
            raise HfStackError(f"mask_steps must be 0 or more, got {self.mask_steps}")
        if self.mask_steps and (self.grow_at_tokens is None or self.stacked_config.operator != "random"):
            raise HfStackError(
                "mask_steps ramps in the new parts of growth inside the run: it needs grow_at_tokens and the "
                "random operator"
            )
        if self.grow_at_tokens is not None and self.max_tokens is not None and self.grow_at_tokens >= self.max_tokens:
            raise HfStackError(
                f"grow_at_tokens ({self.grow_at_tokens:.3g}) is beyond the budget max_tokens ({self.max_tokens:.3g}); "
                "grow earlier or train longer"
            )

    def to_dict(self):
        d = super().to_dict()
        if isinstance(self.stacked_config, StackedConfig):
            d["stacked_config"] = self.stacked_config.to_dict()
        return d


def count_parameters(model, embeddings: bool = True) -> int:
    """Unique parameters (tied weights once): the N of C = 6ND.

    Args:
        model: a transformers model.
        embeddings: count the token embedding and the output head (default). False gives the non-embedding count
            (Kaplan et al., 2020): the transformer blocks and final norm, the weights depth growth multiplies.
    """
    skip = set()
    if not embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                skip.update(p.data_ptr() for p in module.parameters())
    seen, n = set(skip), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return n


class StackingTrainer(Trainer):
    """A `Trainer` that grows the model when `args.grow_at_tokens` training tokens have been seen.

    Args:
        model: the small model (or an already grown one for plain continued pre-training).
        args: [`StackingTrainingArguments`].
        peft_config: optional `peft` config applied to the model that is trained after growth (or to the
            model itself when the run does not grow), e.g. LoRA or LLaMA-Pro style training of new layers only.
        All other arguments are `Trainer`'s.

    Example:

    ```python
    >>> from hf_stack import StackingTrainer, StackingTrainingArguments, StackedConfig
    >>> args = StackingTrainingArguments("run", grow_at_tokens=2e6, max_tokens=8e6, stacked_config=StackedConfig(factor=4))
    >>> StackingTrainer(model=small, args=args, train_dataset=packed).train()  # doctest: +SKIP
    ```
    """

    def __init__(self, model=None, args: StackingTrainingArguments | None = None, *pargs, peft_config=None, **kwargs):
        if args is not None and not isinstance(args, StackingTrainingArguments):
            raise HfStackError("StackingTrainer needs StackingTrainingArguments")
        self.peft_config = peft_config
        if peft_config is not None and args is not None and args.grow_at_tokens is None:
            model = _apply_peft(model, peft_config)
        # Packed blocks all have the same length: stack them, never pad.
        kwargs.setdefault("data_collator", default_data_collator)
        super().__init__(model, args, *pargs, **kwargs)
        self.phase = 1
        self.phase_start = {"tokens": 0, "flops": 0.0, "non_embedding_flops": 0.0, "train_seconds": 0.0}
        # The wall-clock currency counts training only, so that arms which evaluate more often, or on slower
        # validation sets, do not look slower: [start of training in this process, seconds spent evaluating since].
        self._clock = None
        self._eval_started = None
        self._phase_clock_start = 0.0
        self.add_callback(_ResumeClock(self))
        self._last_log = None
        self.masks = None  # MSG masks on the grown model while they ramp in (mask_steps)

    # -- data: sequential over the pre-shuffled packed blocks, so "the data that follows" is well defined.
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return torch.utils.data.SequentialSampler(dataset)

    def _block_size(self) -> int:
        return len(self.train_dataset[0]["input_ids"])

    def tokens_per_step(self) -> int:
        a = self.args
        return a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size * self._block_size()

    def _check_block_size(self):
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and self._block_size() > limit:
            raise HfStackError(
                f"block size {self._block_size()} is larger than the model's context ({limit} positions); "
                "use a smaller --block-size"
            )

    # -- accounting, added to every log entry (so it lands in trainer_state.json and report_to integrations)
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        tokens = self.phase_start["tokens"] + self.state.global_step * self.tokens_per_step()
        params = count_parameters(self.model)
        phase_tokens = tokens - self.phase_start["tokens"]
        flops = self.phase_start["flops"] + training_flops(params, phase_tokens)
        non_embedding = self.phase_start["non_embedding_flops"] + training_flops(
            count_parameters(self.model, embeddings=False), phase_tokens
        )
        now = time.perf_counter()
        extra = {"tokens": tokens, "flops": flops, "non_embedding_flops": non_embedding, "phase": self.phase,
                 "num_parameters": params, "train_seconds": round(self._phase_seconds(), 3)}  # fmt: skip
        if self.phase == 2 and self.args.mask_steps:
            extra["growth_mask"] = self.masks.value if self.masks is not None else 1.0
        if self._last_log is not None and now > self._last_log[1] and tokens > self._last_log[0]:
            extra["tokens_per_second"] = round((tokens - self._last_log[0]) / (now - self._last_log[1]), 1)
        self._last_log = (tokens, now)
        logs = {**logs, **extra}
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, ProgressCallback) and cb.training_bar is not None and "loss" in logs:
                cb.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=extra.get("tokens_per_second", "-"))
        super().log(logs, start_time)

    def train_seconds(self) -> float:
        """Wall-clock seconds of training in this process, growth included, evaluation excluded."""
        if self._clock is None:
            return 0.0
        now = self._eval_started or time.perf_counter()
        return now - self._clock[0] - self._clock[1]

    def _phase_seconds(self) -> float:
        """Training seconds of the run so far: earlier phases as recorded, this phase as measured."""
        return self.phase_start["train_seconds"] + self.train_seconds() - self._phase_clock_start

    def evaluate(self, *args, **kwargs):
        # Timed out of train_seconds. A dict of eval sets makes Trainer.evaluate call itself once per set: only the
        # outermost call counts.
        if self._eval_started is not None:
            return super().evaluate(*args, **kwargs)
        self._eval_started = started = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if self._clock is not None:
                self._clock[1] += time.perf_counter() - started
            self._eval_started = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        # MSG: the mask follows the optimizer step, so a resumed run continues the ramp where it stopped.
        if self.masks is not None:
            value = self.state.global_step / self.args.mask_steps
            if value >= 1:
                self.masks.remove()  # fully in: the plain model from here on
                self.masks = None
            else:
                self.masks.set(value)
        return super().training_step(model, inputs, num_items_in_batch)

    # -- the two phases
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        args = self.args
        out = Path(args.output_dir)
        self._check_block_size()
        tps = self.tokens_per_step()
        n_blocks = len(self.train_dataset)
        total_steps = self._total_steps(tps)
        grow_step = None if args.grow_at_tokens is None else math.ceil(args.grow_at_tokens / tps)
        if grow_step is not None and grow_step >= total_steps:
            raise HfStackError(
                f"growth at step {grow_step} ({args.grow_at_tokens:.3g} tokens at {tps} tokens/step) is not "
                f"before the end of training (step {total_steps})"
            )
        if grow_step is not None and args.mask_steps >= total_steps - grow_step:
            # The masks must reach 1 while training, or the saved (plain) model is not the one that was trained.
            raise HfStackError(
                f"mask_steps ({args.mask_steps}) must be fewer than the {total_steps - grow_step} steps after growth"
            )
        if grow_step is not None and grow_step * tps // self._block_size() > n_blocks:
            raise HfStackError(
                f"the data holds {n_blocks * self._block_size():,} tokens, fewer than grow_at_tokens; add data"
            )
        # All checks above run before anything is written.
        self._check_run_config(out, resume_from_checkpoint, tps, n_blocks)
        self._clock = [time.perf_counter(), 0.0]
        saved = {k: getattr(args, k) for k in ("output_dir", "max_steps", "learning_rate", "warmup_steps",
                                               "lr_scheduler_type", "lr_scheduler_kwargs")}  # fmt: skip
        full_dataset = self.train_dataset
        try:
            if grow_step is None:
                args.max_steps = total_steps
                result = Trainer.train(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            else:
                grown_init = out / "grown-init"
                if not (out / GROWTH_STATE).is_file():
                    args.output_dir, args.max_steps = str(out / "small"), grow_step
                    resume = _last_checkpoint(out / "small", resume_from_checkpoint)
                    Trainer.train(self, resume_from_checkpoint=resume, **kwargs)
                    self._save_checkpoint(self.model, trial=None)  # a checkpoint on the small side of the boundary
                    self._grow(out, grown_init, grow_step, tps)
                else:
                    self._load_grown(out, grown_init)
                # Phase 2: the grown model on the blocks that follow, fresh optimizer, re-warmed schedule.
                consumed = grow_step * tps // self._block_size()
                if consumed + (total_steps - grow_step) * tps // self._block_size() > n_blocks:
                    warnings.warn(
                        "the data runs out before max_tokens; the grown model will see blocks again", stacklevel=2
                    )
                self.train_dataset = _tail(full_dataset, consumed)
                args.output_dir, args.max_steps = str(out), total_steps - grow_step
                args.learning_rate = args.grown_learning_rate or saved["learning_rate"]
                if args.grown_warmup_steps is not None:
                    args.warmup_steps = args.grown_warmup_steps
                if args.grown_lr_scheduler_type is not None:
                    args.lr_scheduler_type = args.grown_lr_scheduler_type
                    args.lr_scheduler_kwargs = {}
                if args.grown_lr_scheduler_kwargs is not None:
                    args.lr_scheduler_kwargs = args.grown_lr_scheduler_kwargs
                resume = _last_checkpoint(out, resume_from_checkpoint)
                result = Trainer.train(self, resume_from_checkpoint=resume, **kwargs)
        finally:
            for k, v in saved.items():
                setattr(args, k, v)
            self.train_dataset = full_dataset
        self._finish(out, tps)
        return result

    def _save_checkpoint(self, model, trial) -> None:
        """transformers writes checkpoints in place; a checkpoint counts only once its trainer_state.json (written
        last) exists. A failed write (full disk) removes the partial folder and says which checkpoint is intact."""
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as e:
            if not _is_write_failure(e):
                raise
            shutil.rmtree(folder, ignore_errors=True)
            last = _last_checkpoint(folder.parent, True)
            raise HfStackError(
                f"the disk is full (or a file-size limit was hit) while writing {folder.name}; the partial folder "
                f"was removed and the last complete checkpoint is {last or 'none'}: free space and resume"
            ) from None

    def _total_steps(self, tps: int) -> int:
        if self.args.max_tokens is not None:
            return max(1, self.args.max_tokens // tps)
        if self.args.max_steps > 0:
            return self.args.max_steps
        raise HfStackError("set max_tokens (or max_steps): the token budget decides where training ends")

    def _check_run_config(self, out: Path, resume, tps: int, n_blocks: int) -> None:
        """Refuse to resume from, or write over, a folder that belongs to a different run."""
        args = self.args
        config = {
            "grow_at_tokens": args.grow_at_tokens,
            "max_tokens": args.max_tokens,
            "stacked_config": args.stacked_config.to_dict() if args.grow_at_tokens is not None else None,
            "tokens_per_step": tps,
            "num_blocks": n_blocks,
            "seed": args.seed,
            "model": {
                k: getattr(self.model.config, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size")
            },
        }
        path = out / RUN_CONFIG
        previous = json.loads(path.read_text()) if path.is_file() else None
        # Every process reads before process 0 writes, so they all judge the same folder.
        self.accelerator.wait_for_everyone()
        if previous is not None:
            if not resume:
                raise HfStackError(
                    f"{out} already holds a training run; resume it (--resume) or choose another folder"
                )
            diff = sorted(k for k in config if previous.get(k) != config[k])
            if diff:
                raise HfStackError(f"cannot resume from {out}: it belongs to another run ({', '.join(diff)} differ)")
        elif resume:
            raise HfStackError(f"nothing to resume in {out}: it holds no {RUN_CONFIG} from an hf_stack run")
        elif self.is_world_process_zero():
            out.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(path, config)

    def _grow(self, out: Path, grown_init: Path, grow_step: int, tps: int) -> None:
        from .convert import growth_record, write_growth_record
        from .modeling import grow_model

        small = self.accelerator.unwrap_model(self.model)
        grown, plan, learned = grow_model(small, self.args.stacked_config, self.processing_class)
        grown.to(self.args.device)
        phase1 = _phase_record(1, small, grow_step, tps, self._phase_seconds())
        phase1["num_layers"] = plan.source_num_layers
        new_optimizer = self._grown_optimizer(small, grown, plan) if self.args.carry_optimizer_state else None
        if self.args.mask_steps:
            self.masks = GrowthMasks(grown, plan)
        self._install_model(grown, phase1)
        self.optimizer, self.lr_scheduler = new_optimizer, None
        if self.is_world_process_zero():
            source = {"name_or_path": "in-run growth", "phase1": phase1}
            record = growth_record(plan, self.args.stacked_config, source, learned)
            tmp = grown_init.with_name(grown_init.name + ".tmp")
            self.accelerator.unwrap_model(self.model).save_pretrained(tmp)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(tmp)
            write_growth_record(tmp, record)
            if grown_init.exists():  # left by a run killed between this rename and the growth state below
                shutil.rmtree(grown_init)
            os.replace(tmp, grown_init)
            # Written last: its presence means the growth is complete and phase 2 may resume from it.
            _write_json_atomic(out / GROWTH_STATE, {"phase1": phase1, "growth": record})
        self.accelerator.wait_for_everyone()

    def _load_grown(self, out: Path, grown_init: Path) -> None:
        from transformers import AutoModelForCausalLM

        from .modeling import plan_for_model

        state = json.loads((out / GROWTH_STATE).read_text())
        small = self.accelerator.unwrap_model(self.model)
        # A growth state written before non-embedding FLOPs were counted: count them from the small model.
        state["phase1"].setdefault(
            "non_embedding_flops", training_flops(count_parameters(small, embeddings=False), state["phase1"]["tokens"])
        )
        grown = AutoModelForCausalLM.from_pretrained(grown_init, dtype=self.model.dtype, trust_remote_code=False)
        if self.args.mask_steps:
            self.masks = GrowthMasks(grown, plan_for_model(small, self.args.stacked_config))
        self._install_model(grown.to(self.args.device).train(), state["phase1"])
        self.optimizer, self.lr_scheduler = None, None

    def _install_model(self, grown, phase1: dict) -> None:
        if self.peft_config is not None:
            grown = _apply_peft(grown, self.peft_config)
        self.model = self.model_wrapped = grown
        self.phase = 2
        self.phase_start = {k: phase1.get(k, 0.0) for k in ("tokens", "flops", "non_embedding_flops")}
        self.phase_start["train_seconds"] = phase1.get("train_seconds", 0.0)
        self._phase_clock_start = self.train_seconds()
        self.phase1 = phase1

    def _grown_optimizer(self, small, grown, plan):
        """A new AdamW over the grown parameters whose moments are the small model's, moved by the plan."""
        old_state = self.optimizer.state if self.optimizer is not None else {}
        old_by_name = {n: old_state.get(p, {}) for n, p in small.named_parameters()}
        self.optimizer = None
        self.model = grown
        optimizer = self.create_optimizer()
        params = dict(grown.named_parameters())
        for entry in plan.tensors:
            if entry.target not in params or not old_by_name.get(entry.source):
                continue
            src = old_by_name[entry.source]
            optimizer.state[params[entry.target]] = {
                k: (torch.zeros_like(v) if entry.op == "zero" and v.ndim else v.clone()).to(
                    params[entry.target].device
                )
                for k, v in src.items()
            }
        return optimizer

    def _unigram_baseline(self) -> float | None:
        """The validation loss of unigram frequencies, the floor `hf-stack compare`'s health check reads."""
        from .data import unigram_loss

        evaluation = self.eval_dataset
        if evaluation is None or isinstance(evaluation, dict) or not hasattr(evaluation, "with_format"):
            return None
        if not hasattr(self.train_dataset, "with_format") or "input_ids" not in evaluation.column_names:
            return None
        vocab = getattr(self.accelerator.unwrap_model(self.model).config, "vocab_size", None)
        return round(unigram_loss(self.train_dataset, evaluation, vocab), 6)

    def _finish(self, out: Path, tps: int) -> None:
        if self.is_world_process_zero():
            self._write_final(out, tps)
        self.accelerator.wait_for_everyone()

    def _write_final(self, out: Path, tps: int) -> None:
        from .convert import write_growth_record

        final = out / "final"
        tmp = out / "final.tmp"
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(tmp)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(tmp)
        phases = []
        if self.phase == 2:
            phases.append(self.phase1)
        seconds = self.train_seconds() - self._phase_clock_start
        phases.append(_phase_record(self.phase, model, self.state.global_step, tps, seconds))
        phases[-1]["num_layers"] = model.config.num_hidden_layers
        training = {
            "phases": phases,
            "total_tokens": sum(p["tokens"] for p in phases),
            "total_flops": sum(p["flops"] for p in phases),
            "total_non_embedding_flops": sum(p.get("non_embedding_flops", 0.0) for p in phases),
            "total_train_seconds": round(sum(p.get("train_seconds", 0.0) for p in phases), 3),
            "flops_convention": "6 N D per phase, N = all parameters (embeddings included, tied weights once); "
            "non_embedding_flops: N without the token embedding and output head; train_seconds: wall-clock of "
            "training in this process, evaluation excluded",
        }
        record = {}
        if (out / GROWTH_STATE).is_file():
            record = json.loads((out / GROWTH_STATE).read_text())["growth"]
        write_growth_record(tmp, {**record, "training": training})
        # Phase 1's log lives in its last checkpoint; the current phase's in self.state (restored on resume).
        history = _read_history(out / "small") if self.phase == 2 else []
        history += [e for e in self.state.log_history if "tokens" in e]
        log = {"training": training, "log_history": history}
        baseline = self._unigram_baseline()
        if baseline is not None:
            log["baselines"] = {"unigram_eval_loss": baseline}
        _write_json_atomic(out / TRAINING_LOG, log)
        plot = None
        if any("loss" in e for e in history):
            from .compare import plot as plot_curves
            from .compare import read_curve

            plot_curves([read_curve(out, "loss")], tmp / "training_loss.png", title="training loss (dotted: growth)")
            plot = "training_loss.png"
        from .card import training_section, update_card

        update_card(
            tmp, repo_id=out.resolve().name, sections={"training": training_section(training, plot)}, figure=True
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


class _ResumeClock(TrainerCallback):
    """A resumed phase continues the training seconds its checkpoint logged instead of restarting them at zero
    (the state, with its log, is restored before on_train_begin)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        logged = [e["train_seconds"] for e in state.log_history if e.get("phase") == t.phase and "train_seconds" in e]
        if logged:
            t._phase_clock_start = t.phase_start["train_seconds"] + t.train_seconds() - logged[-1]


def _phase_record(phase: int, model, steps: int, tps: int, seconds: float) -> dict:
    """One phase's accounting: its parameters, steps, tokens, FLOPs in both conventions and training seconds."""
    params, tokens = count_parameters(model), steps * tps
    return {"phase": phase, "num_parameters": params, "steps": steps, "tokens": tokens,
            "flops": training_flops(params, tokens),
            "non_embedding_flops": training_flops(count_parameters(model, embeddings=False), tokens),
            "train_seconds": round(seconds, 3)}  # fmt: skip


def _is_write_failure(e: BaseException | None) -> bool:
    """A full disk or file-size limit; torch.save reports it as RuntimeError ("iostream error", "unexpected pos")
    rather than OSError(ENOSPC), so the exception chain is searched."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and any(
            m in str(e) for m in ("iostream error", "unexpected pos", "failed writing")
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def _tail(dataset, start: int):
    """The blocks from `start` on (what follows the small model's data)."""
    if hasattr(dataset, "select"):
        return dataset.select(range(start, len(dataset)))
    return torch.utils.data.Subset(dataset, range(start, len(dataset)))


def _apply_peft(model, peft_config):
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


def _last_checkpoint(folder: Path, resume) -> str | None:
    """The newest *complete* checkpoint (one whose trainer_state.json, written last, exists) in `folder`."""
    if not resume:
        return None
    if isinstance(resume, (str, os.PathLike)) and resume is not True:
        return str(resume)
    if not folder.is_dir():
        return None
    complete = [
        p for p in folder.glob("checkpoint-*") if p.name[11:].isdigit() and (p / "trainer_state.json").is_file()
    ]
    for partial in folder.glob("checkpoint-*"):
        if partial not in complete and partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)  # killed mid-write: never resume from it
    return str(max(complete, key=lambda p: int(p.name[11:]))) if complete else None


def _read_history(small_dir: Path) -> list[dict]:
    last = _last_checkpoint(small_dir, True)
    if last is None:
        return []
    state = json.loads((Path(last) / "trainer_state.json").read_text())
    return [e for e in state.get("log_history", []) if "tokens" in e]


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def run_training(cli, args: StackingTrainingArguments) -> dict:
    """What `hf-stack train` does: load the model and tokenizer, pack the data, train, return the summary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

    from .data import build_dataset
    from .io import resolve_source

    name = cli.model or cli.from_scratch_like
    # resolve_source validates the folder or Hub id (no remote code, safetensors) before anything heavy runs.
    source = resolve_source(name, revision=cli.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cli.tokenizer or source.folder)
    except Exception as e:
        raise HfStackError(f"cannot load a tokenizer from {cli.tokenizer or name}: {type(e).__name__}: {e}") from None
    # Data first: bad data should fail before the model is loaded.
    train, validation = build_dataset(
        cli.data, tokenizer, cli.block_size, seed=args.seed, max_tokens=args.max_tokens,
        validation_fraction=cli.validation_fraction, text_column=cli.text_column,
    )  # fmt: skip
    set_seed(args.seed)
    if cli.from_scratch_like:
        config = AutoConfig.from_pretrained(source.folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.folder, trust_remote_code=False)
    if validation is not None and args.eval_strategy == "no":
        args.eval_strategy, args.eval_steps = "steps", args.eval_steps or args.logging_steps
    peft_config = None
    if cli.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cli.lora_r, lora_alpha=2 * cli.lora_r, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    trainer = StackingTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=validation, processing_class=tokenizer,
        peft_config=peft_config,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=cli.resume or None)
    summary = json.loads((Path(args.output_dir) / TRAINING_LOG).read_text())["training"]
    return {**summary, "final": str(Path(args.output_dir) / "final")}
