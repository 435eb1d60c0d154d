"""Stage 2, growing: grown tensors as torch tensors, for the in-memory path and every step that must decode bytes
(width growth, random init, dtype casts, pickle); the streaming writer copies the rest byte for byte."""

from __future__ import annotations

import math
import zlib
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import HfStackError, error_reason
from ..plans.width import is_norm

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
        raise HfStackError(f"cannot load {path.name} with weights_only=True: {error_reason(e)}") from None


class TensorReader:
    """Reads source tensors by name into private memory (plain reads at the header's offsets, no memory map: a
    map's pages would stay resident and count against the process as a large model streams through)."""

    def __init__(self, source):
        self.source = source

    def __call__(self, name: str) -> torch.Tensor:
        loc = self.source.tensors[name]
        if self.source.pickle:
            return load_pickle_shard(loc.file)[name]
        buf = bytearray(loc.nbytes)
        with open(loc.file, "rb") as f:
            f.seek(loc.offset)
            if f.readinto(buf) != loc.nbytes:
                raise HfStackError(f"{loc.file.name} ended early while reading {name} (truncated?)")
        if not buf:
            return torch.empty(loc.shape, dtype=SAFE_DTYPES[loc.dtype])
        return torch.frombuffer(buf, dtype=SAFE_DTYPES[loc.dtype]).reshape(loc.shape)


# Grown tensors are built in blocks of rows of about this many elements, so memory stays bounded by a block
# (not a tensor) on the streaming path; every path builds the same blocks, so the bytes agree.
BLOCK_ELEMENTS = 1 << 22


def _generator(plan, *key) -> torch.Generator:
    return torch.Generator().manual_seed(plan.seed * 1_000_003 + zlib.crc32(":".join(map(str, key)).encode()))


def _random(name: str, r0: int, shape: tuple[int, ...], plan) -> torch.Tensor:
    """The target architecture's own init (transformers' `_init_weights` for Llama-style models) for rows from r0:
    normal(0, initializer_range) weights, unit norm weights, zero biases; seeded by the plan's seed, the tensor's
    name and the block."""
    if len(shape) == 1:
        return torch.ones(shape) if is_norm(name) else torch.zeros(shape)
    return torch.randn(shape, generator=_generator(plan, name, r0)) * plan.init_std


def _fill(name: str, r0: int, shape: tuple[int, ...], fill: str, plan) -> torch.Tensor:
    if fill == "random":
        return _random(name, r0, shape, plan)
    return torch.ones(shape) if fill == "one" else torch.zeros(shape)


def _zero_sum_noise(name: str, r0: int, rows: int, axis, std: float, plan) -> torch.Tensor:
    """Column noise (rows x target units) that sums to zero over the copies of each source unit: every later copy
    draws its own, the first copy takes minus their sum; a unit copied once gets none."""
    first: dict[int, int] = {}
    later = [k for k, j in enumerate(axis.index) if j >= 0 and first.setdefault(j, k) != k]
    noise = torch.zeros(rows, axis.target_size)
    if later:
        eps = torch.randn(rows, len(later), generator=_generator(plan, "noise", name, r0)) * std
        sums = torch.zeros(rows, axis.source_size).index_add_(1, torch.tensor([axis.index[k] for k in later]), eps)
        noise[:, later] = eps
        noise[:, list(first.values())] = -sums[:, list(first)]
    return noise


def _widen_block(entry, src: torch.Tensor, plan, r0: int, r1: int, std: float) -> torch.Tensor:
    """Rows r0:r1 of the widened tensor: gather source units, scale them, add noise, fill new units.

    Cells of a new column take the column axis's fill; other cells of a new row the row axis's, so e.g. G_zero
    gets zero rows for new units except where they meet new (randomly initialised) columns.
    """
    work = torch.promote_types(src.dtype, torch.float32)
    names = list(entry.axes) + [None] * (2 - len(entry.axes))
    row_axis, col_axis = (plan.width[n] if n else None for n in names[:2])
    shape = (r1 - r0, *entry.shape[1:])
    new_rows = new_cols = None
    if row_axis is not None:
        index = torch.tensor(row_axis.index[r0:r1])
        block = src.index_select(0, index.clamp(min=0)).to(work)
        scale = torch.tensor(row_axis.scale[r0:r1], dtype=work)
        block *= scale.view(-1, *([1] * (block.ndim - 1)))
        new_rows = index < 0
    else:
        block = src[r0:r1].to(work)
    if col_axis is not None:
        index = torch.tensor(col_axis.index)
        block = block.index_select(1, index.clamp(min=0)) * torch.tensor(col_axis.scale, dtype=work)
        if col_axis.noise:
            block += _zero_sum_noise(entry.target, r0, r1 - r0, col_axis, col_axis.noise * std, plan)
        new_cols = index < 0
    if new_rows is not None and new_rows.any():
        block[new_rows] = _fill(entry.target, r0, (int(new_rows.sum()), *shape[1:]), row_axis.fill, plan).to(work)
    if new_cols is not None and new_cols.any():
        cells = (shape[0], int(new_cols.sum()))
        block[:, new_cols] = _fill("cols:" + entry.target, r0, cells, col_axis.fill, plan).to(work)
    return block


