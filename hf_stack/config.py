"""Growth settings (`StackedConfig`) and the provenance file `growth_config.json` written beside a grown model."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

from .errors import HfStackError

GROWTH_CONFIG_NAME = "growth_config.json"
ORDERS = ("stack", "interpolate", "middle")


@dataclass
class StackedConfig:
    """How to grow a small checkpoint into a deeper one.

    Give one of `factor`, `num_layers` or `layer_map`. The default, `StackedConfig(factor=4)`, is the paper's
    G_stack: the whole layer stack repeated four times (target layer i <- source layer i mod L).

    Args:
        operator (`str`, defaults to `"stack"`):
            Registered growth operator (`hf_stack.operators.OPERATORS`).
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

    Paper: Du et al., "Stacking Your Transformers", NeurIPS 2024, https://arxiv.org/abs/2405.15319

    Example:

    ```python
    >>> from hf_stack import StackedConfig
    >>> StackedConfig(factor=4).target_num_layers(6)
    24
    ```
    """

    operator: str = field(
        default="stack", metadata={"help": "Growth operator: stack (G_stack) or zero (identity copies)."}
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
    # Filled by `from_pretrained` with the whole growth_config.json; not a setting (init=False keeps it off CLIs).
    provenance: dict | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.layer_map, (list, tuple)):
            from .plan import layer_map_to_slices

            if not all(isinstance(j, int) and j >= 0 for j in self.layer_map):
                raise HfStackError(f"layer_map must list non-negative layer indices, got {self.layer_map!r}")
            self.layer_map = ",".join(
                f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in layer_map_to_slices(self.layer_map)
            )
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
        if self.factor is None and self.num_layers is None and self.layer_map is None:
            self.factor = 4
        if self.factor is not None and self.num_layers is not None:
            raise HfStackError("give either factor or num_layers, not both")
        if self.order not in ORDERS:
            raise HfStackError(f"unknown order {self.order!r}; choose one of: {', '.join(ORDERS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise HfStackError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        from .operators import get_operator

        get_operator(self.operator)

    def target_num_layers(self, source_num_layers: int) -> int:
        """Number of layers of the grown model for a source with `source_num_layers` layers."""
        if self.num_layers is not None:
            return self.num_layers
        if self.layer_map is not None:
            from .plan import parse_layer_map

            return len(parse_layer_map(self.layer_map))
        return self.factor * source_num_layers

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

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
            from .io import hub_file

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
