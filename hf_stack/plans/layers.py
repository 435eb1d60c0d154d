"""Stage 1, layer maps (target layer i <- source layer layer_map[i]) as text and as `[start, end)` slices."""

from __future__ import annotations

import re

from ..errors import HfStackError

MAX_TARGET_LAYERS = 4096


def layer_map_to_slices(layer_map: tuple[int, ...] | list[int]) -> list[list[int]]:
    """The layer map as `[start, end)` source ranges, the format of mergekit's `layer_range` and peft's
    `layer_replication`."""
    slices: list[list[int]] = []
    for j in layer_map:
        if slices and slices[-1][1] == j:
            slices[-1][1] = j + 1
        else:
            slices.append([j, j + 1])
    return slices


def parse_layer_map(spec: str) -> tuple[int, ...]:
    """Parse `"0-5,0-5,2-3"` (inclusive ranges and single indices) into a tuple of source layer indices."""
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise HfStackError(f"cannot parse layer map part {part!r} of {spec!r}; write ranges like 0-5,0-5,2-3")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise HfStackError(f"layer map range {part!r} runs backwards; write {b}-{a} or list the layers")
        if b - a >= MAX_TARGET_LAYERS:
            raise HfStackError(f"layer map range {part!r} is longer than {MAX_TARGET_LAYERS} layers")
        out.extend(range(a, b + 1))
    return tuple(out)


def format_layer_map(layer_map: tuple[int, ...] | list[int]) -> str:
    """The inverse of [`parse_layer_map`]: `(0, 1, 2, 0, 1, 2)` -> `"0-2,0-2"`."""
    return ",".join(f"{a}-{b - 1}" if b - a > 1 else str(a) for a, b in layer_map_to_slices(layer_map))
