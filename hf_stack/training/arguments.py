"""Stage 3, training settings: `StackingTrainingArguments`, transformers' `TrainingArguments` plus growth in the run."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields

from transformers import TrainingArguments

from ..errors import HfStackError
from ..plans.config import StackedConfig, parse_settings, setting_type
from .ladder import COOLDOWN_TYPES


@dataclass
class StackingTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus growth inside the run. `learning_rate`, `warmup_steps` and the optimizer settings
    apply to the small model (phase 1); the `grown_*` fields to the grown model (phase 2). Several growths in one run
    are a `growth_schedule`, of which `grow_at_tokens` with `stacked_config` is the one-growth case."""

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
    growth_schedule: list | str | None = field(
        default=None,
        metadata={
            "help": "Several growths in one run, each starting a phase: a list (or JSON) of {at_tokens, "
            "stacked_config, and optionally learning_rate, warmup_steps, lr_scheduler_type, lr_scheduler_kwargs for "
            "the phase it starts}, or as text 'AT:key=value,...;AT:...', e.g. '1e6:factor=2;3e6:factor=2,order=middle' "
            "(gradual stacking, MIDAS). Unset settings of a phase default to the grown_* ones, then phase 1's."
        },
    )
    mask_steps: int = field(
        default=0,
        metadata={
            "help": "random operator: ramp the new layers and units in from 0 to 1 over this many steps after "
            "growth (MSG masks; 0: no masks)."
        },
    )
    cooldown_budgets: list | str | None = field(
        default=None,
        metadata={
            "help": "Annealed end points at several budgets from one run (warmup-stable-decay): total token budgets, "
            "a list or text like '1e6,2e6,4e6'; max_tokens (the largest, if unset) is one of them. The last phase "
            "trains at its peak rate after warmup and each budget gets its own cooldown branch from the state at its "
            "decay start, with its own final/ and training_log.json in cooldown-<tokens>/ (the largest: the run "
            "folder itself). The last phase's lr_scheduler_type is not used."
        },
    )
    cooldown_fraction: float = field(
        default=0.2, metadata={"help": "Each budget's cooldown as a fraction of its steps (default 0.2)."}
    )
    cooldown_type: str = field(
        default="linear", metadata={"help": "Shape of the cooldown: linear (default), 1-sqrt or cosine."}
    )
    cooldown_min_lr_rate: float = field(
        default=0.0, metadata={"help": "Where the cooldown ends, as a fraction of the peak rate (default 0)."}
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
            _scheduler_type(self.grown_lr_scheduler_type, "grown_lr_scheduler_type")
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
                setattr(self, name, _tokens(name, value))
        if self.cooldown_budgets is not None:
            self.cooldown_budgets = _budgets(self.cooldown_budgets)
            self.max_tokens = self.max_tokens or max(self.cooldown_budgets)
            if max(self.cooldown_budgets) > self.max_tokens:
                raise HfStackError(
                    f"cooldown budget {max(self.cooldown_budgets):.3g} is beyond max_tokens ({self.max_tokens:.3g})"
                )
            self.cooldown_budgets = sorted({*self.cooldown_budgets, self.max_tokens})
            if self.cooldown_type not in COOLDOWN_TYPES:
                raise HfStackError(
                    f"cooldown_type must be one of {', '.join(COOLDOWN_TYPES)}, got {self.cooldown_type!r}"
                )
            if not 0 <= self.cooldown_min_lr_rate < 1:
                raise HfStackError(f"cooldown_min_lr_rate must be in [0, 1), got {self.cooldown_min_lr_rate}")
            if self.save_total_limit:
                raise HfStackError(
                    "cooldown_budgets branches from a checkpoint at each decay start; unset save_total_limit"
                )
        self.check_growth()
        last = self.growths[-1]["at_tokens"] if self.growths else None
        if last is not None and self.max_tokens is not None and last >= self.max_tokens:
            name = "grow_at_tokens" if self.grow_at_tokens is not None else "the last growth of growth_schedule"
            raise HfStackError(
                f"{name} ({last:.3g}) is beyond the budget max_tokens ({self.max_tokens:.3g}); grow earlier or train "
                "longer"
            )

    def _schedule(self) -> list[dict]:
        """The growths as one normalised list: `{"at_tokens", "stacked_config", "learning_rate", "warmup_steps",
        "lr_scheduler_type", "lr_scheduler_kwargs"}` each, in order."""
        schedule = self.growth_schedule
        if schedule is None or schedule == []:
            if self.grow_at_tokens is None:
                return []
            return [{"at_tokens": self.grow_at_tokens, "stacked_config": self.stacked_config}]
        if self.grow_at_tokens is not None:
            raise HfStackError("give either grow_at_tokens (one growth) or growth_schedule (several), not both")
        if isinstance(schedule, str):
            if schedule.lstrip().startswith("["):
                try:
                    schedule = json.loads(schedule)
                except json.JSONDecodeError:
                    raise HfStackError(f"growth_schedule is not JSON: {schedule!r}") from None
            else:
                schedule = _parse_schedule(schedule)
        out = []
        for i, entry in enumerate(schedule):
            if not isinstance(entry, dict):
                raise HfStackError(f"growth_schedule entry {i + 1} is not a mapping: {entry!r}")
            unknown = sorted(set(entry) - set(PHASE_KEYS) - {"at_tokens", "stacked_config"})
            if unknown or "at_tokens" not in entry:
                raise HfStackError(
                    f"growth_schedule entry {i + 1}: {'unknown keys ' + ', '.join(unknown) if unknown else 'no at_tokens'}"
                    f"; an entry has at_tokens, stacked_config and optionally {', '.join(PHASE_KEYS)}"
                )
            if entry.get("lr_scheduler_type") is not None:
                _scheduler_type(entry["lr_scheduler_type"], f"growth_schedule entry {i + 1}'s lr_scheduler_type")
            stacked = entry.get("stacked_config") or {}
            stacked = stacked if isinstance(stacked, StackedConfig) else StackedConfig(**stacked)
            out.append({**entry, "at_tokens": _tokens("at_tokens", entry["at_tokens"]), "stacked_config": stacked})
        at = [e["at_tokens"] for e in out]
        if at != sorted(set(at)):
            raise HfStackError(f"growth_schedule is out of order: growths at {at} tokens; list them earliest first")
        return out

    def phase_settings(self, phase: int, first: dict | None = None) -> dict:
        """The learning rate, warmup and schedule of `phase` (1: the small model): a growth's own settings, else the
        grown_* ones, else phase 1's (`first`, when these arguments have been changed for a later phase since)."""
        keys = ("learning_rate", "warmup_steps", "lr_scheduler_type", "lr_scheduler_kwargs")
        base = {k: (first or {}).get(k, getattr(self, k)) for k in keys}
        if phase == 1:
            return base
        grown = {"learning_rate": self.grown_learning_rate, "warmup_steps": self.grown_warmup_steps,
                 "lr_scheduler_type": self.grown_lr_scheduler_type,
                 "lr_scheduler_kwargs": self.grown_lr_scheduler_kwargs}  # fmt: skip
        entry = self.growths[phase - 2]
        out = {k: entry.get(k) if entry.get(k) is not None else grown[k] if grown[k] is not None else v
               for k, v in base.items()}  # fmt: skip
        # a schedule of another type than phase 1's does not take phase 1's keyword arguments
        if entry.get("lr_scheduler_kwargs") is None:
            if entry.get("lr_scheduler_type") is not None:
                out["lr_scheduler_kwargs"] = {}
            elif self.grown_lr_scheduler_type is not None:
                out["lr_scheduler_kwargs"] = self.grown_lr_scheduler_kwargs or {}
        return out

    def check_growth(self) -> None:
        """Refuse settings the growth cannot honour; run again when `stacked_config` is set after construction (as
        the CLI does), since a carried optimizer or masks of the wrong growth would corrupt the run."""
        # Rebuilt on every check: grow_at_tokens and stacked_config may have been set after construction.
        self.growths = self._schedule()
        stacked_configs = [e["stacked_config"] for e in self.growths]
        if self.carry_optimizer_state and any(  # (stacked_config alone: the growth it would carry over, if set later)
            "width" in c.directions or c.operator in ("random", "learn")
            for c in stacked_configs or [self.stacked_config]
        ):
            raise HfStackError(
                "carry_optimizer_state moves AdamW moments of copied tensors; it supports depth growth with the "
                "direct (stack) and zero operators only"
            )
        if self.mask_steps < 0:
            raise HfStackError(f"mask_steps must be 0 or more, got {self.mask_steps}")
        if self.mask_steps and (len(stacked_configs) != 1 or stacked_configs[0].operator != "random"):
            raise HfStackError(
                "mask_steps ramps in the new parts of growth inside the run: it needs grow_at_tokens and the "
                "random operator (one growth)"
            )

    def to_dict(self):
        d = super().to_dict()
        if isinstance(self.stacked_config, StackedConfig):
            d["stacked_config"] = self.stacked_config.to_dict()
        d["growth_schedule"] = [{**e, "stacked_config": e["stacked_config"].to_dict()} for e in self.growths]
        return d


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ... alike
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


# Settings of the phase a growth starts, besides its StackedConfig.
PHASE_KEYS = {"learning_rate": float, "warmup_steps": float, "lr_scheduler_type": str, "lr_scheduler_kwargs": dict}


def _tokens(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise HfStackError(f"{name} must be a positive number of tokens, got {value!r}")
    return int(value)


def _budgets(value) -> list[int]:
    """`[1e6, 2e6]`, `"1e6,2e6"` or a JSON list -> token budgets."""
    items = value
    if isinstance(value, str):
        text = value.strip()
        try:
            items = json.loads(text) if text.startswith("[") else [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise HfStackError(
                f"cannot read cooldown_budgets {value!r}: write token budgets like 1e6,2e6,4e6"
            ) from None
    if not isinstance(items, (list, tuple)) or not items:
        raise HfStackError(f"cooldown_budgets must list token budgets, got {value!r}")
    return [_tokens("a cooldown budget", v) for v in items]


def _parse_schedule(text: str) -> list[dict]:
    """`"1e6:factor=2;3e6:factor=2,order=middle,learning_rate=3e-4"` -> schedule entries."""
    entries = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        at, sep, settings = part.partition(":")
        try:
            tokens = float(at)
        except ValueError:
            raise HfStackError(
                f"cannot read growth {part!r}: write AT_TOKENS:key=value,... e.g. 1e6:factor=2"
            ) from None
        if not sep:
            raise HfStackError(f"cannot read growth {part!r}: write AT_TOKENS:key=value,... e.g. 1e6:factor=2")
        known = {f.name: setting_type(f) for f in dataclass_fields(StackedConfig) if f.init}
        # every phase key but the kwargs dict can be written as text
        values = parse_settings(settings, {**known, **{k: t for k, t in PHASE_KEYS.items() if t is not dict}})
        phase = {k: values.pop(k) for k in list(values) if k in PHASE_KEYS}
        entries.append({"at_tokens": tokens, "stacked_config": values, **phase})
    if not entries:
        raise HfStackError(f"growth_schedule {text!r} names no growth")
    return entries


def _scheduler_type(name: str, what: str) -> None:
    from transformers.trainer_utils import SchedulerType

    try:
        SchedulerType(name)
    except ValueError:
        names = ", ".join(t.value for t in SchedulerType)
        raise HfStackError(f"unknown {what} {name!r}; choose one of {names}") from None
