"""Stage 1, growth settings (`StackedConfig`) and the provenance file `growth_config.json` written beside a grown model."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import HfStackError
from ..operators import get_operator
from .layers import format_layer_map, parse_layer_map

GROWTH_CONFIG_NAME = "growth_config.json"
ORDERS = ("stack", "interpolate", "middle")
DIRECTION_CHOICES = ("depth", "width", "both")


@dataclass
class StackedConfig:
    """How to grow a small checkpoint into a deeper and / or wider one.

    Depth: give one of `factor`, `num_layers` or `layer_map`. Width: give `width_factor`. The default,
    `StackedConfig(factor=4)`, is the paper's G_stack: the whole layer stack repeated four times (target layer
    i <- source layer i mod L).

    Args:
        operator (`str`, defaults to `"stack"`):
            Registered growth operator: `direct` (alias `stack` in depth), `zero`, `random` or `learn`
            (`hf_stack.operators.OPERATORS`).
        direction (`str`, *optional*):
            `depth`, `width` or `both`; by default inferred from which of the depth and width settings are given.
        width_factor (`float`, *optional*):
            Width growth: hidden size, FFN size and (key/value) head counts are multiplied by it; head_dim is kept.
            Every grown size must be whole. Defaults to 2 when `direction` asks for width.
        width_noise (`float`, defaults to 0.01):
            `direct` width only: noise (times each tensor's std) added to the columns that read copied units,
            summing to zero over a unit's copies: the function is kept and the copies can diverge in training.
        factor (`int`, *optional*):
            Growth factor g: the grown model has g x L layers.
        num_layers (`int`, *optional*):
            Number of layers of the grown model; need not be a multiple of L.
        order (`str`, defaults to `"stack"`):
            How target layers map to source layers: `stack` (i mod L), `interpolate` (0,0,1,1,...) or `middle`
            (MIDAS: keep the first and last layers, repeat the middle block).
        layer_map (`str`, *optional*):
            Explicit map as inclusive ranges, e.g. `"0-5,0-5,2-3"`; overrides `order`.
        dtype (`str`, *optional*):
            Convert weights to this dtype (`float32`, `bfloat16`, `float16`); the source dtype is kept otherwise.
        init_seed (`int`, defaults to 0):
            Seed of randomly initialised parameters (`random`, `zero` width, `learn` maps).
        learn_data (`str`, *optional*):
            `learn` only: training text for the maps (files, globs, or a Hub dataset id; several comma-separated).
        learn_steps (`int`, defaults to 100):
            `learn` only: optimiser steps for the maps (LiGO uses about 100).
        learn_lr (`float`, defaults to 1e-3):
            `learn` only: AdamW learning rate of the maps.
        learn_batch_size (`int`, defaults to 8):
            `learn` only: blocks per step.
        learn_block_size (`int`, defaults to 256):
            `learn` only: tokens per block.

    Paper: Du et al., "Stacking Your Transformers", NeurIPS 2024, https://arxiv.org/abs/2405.15319

    Example:

    ```python
    >>> from hf_stack import StackedConfig
    >>> StackedConfig(factor=4).target_num_layers(6)
    24
    ```
    """

    operator: str = field(
        default="stack",
        metadata={"help": "Growth operator: direct (alias stack in depth: G_stack), zero, random or learn."},
    )
    direction: str | None = field(
        default=None,
        metadata={
            "help": "Grow in depth, width or both (default: from the depth and width settings given).",
            "choices": DIRECTION_CHOICES,
        },
    )
    width_factor: float | None = field(
        default=None,
        metadata={"help": "Width growth: multiply hidden size, FFN size and head counts by this (default 2)."},
    )
    factor: int | None = field(default=None, metadata={"help": "Growth factor g: the grown model has g x L layers."})
    num_layers: int | None = field(
        default=None, metadata={"help": "Number of layers of the grown model (need not be a multiple of L)."}
    )
    order: str = field(
        default="stack",
        metadata={
            "help": "Layer order: stack (i mod L), interpolate (0,0,1,1,...) or middle (MIDAS).",
            "choices": ORDERS,
        },
    )
    layer_map: str | None = field(
        default=None, metadata={"help": "Explicit layer map as inclusive ranges, e.g. 0-5,0-5,2-3 (overrides order)."}
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Convert weights to float32, bfloat16 or float16 (default: keep the source dtype)."},
    )
    width_noise: float = field(
        default=0.01,
        metadata={"help": "direct width: zero-sum noise on the readers of copied units, so copies can diverge."},
    )
    init_seed: int = field(default=0, metadata={"help": "Seed of randomly initialised parameters."})
    learn_data: str | None = field(
        default=None, metadata={"help": "learn: training text for the maps (files, globs or a Hub dataset id)."}
    )
    learn_steps: int = field(default=100, metadata={"help": "learn: optimiser steps for the maps."})
    learn_lr: float = field(default=1e-3, metadata={"help": "learn: learning rate of the maps."})
    learn_batch_size: int = field(default=8, metadata={"help": "learn: blocks per step."})
    learn_block_size: int = field(default=256, metadata={"help": "learn: tokens per block."})
    # Filled by `from_pretrained` with the whole growth_config.json; not a setting (init=False keeps it off CLIs).
    provenance: dict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.layer_map, (list, tuple)):
            if not all(isinstance(j, int) and j >= 0 for j in self.layer_map):
                raise HfStackError(f"layer_map must list non-negative layer indices, got {self.layer_map!r}")
            self.layer_map = format_layer_map(self.layer_map)
        for name in ("factor", "num_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                if isinstance(value, float) and value.is_integer():
                    setattr(self, name, int(value))
                else:
                    raise HfStackError(f"{name} must be a whole number, got {value!r}; use --layers for other depths")
        if self.factor is not None and self.factor < 1:
            raise HfStackError(f"factor must be at least 1, got {self.factor}")
        if self.num_layers is not None and self.num_layers < 1:
            raise HfStackError(f"num_layers must be at least 1, got {self.num_layers}")
        depth_given = not (self.factor is None and self.num_layers is None and self.layer_map is None)
        if self.direction is None:
            width = self.width_factor is not None
            self.direction = "both" if width and depth_given else "width" if width else "depth"
        if self.direction not in DIRECTION_CHOICES:
            raise HfStackError(f"unknown direction {self.direction!r}; choose one of: {', '.join(DIRECTION_CHOICES)}")
        if self.direction == "width" and depth_given and self.factor != 1:
            raise HfStackError("direction 'width' keeps the depth: drop --factor/--layers/--layer-map or use 'both'")
        if self.direction == "depth" and self.width_factor is not None:
            raise HfStackError("direction 'depth' keeps the width: drop --width-factor or use direction 'both'")
        if self.direction != "depth" and self.width_factor is None:
            self.width_factor = 2.0
        if self.width_factor is not None:
            if isinstance(self.width_factor, bool) or not isinstance(self.width_factor, (int, float)):
                raise HfStackError(f"width_factor must be a number, got {self.width_factor!r}")
            if not self.width_factor > 1:
                raise HfStackError(f"width_factor must be above 1, got {self.width_factor}")
            self.width_factor = float(self.width_factor)
        if not depth_given:
            self.factor = 1 if self.direction == "width" else 4
        if self.factor is not None and self.num_layers is not None:
            raise HfStackError("give either factor or num_layers, not both")
        if self.order not in ORDERS:
            raise HfStackError(f"unknown order {self.order!r}; choose one of: {', '.join(ORDERS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise HfStackError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        operator = get_operator(self.operator, self.directions)
        if operator.needs_data and not self.learn_data:
            raise HfStackError(
                f"operator {self.operator!r} trains its maps on data: pass --learn-data with text files or a dataset"
            )
        if not operator.needs_data and self.learn_data:
            raise HfStackError(f"--learn-data is for operator 'learn'; {self.operator!r} uses no data")
        for name, least in (("learn_steps", 1), ("learn_batch_size", 1), ("learn_block_size", 2)):
            if getattr(self, name) < least:
                raise HfStackError(f"{name} must be a whole number of at least {least}, got {getattr(self, name)}")
        if not 0 <= self.width_noise < 1:
            raise HfStackError(f"width_noise must be in [0, 1), got {self.width_noise}")
        if not self.learn_lr > 0:
            raise HfStackError(f"learn_lr must be positive, got {self.learn_lr}")

    @property
    def directions(self) -> tuple[str, ...]:
        """The directions grown: ("depth",), ("width",) or ("depth", "width")."""
        return ("depth", "width") if self.direction == "both" else (self.direction,)

    def target_num_layers(self, source_num_layers: int) -> int:
        """Number of layers of the grown model for a source with `source_num_layers` layers."""
        if self.num_layers is not None:
            return self.num_layers
        if self.layer_map is not None:
            return len(parse_layer_map(self.layer_map))
        return self.factor * source_num_layers

    def to_dict(self) -> dict:
        learn = get_operator(self.operator).needs_data  # the learn_* settings mean nothing to other operators
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init and (learn or f.name[:6] != "learn_")}

    @classmethod
    def from_string(cls, text: str) -> StackedConfig:
        """Settings written as `key=value,key=value` with the field names, e.g. `"operator=zero,factor=4"`."""
        return cls(**cls.parse_settings(text))

    @classmethod
    def parse_settings(cls, text: str) -> dict:
        """The typed settings of `key=value,key=value` text, not yet checked together (see [`from_string`] and the
        module's `parse_settings`)."""
        return parse_settings(text, {f.name: setting_type(f) for f in fields(cls) if f.init})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs) -> StackedConfig:
        """Read the growth settings back from a grown model's `growth_config.json` (folder or Hub id).

        The full file (source, revision, layer map, hf_stack version, ...) is kept in `.provenance`.

        Args:
            pretrained_model_name_or_path: a folder written by hf_stack or a Hub repo id.
            hub_kwargs: `revision`, `token`, `cache_dir` for Hub ids.
        """
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            file = path / GROWTH_CONFIG_NAME
            if not file.is_file():
                raise HfStackError(f"{path} has no {GROWTH_CONFIG_NAME}; it was not grown by hf_stack")
        else:
            from ..remote import hub_file

            file = hub_file(str(pretrained_model_name_or_path), GROWTH_CONFIG_NAME, **hub_kwargs)
        try:
            data = json.loads(Path(file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise HfStackError(f"cannot read {file}: {e}") from None
        if "settings" not in data:
            raise HfStackError(f"{file} records training only: this model was not grown by hf_stack")
        settings = data["settings"]
        known = {f.name for f in fields(cls)} - {"provenance"}
        unknown = sorted(set(settings) - known)
        if unknown:
            warnings.warn(f"ignoring unknown growth settings {unknown} (written by a newer hf_stack?)", stacklevel=2)
        config = cls(**{k: v for k, v in settings.items() if k in known})
        config.provenance = data
        return config


DTYPES = ("float32", "bfloat16", "float16")


def setting_type(f) -> type:
    """The type a setting's text (a CLI flag, a `from_string` value) is read as: int, float or str."""
    return float if "float" in str(f.type) else int if "int" in str(f.type) else str


def parse_settings(text: str, known: dict[str, type]) -> dict:
    """The typed settings of `key=value,key=value` text (`known`: each allowed key and its type).

    A part without `=` continues the value before it, so comma lists such as `layer_map=0-2,1` need no quoting;
    hyphens may stand for underscores (`width-factor=2`); whole numbers may be written `1e6`.
    """
    values: dict = {}
    key = None
    for part in str(text).split(","):
        name, sep, value = part.partition("=")
        if not sep:
            if key is None or not part.strip():
                raise HfStackError(f"cannot read {part!r} in {text!r}: write key=value,key=value")
            values[key] += "," + part.strip()
            continue
        key = name.strip().replace("-", "_")
        if key not in known:
            raise HfStackError(f"unknown setting {name.strip()!r} in {text!r}; known: {', '.join(known)}")
        if key in values:
            raise HfStackError(f"setting {key!r} is given twice in {text!r}")
        values[key] = value.strip()
    typed = {}
    for key, value in values.items():
        kind = known[key]
        try:
            number = float(value) if kind is not str else None
            if kind is int and not number.is_integer():
                raise ValueError
            typed[key] = value if kind is str else kind(number)
        except ValueError:
            what = {int: "a whole number", float: "a number"}[kind]
            raise HfStackError(f"{key} must be {what}, got {value!r} in {text!r}") from None
    return typed
