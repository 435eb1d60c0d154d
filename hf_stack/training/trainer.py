"""Stage 3, training: continued pre-training that can grow the model in the middle of the run.

The paper's recipe (Du et al., 2024, arXiv 2405.15319): train the small model for d tokens, grow it, then train
the grown model with a fresh AdamW and a re-warmed schedule on the data that follows. `StackingTrainer` runs the
two phases as two passes of the stock `Trainer` loop, so checkpoints, resuming, DDP and logging integrations are
transformers' own; it overrides only what growth changes (the phases, the accounting in `log`, the sampler). The
run folder's layout and bookkeeping are `hf_stack.training.run_folder`, the final outputs
`hf_stack.training.outputs`, the MSG ramp a callback in `hf_stack.training.msg`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from transformers import Trainer, default_data_collator
from transformers.trainer_callback import ProgressCallback, TrainerCallback, TrainerState

from ..checkpoints.in_memory import grow_model, live_state, plan_for_model
from ..checkpoints.models import every_parameter_sharded, is_sharded
from ..checkpoints.provenance import growth_record, write_growth_record
from ..errors import HfStackError
from ..operators import get_operator
from ..plans.plan import layout_of, resolve_layer_map
from ..plans.timing import training_flops
from ..plans.width import grow_width_config, width_dims
from .accounting import count_parameters, model_flops, phase_record
from .arguments import StackingTrainingArguments
from .ladder import branch_summary, cooldown_dir, cooldown_ladder
from .log import TRAINING_LOG
from .msg import GrowthMasks, MaskRamp, check_maskable
from .outputs import training_summary, write_final_outputs
from .run_folder import (
    carried_optimizer,
    check_run_config,
    complete_checkpoints,
    init_dir,
    is_write_failure,
    last_checkpoint,
    phase_dir,
    read_growth_state,
    read_history,
    resume_point,
    write_growth_state,
)
from .sharded import full_state_dict, grow_sharded


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
        if peft_config is not None and args is not None and not args.growths:
            model = _apply_peft(model, peft_config)
        # Packed blocks all have the same length: stack them, never pad.
        kwargs.setdefault("data_collator", default_data_collator)
        self._new_folder = args is not None and not Path(args.output_dir).exists()
        super().__init__(model, args, *pargs, **kwargs)
        flag = requested_sharding(self.args)
        honoured = {"--fsdp": self.is_fsdp_enabled, "--deepspeed": self.is_deepspeed_enabled}
        if flag is not None and not honoured[flag]:
            # transformers and accelerate drop it without a word (e.g. on CPUs) and train full replicas with DDP
            self._refuse(
                f"{flag} was asked for, but accelerate does not shard on this machine "
                f"({self.accelerator.distributed_type.value.lower()}, no GPUs or --use-cpu): it would train full "
                "replicas; remove it, or run on GPUs"
            )
        self.phase = 1
        self.phase_start = {"tokens": 0, "flops": 0.0, "non_embedding_flops": 0.0, "train_seconds": 0.0}
        # The wall-clock currency counts training only, so that arms which evaluate more often, or on slower
        # validation sets, do not look slower: [start of training in this process, seconds spent evaluating since].
        self._clock = None
        self._eval_started = None
        self._phase_clock_start = 0.0
        self.add_callback(_ResumeClock(self))
        self._last_log = None
        self.completed_phases: list[dict] = []  # accounting of the phases before the current one
        # cooldown ladders (set in train): the rungs, finished branches' summaries; the unigram floor, counted once
        self._ladder, self._cooldowns, self._full_train_dataset, self._baseline = [], [], None, None
        self._data_tokens = 0  # tokens in the run's training data (set in train)
        # MSG masks on the grown model while they ramp in (mask_steps)
        self.mask_ramp = MaskRamp(args.mask_steps) if args is not None and args.mask_steps else None
        if self.mask_ramp is not None:
            self.add_callback(self.mask_ramp)

    def _check_first_growth(self, stacked) -> None:
        """What the first growth would refuse, found before anything is written (later growths start from its
        output): its plan for the model as it will grow, and MSG's masks on that plan. A sharded model grows as
        transformers holds it (e.g. experts fused); an unsharded one through `live_state`."""
        small = self.accelerator.unwrap_model(self.model)
        try:
            plan = plan_for_model(small, stacked, None if self.is_fsdp_enabled else live_state(small, stacked))
        except HfStackError as e:
            if not self.is_fsdp_enabled:
                self._refuse(str(e))
            self._refuse(
                f"the growth cannot run inside this --fsdp run: {e} (a sharded model grows as transformers holds "
                "it, e.g. with experts fused); grow between two runs (`hf-stack grow run/final ... -o grown`), "
                "which reads the checkpoint's own layout"
            )
        if self.mask_ramp is not None:
            try:
                check_maskable(plan)
            except HfStackError as e:
                self._refuse(str(e))

    def _refuse(self, message: str) -> None:
        """Stop before anything is written: the output folder Trainer made on process zero goes if it is new and
        still empty."""
        if self._new_folder and self.args.should_save:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                Path(self.args.output_dir).rmdir()
        raise HfStackError(message) from None

    # -- data: sequential over the pre-shuffled packed blocks, so "the data that follows" is well defined.
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return torch.utils.data.SequentialSampler(dataset)

    def _block_size(self) -> int:
        return len(self.train_dataset[0]["input_ids"])

    def tokens_per_step(self) -> int:
        a = self.args
        return a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size * self._block_size()

    # -- accounting, added to every log entry (so it lands in trainer_state.json and report_to integrations)
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        tokens = self.phase_start["tokens"] + self.state.global_step * self.tokens_per_step()
        params = count_parameters(self.model)
        phase_tokens = tokens - self.phase_start["tokens"]
        flops = self.phase_start["flops"] + model_flops(self.model, phase_tokens)
        non_embedding = self.phase_start["non_embedding_flops"] + model_flops(
            self.model, phase_tokens, embeddings=False
        )
        now = time.perf_counter()
        extra = {"tokens": tokens, "flops": flops, "non_embedding_flops": non_embedding, "phase": self.phase,
                 "num_parameters": params, "train_seconds": round(self._phase_seconds(), 3)}  # fmt: skip
        if self._data_tokens:  # passes over the run's data (Trainer's own `epoch` counts the phase's blocks)
            extra["data_epoch"] = self._data_epoch(tokens)
        if self.phase == 2 and self.args.mask_steps:
            extra["growth_mask"] = self.mask_ramp.value
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
        with self.outside_training_clock():
            return super().evaluate(*args, **kwargs)

    @contextlib.contextmanager
    def outside_training_clock(self):
        """Time spent inside is not training (evaluation, benchmarks in the loop): kept out of `train_seconds`.
        Nested uses (a dict of eval sets makes Trainer.evaluate call itself once per set) count once."""
        if self._eval_started is not None:
            yield
            return
        self._eval_started = started = time.perf_counter()
        try:
            yield
        finally:
            if self._clock is not None:
                self._clock[1] += time.perf_counter() - started
            self._eval_started = None

    # -- the phases: the small model, then one phase after each growth
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        args = self.args
        out = self._run_dir = Path(args.output_dir)
        model_config = self.accelerator.unwrap_model(self.model).config
        args.check_growth()  # stacked_config may have been replaced since the arguments were built
        if args.growths and (self.is_fsdp_enabled or self.mask_ramp is not None):
            self._check_first_growth(args.growths[0]["stacked_config"])
        tps, total_steps, grow_steps = check_run(
            args, len(self.train_dataset), self._block_size(), model_config, resume_from_checkpoint,
            write=self.is_world_process_zero(), wait=self.accelerator.wait_for_everyone,
            peft=self.peft_config is not None,
        )  # fmt: skip
        n_blocks = len(self.train_dataset)
        self._data_tokens = n_blocks * self._block_size()
        if total_steps * tps > self._data_tokens:
            out_at = self._data_tokens // tps + 1
            phase = 1 + sum(out_at > g for g in grow_steps)
            warnings.warn(
                f"the training data ({self._data_tokens:,} tokens) runs out at step {out_at} (phase {phase}): the run "
                f"trains on it {total_steps * tps / self._data_tokens:.2f} times (data_epoch in the log)", stacklevel=2
            )  # fmt: skip
        self._clock = [time.perf_counter(), 0.0]
        saved = {k: getattr(args, k) for k in ("output_dir", "max_steps", "learning_rate", "warmup_steps",
                                               "lr_scheduler_type", "lr_scheduler_kwargs")}  # fmt: skip
        full_dataset = self.train_dataset
        growths = len(grow_steps)
        bounds = [0, *grow_steps, total_steps]  # phase p trains steps bounds[p - 1] to bounds[p]
        self._ladder = run_ladder(args, tps, grow_steps, total_steps)
        self._cooldowns = []
        self._full_train_dataset = full_dataset
        try:
            if not growths:
                self.train_dataset = _phase_blocks(full_dataset, 0, total_steps * tps // self._block_size())
                result = self._train_last_phase(out, 0, total_steps, resume_from_checkpoint, growths, tps, kwargs)
            state = read_growth_state(out)
            done = len(state["growths"]) if growths else 0
            if done:
                # Before loading: a carried optimizer takes its base learning rate from the settings it is built with.
                self._use_phase_settings(done + 1, saved)
                self._load_grown(out, state, growths)
            for phase in range(done + 1, growths + 2) if growths else ():
                # Each phase: its model on the blocks that follow, fresh optimizer (unless carried), its schedule.
                steps = bounds[phase] - bounds[phase - 1]
                self.train_dataset = _phase_blocks(
                    full_dataset, bounds[phase - 1] * tps // self._block_size(), steps * tps // self._block_size()
                )
                self._use_phase_settings(phase, saved)
                folder = phase_dir(out, phase, growths)
                args.output_dir, args.max_steps = str(folder), steps
                resume = resume_from_checkpoint
                if isinstance(resume, (str, os.PathLike)) and Path(resume).parent != folder:
                    resume = True  # a checkpoint path given for another phase: this one resumes from its own folder
                if phase == growths + 1:
                    result = self._train_last_phase(out, bounds[-2], steps, resume, growths, tps, kwargs)
                else:
                    result = Trainer.train(self, resume_from_checkpoint=last_checkpoint(folder, resume), **kwargs)
                if phase <= growths:
                    self._save_checkpoint(self.model, trial=None)  # a checkpoint on the small side of the boundary
                    self._use_phase_settings(phase + 1, saved)
                    self._grow(out, phase, steps, tps, growths)
        finally:
            for k, v in saved.items():
                setattr(args, k, v)
            self.train_dataset = full_dataset
        self._finish(out, out, tps, growths)
        return result

    def _train_last_phase(self, out: Path, offset: int, steps: int, resume, growths: int, tps: int, kwargs: dict):
        """The last phase: to the end of its schedule, or, with `cooldown_budgets`, the stable run to the largest
        budget's decay start and then one cooldown branch per budget (see `hf_stack.training.ladder`)."""
        args = self.args
        if not self._ladder:
            args.max_steps = steps
            return Trainer.train(self, resume_from_checkpoint=last_checkpoint(out, resume) if growths else resume,
                                 **kwargs)  # fmt: skip
        # Phase-local steps: a phase's Trainer counts its own steps from 0.
        rungs = [{**r, "start": r["decay_start"] - offset, "end": r["steps"] - offset} for r in self._ladder]
        warmup = rungs[0]["warmup_steps"]
        ladder = _LadderCallback(can_evaluate=self.eval_dataset is not None)
        self.add_callback(ladder)
        result = None
        try:
            args.warmup_steps = warmup
            stable = complete_checkpoints(out) if resume else {}
            if rungs[-1]["start"] not in stable:
                ladder.save_at = {r["start"] for r in rungs}
                args.max_steps = rungs[-1]["start"]
                args.lr_scheduler_type, args.lr_scheduler_kwargs = "constant_with_warmup", {}
                self.lr_scheduler = None
                begin = max((k for k in stable if k <= rungs[-1]["start"]), default=None)
                result = Trainer.train(self, resume_from_checkpoint=stable.get(begin), **kwargs)
                ladder.save_at = set()
            self.accelerator.wait_for_everyone()  # every decay-start checkpoint is whole before any branch reads it
            for i, rung in enumerate(rungs):
                largest = i == len(rungs) - 1
                dest = cooldown_dir(out, rung, largest)
                if not largest and (dest / "final").is_dir() and (dest / TRAINING_LOG).is_file():
                    log = json.loads((dest / TRAINING_LOG).read_text())
                    self._cooldowns.append(branch_summary(rung, log, dest.name))
                    continue
                own = {k: p for k, p in complete_checkpoints(dest).items() if k > rung["start"]}
                begin = own[max(own)] if own else str(out / f"checkpoint-{rung['start']}")
                args.output_dir, args.max_steps = str(dest), rung["end"]
                args.lr_scheduler_type = "warmup_stable_decay"
                # stable steps: max_steps - warmup - decay, i.e. up to this rung's decay start
                args.lr_scheduler_kwargs = {"num_decay_steps": rung["cooldown_steps"], "decay_type": args.cooldown_type,
                                            "min_lr_ratio": args.cooldown_min_lr_rate}  # fmt: skip
                self.optimizer = self.lr_scheduler = None  # both restored from the decay start's checkpoint
                self._last_log = None
                if own and max(own) >= rung["end"]:
                    # trained to its end, stopped before its outputs: read its state back (Trainer would take a step)
                    self._load_from_checkpoint(begin)
                    self.state = TrainerState.load_from_json(os.path.join(begin, "trainer_state.json"))
                    self._resume_clock(self.state)
                else:
                    result = Trainer.train(self, resume_from_checkpoint=begin, **kwargs)
                if not largest:
                    self._finish(dest, out, tps, growths)
                    if self.is_world_process_zero():
                        log = json.loads((dest / TRAINING_LOG).read_text())
                        self._cooldowns.append(branch_summary(rung, log, dest.name))
        finally:
            self.remove_callback(ladder)
            args.output_dir = str(out)
        return result

    def _resume_clock(self, state) -> None:
        """A resumed phase continues the training seconds its checkpoint logged instead of restarting them at zero."""
        logged = [
            e["train_seconds"] for e in state.log_history if e.get("phase") == self.phase and "train_seconds" in e
        ]
        if logged:
            self._phase_clock_start = self.phase_start["train_seconds"] + self.train_seconds() - logged[-1]

    def _use_phase_settings(self, phase: int, first: dict) -> None:
        """The learning rate, warmup and schedule of `phase` (see `StackingTrainingArguments.phase_settings`)."""
        for k, v in self.args.phase_settings(phase, first).items():
            setattr(self.args, k, v)

    def _save_checkpoint(self, model, trial) -> None:
        """transformers writes checkpoints in place; a checkpoint counts only once its trainer_state.json (written
        last) parses and its weights are whole (`run_folder.complete_checkpoints`). A failed write (full disk)
        removes the partial folder and says which checkpoint is intact."""
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as e:
            if not is_write_failure(e):
                raise
            shutil.rmtree(folder, ignore_errors=True)
            point = resume_point(self._run_dir, len(self.args.growths))
            raise HfStackError(
                f"the disk is full (or a file-size limit was hit) while writing {folder.name}; the partial folder "
                f"was removed. Free space and run again with --resume: it continues from {point}"
            ) from None

    def _grow(self, out: Path, growth: int, steps: int, tps: int, growths: int) -> None:
        """Growth number `growth` (1-based), after a phase of `steps` steps."""
        small = self.accelerator.unwrap_model(self.model)
        stacked = self.args.growths[growth - 1]["stacked_config"]
        finished_parallelism = parallelism(self)
        if self.is_fsdp_enabled:  # FSDP2 (check_strategy): grown on rank 0, sharded, loaded by broadcast
            # the small model's Adam moments are not carried under FSDP: freed before the grown model is built, and
            # accelerate's lists of prepared objects emptied, so the next phase prepares anew
            self.optimizer = self.lr_scheduler = None
            self.accelerator.free_memory()
            grown, plan = grow_sharded(small, stacked, self._shard)
            learned, grown_state = None, full_state_dict(grown)  # what grown-init/ saves: rank 0's one full copy
        else:
            grown, plan, learned = grow_model(small, stacked, self.processing_class)
            grown, grown_state = grown.to(self.args.device), None
        seconds = self._phase_seconds() - self.phase_start["train_seconds"]
        finished = self._phase_record(growth, small, steps, tps, seconds)
        finished["num_layers"] = plan.source_num_layers
        finished["parallelism"] = finished_parallelism
        if learned is not None:  # LiGO's maps were trained at growth: their compute is part of the run's
            finished["growth_flops"] = learned["flops"]
            finished["growth_non_embedding_flops"] = learned["non_embedding_flops"]
        new_optimizer = self._grown_optimizer(small, grown, plan) if self.args.carry_optimizer_state else None
        phases = [*self.completed_phases, finished]
        if self.is_world_process_zero():  # the plain grown model, before masks or PEFT adapters wrap it
            source = {"name_or_path": "in-run growth", "growth": growth, "after_phase": finished}
            record = growth_record(plan, stacked, source, learned)
            grown_init = init_dir(out, growth, growths)
            tmp = grown_init.with_name(grown_init.name + ".tmp")
            grown.save_pretrained(tmp, state_dict=grown_state)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(tmp)
            write_growth_record(tmp, record)
            if new_optimizer is not None:  # so a run killed before the next checkpoint resumes with them
                torch.save(new_optimizer.state_dict(), carried_optimizer(out, growth))
            if grown_init.exists():  # left by a run killed between this rename and the growth state below
                shutil.rmtree(grown_init)
            os.replace(tmp, grown_init)
            # Written last: its presence means the growth is complete and the next phase may resume from it.
            state = read_growth_state(out)
            write_growth_state(out, phases, [*state["growths"][: growth - 1], record])
        if self.mask_ramp is not None:
            self.mask_ramp.start(GrowthMasks(grown, plan))
        del grown_state
        self._install_model(grown, phases)
        self.optimizer, self.lr_scheduler = new_optimizer, None
        self.accelerator.wait_for_everyone()

    def _shard(self, model) -> None:
        """Shard `model` (on the meta device) as accelerate prepared the run's first model, with its FSDP plugin's
        settings: activation checkpointing first (accelerate's prepare applies it only to a model not yet sharded),
        then `fully_shard`; `grow_sharded` then loads the weights by broadcast, so the plugin's own loading is
        skipped. (Compilation, when configured, is applied by the next phase's prepare, as to the first model.)"""
        from accelerate.utils.fsdp_utils import fsdp2_apply_ac, fsdp2_prepare_model

        plugin = self.accelerator.state.fsdp_plugin
        if plugin.activation_checkpointing:
            fsdp2_apply_ac(self.accelerator, model)
        efficient, plugin.cpu_ram_efficient_loading = plugin.cpu_ram_efficient_loading, False
        try:
            fsdp2_prepare_model(self.accelerator, model)
        finally:
            plugin.cpu_ram_efficient_loading = efficient

    def _load_grown(self, out: Path, state: dict, growths: int) -> None:
        from transformers import AutoModelForCausalLM

        done = len(state["growths"])
        small = self.accelerator.unwrap_model(self.model)
        for phase in state["phases"]:  # a growth state written before non-embedding FLOPs were counted (one growth)
            phase.setdefault(
                "non_embedding_flops", training_flops(count_parameters(small, embeddings=False), phase["tokens"])
            )
        grown_init = init_dir(out, done, growths)
        grown = AutoModelForCausalLM.from_pretrained(grown_init, dtype=self.model.dtype, trust_remote_code=False)
        if self.mask_ramp is not None:  # one growth only: the small model is the one it grew from
            stacked = self.args.growths[0]["stacked_config"]
            self.mask_ramp.start(GrowthMasks(grown, plan_for_model(small, stacked)))
        self._install_model(grown.to(self.args.device).train(), state["phases"])
        self.optimizer, self.lr_scheduler = None, None
        if self.args.carry_optimizer_state:
            # The moments carried at growth; a checkpoint of the phase, when there is one, replaces them as Trainer
            # resumes.
            self.optimizer = self.create_optimizer()
            saved = torch.load(carried_optimizer(out, done), map_location=self.args.device, weights_only=True)
            self.optimizer.load_state_dict(saved)

    def _phase_record(self, phase: int, model, steps: int, tps: int, seconds: float) -> dict:
        """The phase's accounting, with the passes over the run's data at its end (`data_epoch`)."""
        record = phase_record(phase, model, steps, tps, seconds)
        if self._data_tokens:
            record["data_epoch"] = self._data_epoch(self.phase_start["tokens"] + record["tokens"])
        return record

    def _data_epoch(self, tokens: int) -> float:
        """Passes over the run's training data after `tokens` of the run."""
        return round(tokens / self._data_tokens, 4)

    def _install_model(self, grown, phases: list[dict]) -> None:
        """The grown model in place for the phase after `phases`, its accounting starting where theirs ends."""
        if self.peft_config is not None:
            grown = _apply_peft(grown, self.peft_config)
        self.model = self.model_wrapped = grown
        self.phase = len(phases) + 1
        self.phase_start = {
            "tokens": sum(p["tokens"] for p in phases),
            "flops": sum(p["flops"] + p.get("growth_flops", 0.0) for p in phases),
            "non_embedding_flops": sum(p["non_embedding_flops"] + p.get("growth_non_embedding_flops", 0.0) for p in phases),
            "train_seconds": sum(p.get("train_seconds", 0.0) for p in phases),
        }  # fmt: skip
        self._phase_clock_start = self.train_seconds()
        self.completed_phases = phases

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

    def _eval_blocks(self):
        """The eval set when it is packed blocks (a `datasets.Dataset` with `input_ids`), else None."""
        evaluation = self.eval_dataset
        if evaluation is None or isinstance(evaluation, dict) or not hasattr(evaluation, "with_format"):
            return None
        return evaluation if "input_ids" in evaluation.column_names else None

    def _unigram_baseline(self) -> float | None:
        """The validation loss of unigram frequencies, the floor `hf-stack compare`'s health check reads (counted
        on all of the run's training data, whichever phase or branch asks)."""
        from ..data import unigram_loss

        train = self.train_dataset if self._full_train_dataset is None else self._full_train_dataset
        evaluation = self._eval_blocks()
        if evaluation is None or not hasattr(train, "with_format"):
            return None
        if self._baseline is None:
            vocab = getattr(self.accelerator.unwrap_model(self.model).config, "vocab_size", None)
            self._baseline = round(unigram_loss(train, evaluation, vocab), 6)
        return self._baseline

    def _finish(self, dest: Path, out: Path, tps: int, growths: int) -> None:
        """The final outputs of the run (`dest` is `out`) or of one of its cooldown branches (`dest` inside it)."""
        # a sharded model is gathered by every rank, onto rank 0, which writes it
        state = full_state_dict(self.model) if is_sharded(self.model) else None
        if self.is_world_process_zero():
            self._write_final(dest, out, tps, growths, state)
        del state
        self.accelerator.wait_for_everyone()

    def _write_final(self, dest: Path, out: Path, tps: int, growths: int, state: dict | None) -> None:
        model = self.accelerator.unwrap_model(self.model)
        seconds = self._phase_seconds() - self.phase_start["train_seconds"]
        phases = [*self.completed_phases, self._phase_record(self.phase, model, self.state.global_step, tps, seconds)]
        phases[-1]["num_layers"] = model.config.num_hidden_layers
        phases[-1]["parallelism"] = parallelism(self)
        # Earlier phases' logs live in their last checkpoints; the current phase's in self.state (restored on resume).
        history = [e for p in range(1, self.phase) for e in read_history(phase_dir(out, p, growths))]
        history += [e for e in self.state.log_history if "tokens" in e]
        baseline = self._unigram_baseline()
        baselines = {"unigram_eval_loss": baseline} if baseline is not None else None
        extra = {"parallelism": parallelism(self)}
        if (evaluation := self._eval_blocks()) is not None:  # what `hf-stack compare` checks runs were validated on
            from ..data import fingerprint

            extra["validation"] = fingerprint(evaluation)
        if self._ladder and dest == out:  # the run's own end is the largest budget's branch; the others are listed
            largest = branch_summary(
                self._ladder[-1], {"training": training_summary(phases), "log_history": history}, "."
            )
            extra["cooldowns"] = [*self._cooldowns, largest]
        write_final_outputs(dest, model, self.processing_class, phases, history, baselines,
                            growths=read_growth_state(out)["growths"], extra=extra, state_dict=state)  # fmt: skip


