"""Grown tensors as torch tensors: the in-memory path and any step that must decode bytes (dtype casts, pickle)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import HfStackError

SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def safe_dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in SAFE_DTYPES.items()}[dtype]


@lru_cache(maxsize=1)
def load_pickle_shard(path: Path) -> dict[str, torch.Tensor]:
    """Load a `.bin` shard without running code from it (`weights_only=True`); one shard is kept cached."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise HfStackError(f"cannot load {path.name} with weights_only=True: {type(e).__name__}: {e}") from None


class TensorReader:
    """Reads source tensors by name, keeping one safetensors handle per shard open."""

    def __init__(self, source):
        self.source = source
        self._handles: dict[Path, object] = {}

    def __call__(self, name: str) -> torch.Tensor:
        loc = self.source.tensors[name]
        if self.source.pickle:
            return load_pickle_shard(loc.file)[name]
        if loc.file not in self._handles:
            self._handles[loc.file] = safe_open(loc.file, framework="pt")
        return self._handles[loc.file].get_tensor(name)


def materialize(entry, reader: TensorReader, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Build one target tensor of a plan entry; always a fresh tensor, so no two targets share storage."""
    src = reader(entry.source)
    out_dtype = dtype or src.dtype
    if entry.op == "zero":
        return torch.zeros(entry.shape, dtype=out_dtype)
    if entry.op != "copy":
        raise HfStackError(f"unknown tensor op {entry.op!r} in the plan")
    return src.to(out_dtype, copy=True).contiguous()


def apply_plan(plan, read, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """Build every target tensor of `plan` in memory.

    Args:
        plan: the [`~hf_stack.plan.GrowthPlan`].
        read: source tensor name -> tensor (a [`TensorReader`] over files, or a live model's `state_dict().__getitem__`).
        dtype: optional target dtype name.
    """
    torch_dtype = TORCH_DTYPES[dtype] if dtype else None
    return {entry.target: materialize(entry, read, torch_dtype) for entry in plan.tensors}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous tensor, as safetensors stores them."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