def materialize_blocks(entry, reader, plan, dtype: torch.dtype | None = None):
    """Yield one target tensor of a plan entry as consecutive blocks of rows (row-major: their bytes, one after
    the other, are the tensor's); always fresh tensors, so no two targets share storage."""
    if entry.op not in ("copy", "zero", "random"):
        raise HfStackError(f"tensor op {entry.op!r} is not computed tensor by tensor (see the operator)")
    out_dtype = dtype or SAFE_DTYPES[entry.dtype]
    src = reader(entry.source) if entry.op == "copy" else None  # zero and random tensors need no source bytes
    if entry.op == "copy" and not entry.widened:
        yield src.to(out_dtype, copy=True).contiguous()
        return
    shape = entry.shape
    step = max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:]))) if len(shape) > 1 else shape[0]
    noisy = src is not None and any(n and plan.width[n].noise for n in entry.axes)
    # in the source dtype: a float32 copy of the largest tensor would set the peak memory
    std = float(src.std()) if noisy and src.numel() > 1 else 0.0
    for r0 in range(0, shape[0], step):
        r1 = min(shape[0], r0 + step)
        if entry.op == "zero":
            block = torch.zeros((r1 - r0, *shape[1:]))
        elif entry.op == "random":
            block = _random(entry.target, r0, (r1 - r0, *shape[1:]), plan)
        else:
            block = _widen_block(entry, src, plan, r0, r1, std)
        yield block.to(out_dtype).contiguous()


def materialize(entry, reader, plan, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One target tensor of a plan entry, whole (the in-memory path; see [`materialize_blocks`])."""
    blocks = list(materialize_blocks(entry, reader, plan, dtype))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def apply_plan(plan, read, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """Build every target tensor of `plan` in memory (operators that need training: see `grown_tensors`).

    Args:
        plan: the [`~hf_stack.plans.plan.GrowthPlan`].
        read: source tensor name -> tensor (a [`TensorReader`] over files, or a live model's `state_dict().__getitem__`).
        dtype: optional target dtype name.
    """
    torch_dtype = TORCH_DTYPES[dtype] if dtype else None
    return {entry.target: materialize(entry, read, plan, torch_dtype) for entry in plan.tensors}


def grown_tensors(plan, read, stacked, tokenizer=None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Every target tensor of `plan`, training the operator's maps first when it learns them (`learn`).

    Args:
        plan: the [`~hf_stack.plans.plan.GrowthPlan`].
        read: source tensor name -> tensor.
        stacked: the [`~hf_stack.plans.config.StackedConfig`] (dtype, and the `learn_*` settings).
        tokenizer: tokenises `stacked.learn_data` (needed by `learn` only).

    Returns:
        `(tensors, learn_record)`; the record (losses, steps) is None unless maps were trained.
    """
    if not any(entry.op == "learn" for entry in plan.tensors):
        return apply_plan(plan, read, stacked.dtype), None
    from ..data import build_dataset
    from .ligo import learn_tensors

    if tokenizer is None:
        raise HfStackError("operator 'learn' needs the source's tokenizer to read --learn-data")
    steps, batch, block = stacked.learn_steps, stacked.learn_batch_size, stacked.learn_block_size
    sources = [s.strip() for s in stacked.learn_data.split(",") if s.strip()]
    train, _ = build_dataset(sources, tokenizer, block, seed=stacked.init_seed, max_tokens=steps * batch * block)
    tensors, record = learn_tensors(
        plan, read, train[:]["input_ids"], steps=steps, lr=stacked.learn_lr, batch_size=batch, seed=stacked.init_seed
    )
    out_dtype = TORCH_DTYPES.get(stacked.dtype) if stacked.dtype else None
    return {e.target: tensors[e.target].to(out_dtype or SAFE_DTYPES[e.dtype]) for e in plan.tensors}, record


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous tensor, as safetensors stores them."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