def check_run(args, n_blocks: int, block_size: int, model_config, resume, write=False, wait=None, peft=False):
    """Everything a run is checked for before anything is written: the budget, the growth steps and the depth each
    growth starts from, the MSG ramp, the data, the context and the run folder. `hf-stack train` calls it before
    loading the weights, the trainer again before it starts (where `write` records a new run's settings).

    Returns:
        `(tokens_per_step, total_steps, grow_steps)`, one optimizer step per growth (none for a run that does not grow).
    """
    args.check_growth()  # stacked_config may have been replaced since the arguments were built
    check_strategy(args, peft)
    if peft and len(args.growths) > 1:
        raise HfStackError("peft_config trains adapters on the grown model: give it one growth, not several")
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and block_size > limit:
        raise HfStackError(
            f"block size {block_size} is larger than the model's context ({limit} positions); use a smaller --block-size"
        )
    tps = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size * block_size
    if args.max_tokens is not None:
        total_steps = max(1, args.max_tokens // tps)
    elif args.max_steps > 0:
        total_steps = args.max_steps
    else:
        raise HfStackError("set max_tokens (or max_steps): the token budget decides where training ends")
    schedule = args.growths
    grow_steps = [math.ceil(e["at_tokens"] / tps) for e in schedule]
    if len(set(grow_steps)) < len(grow_steps):
        raise HfStackError(
            f"growths at {[e['at_tokens'] for e in schedule]} tokens fall on the same step ({tps} tokens a step)"
        )
    if grow_steps and grow_steps[-1] >= total_steps:
        raise HfStackError(
            f"growth at step {grow_steps[-1]} ({schedule[-1]['at_tokens']:.3g} tokens at {tps} tokens/step) is not "
            f"before the end of training (step {total_steps})"
        )
    if grow_steps and args.mask_steps >= total_steps - grow_steps[-1]:
        # The masks must reach 1 while training, or the saved (plain) model is not the one that was trained.
        raise HfStackError(
            f"mask_steps ({args.mask_steps}) must be fewer than the {total_steps - grow_steps[-1]} steps after growth"
        )
    if grow_steps and grow_steps[-1] * tps // block_size >= n_blocks:
        raise HfStackError(
            f"the data holds {n_blocks * block_size:,} tokens, fewer than the last growth point; add data"
        )
    # Each growth starts from the model the previous one left: its depth and, after width growth, its sizes.
    shape = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(vars(model_config))
    depth_key = layout_of(shape).depth
    for i, entry in enumerate(schedule):
        stacked, depth = entry["stacked_config"], shape.get(depth_key)
        if depth is None:
            break
        try:
            if "width" in stacked.directions:
                dims = width_dims(shape, stacked.width_factor)
                shape = grow_width_config(shape, dims)
            shape[depth_key] = len(resolve_layer_map(stacked, depth))
        except HfStackError as e:
            raise HfStackError(
                f"growth {i + 1} (at {entry['at_tokens']:.3g} tokens, from {depth} layers): {e}"
            ) from None
    ladder = run_ladder(args, tps, grow_steps, total_steps)
    config = {
        "grow_at_tokens": args.grow_at_tokens,
        "max_tokens": args.max_tokens,
        "stacked_config": args.stacked_config.to_dict() if args.grow_at_tokens is not None else None,
        "tokens_per_step": tps,
        "num_blocks": n_blocks,
        "seed": args.seed,
        "model": {k: getattr(model_config, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size")},
    }
    if len(schedule) > 1 or (schedule and args.grow_at_tokens is None):
        config["growth_schedule"] = args.to_dict()["growth_schedule"]
    if ladder:
        config["cooldowns"] = {"rungs": ladder, "type": args.cooldown_type, "min_lr_rate": args.cooldown_min_lr_rate}
    check_run_config(Path(args.output_dir), config, resume, write, wait or (lambda: None))
    return tps, total_steps, grow_steps


def requested_sharding(args) -> str | None:
    """The sharding a run asks for, named by its flag: `--fsdp` (the arguments, or an accelerate config's
    `use_fsdp`), `--deepspeed`, or None."""
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "--fsdp"
    if args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "--deepspeed"
    return None


def check_strategy(args, peft: bool = False) -> None:
    """A sharded run's request checked before any weight loads: what growth inside it cannot do, and FSDP in one
    process. In-run growth runs under FSDP2 (the full state gathered and grown on rank 0, the grown model sharded and
    loaded by broadcast: `hf_stack.training.sharded`); whether the machine shards at all is known once the
    accelerator exists (`StackingTrainer.__init__`)."""
    flag = requested_sharding(args)
    if flag is not None and args.growths:
        check_sharded_growth(args, flag, peft)
    if flag == "--fsdp" and args.world_size < 2:  # transformers' own refusal is a traceback from Trainer.__init__
        raise HfStackError(
            "--fsdp shards the model over several processes and this run has one: launch it with `torchrun "
            "--nproc_per_node N -m hf_stack.cli train ...` or `accelerate launch`, or remove --fsdp"
        )


def check_sharded_growth(args, flag: str, peft: bool) -> None:
    """What growth inside a run sharded with `flag` cannot do, each with the way out."""
    offline = (
        "or grow between two runs (`hf-stack grow run/final --factor 4 -o grown`) and train the grown model with "
        + flag
    )
    if flag == "--deepspeed":
        raise HfStackError(f"growth inside a --deepspeed run is not supported: use --fsdp (FSDP2), {offline}")
    version = args.fsdp_plugin_args["fsdp_version"] if args.fsdp else int(os.environ.get("FSDP_VERSION", "1"))
    if version != 2:
        raise HfStackError(
            f"growth inside an FSDP{version} run is not supported: use FSDP2 (fsdp_config version 2, transformers' "
            f"default), {offline}"
        )
    if args.carry_optimizer_state:
        raise HfStackError(
            "--carry-optimizer-state is not supported under --fsdp (the Adam moments are sharded): the grown model "
            "starts with a fresh optimizer, the paper's recipe; drop --carry-optimizer-state"
        )
    for growth in args.growths:
        if get_operator(growth["stacked_config"].operator).needs_data:
            raise HfStackError(
                f"{growth['stacked_config'].operator!r} growth trains the grown tensors on one process, which an "
                f"--fsdp run does not do: grow with stack, zero, random or direct, {offline}"
            )
    if args.mask_steps:
        raise HfStackError(f"--mask-steps (MSG's masks) is not supported under --fsdp: drop it, {offline}")
    if peft:
        raise HfStackError(f"peft_config with growth is not supported under --fsdp: {offline}")


def parallelism(trainer) -> dict:
    """How the run (its current phase) is really distributed, read from the accelerator and the model rather than
    from what was asked: the strategy, the FSDP version or DeepSpeed stage, the world size, and for FSDP2 whether
    every parameter is sharded."""
    record = {"strategy": "ddp" if trainer.args.world_size > 1 else "single process"}
    if getattr(trainer, "is_fsdp_enabled", False):
        version = trainer.accelerator.state.fsdp_plugin.fsdp_version
        record = {"strategy": f"fsdp{version}"}
        if version == 2:
            record["sharded"] = every_parameter_sharded(trainer.model)
    elif getattr(trainer, "is_deepspeed_enabled", False):
        record = {"strategy": "deepspeed", "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage}
    return {**record, "world_size": trainer.args.world_size}


def run_ladder(args, tps: int, grow_steps: list[int], total_steps: int) -> list[dict]:
    """The cooldown ladder of a run with `cooldown_budgets` (empty without), each rung's warmup that of the last
    phase, in absolute steps (a ratio is taken of the last phase's steps to the largest budget)."""
    if not args.cooldown_budgets:
        return []
    start = grow_steps[-1] if grow_steps else 0
    warmup = args.phase_settings(len(grow_steps) + 1)["warmup_steps"] or 0
    warmup = int(warmup) if warmup >= 1 else math.ceil((total_steps - start) * warmup)
    rungs = cooldown_ladder(args.cooldown_budgets, args.cooldown_fraction, tps, start, warmup)
    if grow_steps and args.mask_steps > rungs[0]["decay_start"] - start:
        # every branch must train the plain model, as a run of its budget would once its masks reached 1
        raise HfStackError(
            f"mask_steps ({args.mask_steps}) must end before the first cooldown starts "
            f"({rungs[0]['decay_start'] - start} steps after growth)"
        )
    return [{**r, "warmup_steps": warmup} for r in rungs]


class _LadderCallback(TrainerCallback):
    """Checkpoints (and a log entry, for the resumed clock) at the stable run's decay starts; an evaluation at the
    end of every branch (when there is an eval set), so each budget's final loss is read at its own end."""

    def __init__(self, can_evaluate: bool):
        self.save_at: set[int] = set()  # set during the stable run only
        self.can_evaluate = can_evaluate

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.save_at:
            control.should_save = control.should_log = True
        elif not self.save_at and state.global_step >= state.max_steps:
            control.should_log = True
            control.should_evaluate = control.should_evaluate or self.can_evaluate


class _ResumeClock(TrainerCallback):
    """A resumed phase continues the training seconds its checkpoint logged instead of restarting them at zero
    (the state, with its log, is restored before on_train_begin)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._resume_clock(state)


def _phase_blocks(dataset, start: int, count: int):
    """The `count` blocks a phase trains on, from block `start` of the run's data (what follows the earlier phases'),
    going round to the first block when the data runs out: every step gets whole batches, so the tokens counted are
    the tokens trained (Trainer would give a pass's last step only the blocks left)."""
    n = len(dataset)
    if start == 0 and count == n:
        return dataset
    indices = range(start, start + count) if start + count <= n else [(start + i) % n for i in range(count)]
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return torch.utils.data.Subset(dataset, indices)


def _apply_peft(model, peft_config):
    from peft import get_peft_model

    return get_peft_model(model, peft_config)
