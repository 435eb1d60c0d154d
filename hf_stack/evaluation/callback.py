"""Stage 4, benchmarks inside the training loop: a `TrainerCallback` that scores tasks with the harness.

Its own module so that `hf-stack eval` and `evaluate_model` never import transformers' trainer stack.
"""

from __future__ import annotations

import contextlib
import time

from transformers import TrainerCallback

from ..checkpoints.models import is_sharded, reshard
from .benchmarks import headline, parse_tasks
from .harness import ADD_BOS_TOKEN, load_tasks, make_lm, score_tasks


class EvalCallback(TrainerCallback):
    """Score chosen benchmarks during training, at each save or every `every_n_steps`, and log them.

    Logged as `bench/<task>` (and `bench/average`, and `bench/seconds`, the call's time) next to the trainer's
    loss; with `StackingTrainer` each entry also carries tokens and FLOPs, so benchmark curves can be drawn against
    training compute, and the seconds are kept out of its `train_seconds`. The tasks are loaded at the first call
    and reused; under DDP process zero scores while the others wait (each call scores every request once); under
    FSDP2 every process takes part in each forward pass and process zero logs.

    Args:
        tokenizer: the model's tokenizer.
        tasks, data_dir, limit, batch_size, add_bos_token: as for [`evaluate_model`] (keep `limit` small: it runs
            in the loop).
        every_n_steps: score every N optimizer steps; by default at each checkpoint save.
        trainer: the trainer whose `log` receives the scores (so `report_to` integrations see them).

    Example:

    ```python
    >>> trainer.add_callback(EvalCallback(tok, tasks="arc_easy,piqa", limit=50, every_n_steps=500, trainer=trainer))  # doctest: +SKIP
    ```
    """

    def __init__(self, tokenizer, tasks="hf_stack_8", data_dir=None, limit: int | None = 20, batch_size: int = 16,
                 every_n_steps: int | None = None, trainer=None, add_bos_token: bool | None = ADD_BOS_TOKEN):  # fmt: skip
        self.tokenizer, self.tasks, self.data_dir, self.limit = tokenizer, parse_tasks(tasks), data_dir, limit
        self.add_bos_token = add_bos_token
        self.batch_size, self.every_n_steps, self.trainer = batch_size, every_n_steps, trainer
        self.history: list[dict] = []
        self._loaded = None  # the tasks, loaded at the first call
        self._lm = (None, None)  # (the model it wraps, the lm-eval LM): a growth brings a new model

    def _score(self, state, control, model):
        # A replicated model (one process, DDP) is scored once, on process zero, while the others wait. A sharded
        # one (FSDP2) needs every process in each forward pass: all score the same batches, process zero logs.
        sharded = is_sharded(model)
        if not state.is_world_process_zero and not sharded:
            self._wait()
            return
        # not training time: StackingTrainer keeps benchmark seconds out of train_seconds, as evaluation's
        outside = getattr(self.trainer, "outside_training_clock", contextlib.nullcontext)
        start = time.perf_counter()
        with outside():
            if self._loaded is None:
                self._loaded = load_tasks(self.tasks, self.data_dir)
            if self._lm[0] is not model:
                self._lm = (model, make_lm(model, self.tokenizer, "hf-stack", self.batch_size,
                                           add_bos_token=self.add_bos_token))  # fmt: skip
            was_training = model.training
            model.eval()
            try:
                results = score_tasks(self._lm[1], self._loaded, self.limit)
            finally:
                model.train(was_training)
                if sharded:
                    reshard(model)
        if not state.is_world_process_zero:
            self._wait()
            return
        logs = {f"bench/{k.replace(' (acc)', '')}": float(v) for k, v in headline(results).items()}
        logs["bench/seconds"] = round(time.perf_counter() - start, 3)
        self.history.append({"step": state.global_step, **logs})
        if self.trainer is not None:
            # Trainer.log clears `should_log`: this step's own loss entry must still be logged (and, under DDP,
            # gathered on every process, or process zero skips a collective the others run)
            should_log = control.should_log
            self.trainer.log(logs)
            control.should_log = self.trainer.control.should_log = should_log
        else:
            state.log_history.append({**logs, "step": state.global_step})
        self._wait()

    def _wait(self):
        if self.trainer is not None:
            self.trainer.accelerator.wait_for_everyone()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._score(state, control, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.every_n_steps:
            self._score(state, control, model)
