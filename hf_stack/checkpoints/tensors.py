"""Stage 2, growing: grown tensors as torch tensors, for the in-memory path and every step that must decode bytes
(width growth, random init, dtype casts, pickle); the streaming writer copies the rest byte for byte."""

from __future__ import annotations

import math
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import HfStackError, error_reason
from ..plans.width import new_vector

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


# Grown tensors are built in blocks of rows of about this many elements, so memory stays bounded by a few blocks
# (not a tensor) on the streaming path; every path builds the same blocks, so the bytes agree.
BLOCK_ELEMENTS = 1 << 22


def _generator(plan, *key) -> torch.Generator:
    return torch.Generator().manual_seed(plan.seed * 1_000_003 + zlib.crc32(":".join(map(str, key)).encode()))


def _random(name: str, r0: int, shape: tuple[int, ...], plan) -> torch.Tensor:
    """The target architecture's own init (transformers' `_init_weights`) for rows from r0: normal(0,
    initializer_range) weights, 1-D weights per `new_vector` (unit norms as the family stores them, zero biases);
    seeded by the plan's seed, the tensor's name and the block."""
    if len(shape) == 1:
        return torch.tensor(new_vector(name, plan.target_config.get("model_type"), r0, shape[0]))
    return torch.randn(shape, generator=_generator(plan, name, r0)) * plan.init_std


def _fill(name: str, r0: int, shape: tuple[int, ...], axis, plan) -> torch.Tensor:
    """New units along `axis`, filled per its `fill`."""
    if axis.fill == "one":
        return torch.full(shape, 1.0 - axis.offset)  # a norm's unit multiplier as stored: Gemma's `1 + w` stores 0
    if axis.fill == "random":
        return _random(name, r0, shape, plan)
    return torch.zeros(shape)


_SCRATCH = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread work buffer, reused from block to block: a fresh tensor of several MB per step costs more in
    page faults than the arithmetic done in it."""
    n = math.prod(shape)
    buf = getattr(_SCRATCH, slot, None)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        setattr(_SCRATCH, slot, buf)
    return buf[:n].view(shape)


class _Columns:
    """A column map, target columns `dst` <- source columns `src`, applied as slices when it is a few contiguous
    runs (the usual case: copies are appended in order) and as index gathers otherwise."""

    MAX_RUNS = 64

    def __init__(self, dst: list[int], src: list[int]):
        runs: list[list[int]] = []
        for d, s in zip(dst, src):
            if runs and runs[-1][0] + runs[-1][2] == d and runs[-1][1] + runs[-1][2] == s:
                runs[-1][2] += 1
            else:
                runs.append([d, s, 1])
        self.runs = runs if len(runs) <= self.MAX_RUNS else None
        self.dst, self.src = torch.tensor(dst, dtype=torch.long), torch.tensor(src, dtype=torch.long)

    def gather(self, values: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        """A new (rows x width) tensor whose column dst[i] is values' column src[i] (dst covers every column)."""
        if self.runs is None:
            return values.index_select(1, self.src).to(dtype)
        out = _scratch("columns", (values.shape[0], width, *values.shape[2:]), dtype)
        for d, s, n in self.runs:
            out[:, d : d + n].copy_(values[:, s : s + n])
        return out

    def add(self, out: torch.Tensor, values: torch.Tensor, alpha: float = 1) -> None:
        """out[:, dst[i]] += alpha * values[:, src[i]], dst without repeats (alpha is +-1: exact)."""
        if self.runs is None:
            out.index_add_(1, self.dst, values.index_select(1, self.src), alpha=alpha)
            return
        for d, s, n in self.runs:
            out[:, d : d + n].add_(values[:, s : s + n], alpha=alpha)


class _AxisTensors:
    """An axis's lists as tensors and column maps, built once per axis (not per block): the source unit of every
    target unit (new units read unit 0, then get their fill), the scale, which units are new, and for the
    zero-sum noise where each later copy's draw goes and where each first copy's minus-sum goes."""

    def __init__(self, axis):
        index = list(axis.index)
        source = [max(j, 0) for j in index]
        self.source = torch.tensor(source, dtype=torch.long)
        self.columns = _Columns(list(range(len(index))), source)
        self.scale = torch.tensor(axis.scale, dtype=torch.float64)  # rounded to the work dtype where used
        self.unit_scale = all(s == 1.0 for s in axis.scale)  # x * 1.0 == x: the multiply can be skipped
        self.new = torch.tensor([j < 0 for j in index])
        self.any_new = any(j < 0 for j in index)
        # Noise: one draw per later copy (eps column m for the m-th later copy, in target order); a unit's first
        # copy takes minus the sum of its later copies' draws, added in target order as a running sum would.
        first: dict[int, int] = {}
        later = [k for k, j in enumerate(index) if j >= 0 and first.setdefault(j, k) != k]
        self.n_later = len(later)
        copies: dict[int, list[int]] = {}  # source unit -> eps columns of its later copies
        for m, k in enumerate(later):
            copies.setdefault(index[k], []).append(m)
        self.later = _Columns(later, list(range(len(later))))
        self.depth = max((len(c) for c in copies.values()), default=0)
        firsts = [first[j] for j in copies]
        if self.depth == 1:  # each unit copied at most twice: the sum is the one draw
            self.first = _Columns(firsts, [c[0] for c in copies.values()])
        else:
            # per rank r: the eps column of each copied unit's r-th later copy, or the zero column past eps
            self.ranks = [
                torch.tensor([c[r] if r < len(c) else len(later) for c in copies.values()]) for r in range(self.depth)
            ]
            self.first = _Columns(firsts, list(range(len(copies))))


