"""Stage 4, benchmarks inside the training loop: a `TrainerCallback` that scores tasks with the harness.

Its own module so that `hf-stack eval` and `evaluate_model` never import transformers' trainer stack.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .benchmarks import headline, parse_tasks
from .harness import ADD_BOS_TOKEN, evaluate_model


class EvalCallback(TrainerCallback):
    """Score chosen benchmarks during training, at each save or every `every_n_steps`, and log them.

    Logged as `bench/<task>` (and `bench/average`) next to the trainer's loss; with `StackingTrainer` each entry
    also carries tokens and FLOPs, so benchmark curves can be drawn against training compute.

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

    def _score(self, state, model):
        was_training = model.training
        results = evaluate_model(model, self.tokenizer, tasks=self.tasks, data_dir=self.data_dir, limit=self.limit,
                                 batch_size=self.batch_size, bootstrap_iters=0, add_bos_token=self.add_bos_token)  # fmt: skip
        model.train(was_training)
        logs = {f"bench/{k.replace(' (acc)', '')}": float(v) for k, v in headline(results).items()}
        self.history.append({"step": state.global_step, **logs})
        if self.trainer is not None:
            self.trainer.log(logs)
        else:
            state.log_history.append({**logs, "step": state.global_step})

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._score(state, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.every_n_steps:
            self._score(state, model)
