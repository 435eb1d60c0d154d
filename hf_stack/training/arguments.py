"""Stage 3, training settings: `StackingTrainingArguments`, transformers' `TrainingArguments` plus growth in the run."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..errors import HfStackError
from ..plans.config import StackedConfig


@dataclass
class StackingTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus growth inside the run. `learning_rate`, `warmup_steps` and the optimizer settings
    apply to the small model (phase 1); the `grown_*` fields to the grown model (phase 2)."""

    # transformers' default (every 500 steps) logs nothing on a short run: no loss in training_log.json, an empty
    # card plot, nothing for `hf-stack compare`. A fraction of each phase's steps logs every run the same number of
    # points, whatever its length.
    logging_steps: float = field(
        default=0.02,
        metadata={
            "help": "Log every X optimizer steps or, below 1, every X of each phase's steps (default 0.02: about 50 "
            "points per phase, whatever the run's length)."
        },
    )
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
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not _accelerator_available():
            # torchrun on a machine without GPUs: transformers would leave the Trainer undistributed and every
            # process would act as process zero on the same folder; run DDP on the CPUs (gloo) instead.
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
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
        self.check_growth()
        if self.grow_at_tokens is not None and self.max_tokens is not None and self.grow_at_tokens >= self.max_tokens:
            raise HfStackError(
                f"grow_at_tokens ({self.grow_at_tokens:.3g}) is beyond the budget max_tokens ({self.max_tokens:.3g}); "
                "grow earlier or train longer"
            )

    def check_growth(self) -> None:
        """Refuse settings the growth cannot honour; run again when `stacked_config` is set after construction (as
        the CLI does), since a carried optimizer or masks of the wrong growth would corrupt the run."""
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

    def to_dict(self):
        d = super().to_dict()
        if isinstance(self.stacked_config, StackedConfig):
            d["stacked_config"] = self.stacked_config.to_dict()
        return d


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ... alike
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