@lru_cache(maxsize=256)
def _axis_tensors(axis) -> _AxisTensors:
    return _AxisTensors(axis)


def _add_zero_sum_noise(block: torch.Tensor, name: str, r0: int, axis, std: Future, plan) -> None:
    """Add column noise that sums to zero over the copies of each source unit: every later copy draws its own, the
    first copy takes minus their sum; a unit copied once gets none. `std` is the source tensor's std, a future:
    the draws do not wait for it."""
    t = _axis_tensors(axis)
    if not t.n_later:
        return
    rows = block.shape[0]
    eps = _scratch("noise", (rows, t.n_later), torch.float32)  # drawn in float32 whatever the work dtype
    torch.randn(rows, t.n_later, generator=_generator(plan, "noise", name, r0), out=eps)
    eps.mul_(axis.noise * std.result())
    t.later.add(block, eps)
    if t.depth == 1:
        t.first.add(block, eps, alpha=-1)
        return
    padded = torch.cat([eps, eps.new_zeros(rows, 1)], dim=1)
    sums = padded.index_select(1, t.ranks[0])
    for rank in t.ranks[1:]:
        sums += padded.index_select(1, rank)
    t.first.add(block, sums, alpha=-1)


def _widen_block(entry, src: torch.Tensor, plan, r0: int, r1: int, std: Future) -> torch.Tensor:
    """Rows r0:r1 of the widened tensor: gather source units, scale them, add noise, fill new units. The result
    may be this thread's work buffer: valid until the thread builds its next block.

    Cells of a new column take the column axis's fill; other cells of a new row the row axis's, so e.g. G_zero
    gets zero rows for new units except where they meet new (randomly initialised) columns.
    """
    work = torch.promote_types(src.dtype, torch.float32)
    names = list(entry.axes) + [None] * (2 - len(entry.axes))
    row_axis, col_axis = (plan.width[n] if n else None for n in names[:2])
    shape = (r1 - r0, *entry.shape[1:])
    new_rows = new_cols = None
    if row_axis is not None:
        rows = _axis_tensors(row_axis)
        block = src.index_select(0, rows.source[r0:r1])
        if not rows.unit_scale:  # a norm's offset: its scale applies to offset + w
            scale, off = rows.scale[r0:r1].to(work).view(-1, *([1] * (block.ndim - 1))), row_axis.offset
            block = block.to(work) * scale + off * (scale - 1) if off else block.to(work) * scale
        new_rows = rows.new[r0:r1] if rows.any_new else None
    else:
        block = src[r0:r1]
    if col_axis is not None:
        cols = _axis_tensors(col_axis)
        block = cols.columns.gather(block, col_axis.target_size, work)
        if not cols.unit_scale:
            block *= cols.scale.to(work)
        if col_axis.noise:
            _add_zero_sum_noise(block, entry.target, r0, col_axis, std, plan)
        new_cols = cols.new if cols.any_new else None
    else:
        block = block.to(work)
    if new_rows is not None and new_rows.any():
        block[new_rows] = _fill(entry.target, r0, (int(new_rows.sum()), *shape[1:]), row_axis, plan).to(work)
    if new_cols is not None:
        cells = (shape[0], int(new_cols.sum()))
        block[:, new_cols] = _fill("cols:" + entry.target, r0, cells, col_axis, plan).to(work)
    return block


@lru_cache(maxsize=1)
def _pool() -> tuple[ThreadPoolExecutor, int]:
    """Workers that build blocks ahead of the writer, and their number; torch releases the GIL inside its kernels,
    so the noise draws (one generator per block, serial within it) of different blocks run on different cores."""
    workers = max(1, min(4, torch.get_num_threads()))
    return ThreadPoolExecutor(workers, thread_name_prefix="hf_stack-blocks"), workers


def materialize_blocks(entry, reader, plan, dtype: torch.dtype | None = None):
    """Yield one target tensor of a plan entry as consecutive blocks of rows (row-major: their bytes, one after
    the other, are the tensor's); always fresh tensors, so no two targets share storage. Blocks are built ahead
    on worker threads, at most one per worker beyond the one yielded, so memory stays bounded by a few blocks."""
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
    std: Future = Future()  # set below, while the first blocks are being built

    def set_std() -> None:
        try:
            # in the source dtype: a float32 copy of the largest tensor would set the peak memory
            std.set_result(float(src.std()) if noisy and src.numel() > 1 else 0.0)
        except BaseException as e:
            std.set_exception(e)
            raise

    def build(r0: int) -> torch.Tensor:
        r1 = min(shape[0], r0 + step)
        if entry.op == "zero":
            block = torch.zeros((r1 - r0, *shape[1:]))
        elif entry.op == "random":
            block = _random(entry.target, r0, (r1 - r0, *shape[1:]), plan)
        else:
            block = _widen_block(entry, src, plan, r0, r1, std)
        # a copy always: the block may be a reused work buffer
        return block.to(out_dtype, memory_format=torch.contiguous_format, copy=True)

    starts = range(0, shape[0], step)
    if len(starts) == 1:
        set_std()
        yield build(0)
        return
    pool, workers = _pool()
    ahead: deque = deque()
    try:
        ahead.extend(pool.submit(build, r0) for r0 in starts[:workers])
        set_std()
        for r0 in starts[workers:]:
            block = ahead.popleft().result()
            ahead.append(pool.submit(build, r0))
            yield block
        while ahead:
            yield ahead.popleft().result()
    finally:  # interrupted, or the consumer stopped early: no worker may wait for the std forever
        if not std.done():
            std.set_exception(HfStackError("growth interrupted"))
        for future in ahead:
            future.cancel()


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


def tensor_buffer(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them, without a copy when it is contiguous."""
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())
