"""Grown tensors as torch tensors: the in-memory path and any step that must decode bytes (dtype casts, pickle)."""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import HfStackError
from .width import is_norm

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


def init_tensor(name: str, shape: tuple[int, ...], plan) -> torch.Tensor:
    """The target architecture's own init (transformers' `_init_weights` for Llama-style models): normal(0,
    initializer_range) weights, unit norm weights, zero biases. Drawn from a stream seeded by the plan's seed and
    the tensor's name, so the streaming and in-memory paths give the same values."""
    if len(shape) == 1:
        return torch.ones(shape) if is_norm(name) else torch.zeros(shape)
    gen = torch.Generator().manual_seed(plan.seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen) * plan.init_std


def _fill(name: str, shape: tuple[int, ...], fill: str, plan) -> torch.Tensor:
    if fill == "random":
        return init_tensor(name, shape, plan)
    return torch.ones(shape) if fill == "one" else torch.zeros(shape)


def _zero_sum_noise(name, shape, dim, index, std, plan) -> torch.Tensor:
    """Noise along `dim` whose sum over the copies of each source unit is zero (a unit copied once gets none)."""
    gen = torch.Generator().manual_seed(plan.seed * 1_000_003 + zlib.crc32(("noise:" + name).encode()))
    noise = torch.randn(shape, generator=gen) * std
    group = index.clamp(min=0)
    sums = torch.zeros(shape[:dim] + (int(group.max()) + 1,) + shape[dim + 1 :]).index_add_(dim, group, noise)
    counts = torch.bincount(group).to(noise.dtype)
    view = [1] * len(shape)
    view[dim] = -1
    return noise - (sums / counts.clamp(min=1).view(view)).index_select(dim, group)


def widen(entry, src: torch.Tensor, plan) -> torch.Tensor:
    """Grow `src` along the plan's width axes: gather source units, scale them, fill new units.

    Cells of a new column take the column axis's fill; other cells of a new row the row axis's, so e.g. G_zero
    gets zero rows for new units except where they meet new (randomly initialised) columns.
    """
    out = src.to(torch.promote_types(src.dtype, torch.float32))
    new_masks = []
    for dim, name in enumerate(entry.axes):
        if name is None:
            new_masks.append(None)
            continue
        axis = plan.width[name]
        index = torch.tensor(axis.index)
        view = [1] * out.ndim
        view[dim] = -1
        scale = torch.tensor(axis.scale, dtype=torch.float32).view(view)
        out = out.index_select(dim, index.clamp(min=0)) * scale
        if axis.noise:
            out = out + _zero_sum_noise(entry.target, out.shape, dim, index, axis.noise * src.float().std(), plan)
        new_masks.append(index < 0)
    for dim, (name, new) in enumerate(zip(entry.axes, new_masks, strict=True)):
        if new is None or not new.any():
            continue
        fill = _fill(entry.target, entry.shape, plan.width[name].fill, plan)
        view = [1] * out.ndim
        view[dim] = -1
        out = torch.where(new.view(view), fill, out)
    return out


def materialize(entry, reader, plan, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Build one target tensor of a plan entry; always a fresh tensor, so no two targets share storage."""
    src = reader(entry.source)
    out_dtype = dtype or src.dtype
    if entry.op == "zero":
        return torch.zeros(entry.shape, dtype=out_dtype)
    if entry.op == "random":
        return init_tensor(entry.target, entry.shape, plan).to(out_dtype)
    if entry.op != "copy":
        raise HfStackError(f"tensor op {entry.op!r} is not computed tensor by tensor (see the operator)")
    if entry.widened:
        return widen(entry, src, plan).to(out_dtype).contiguous()
    return src.to(out_dtype, copy=True).contiguous()


def apply_plan(plan, read, dtype: str | None = None) -> dict[str, torch.Tensor]:
    """Build every target tensor of `plan` in memory (operators that need training: see `grown_tensors`).

    Args:
        plan: the [`~hf_stack.plan.GrowthPlan`].
        read: source tensor name -> tensor (a [`TensorReader`] over files, or a live model's `state_dict().__getitem__`).
        dtype: optional target dtype name.
    """
    torch_dtype = TORCH_DTYPES[dtype] if dtype else None
    return {entry.target: materialize(entry, read, plan, torch_dtype) for entry in plan.tensors}


def grown_tensors(plan, read, stacked, tokenizer=None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Every target tensor of `plan`, training the operator's maps first when it learns them (`learn`).

    Args:
        plan: the [`~hf_stack.plan.GrowthPlan`].
        read: source tensor name -> tensor.
        stacked: the [`StackedConfig`] (dtype, and the `learn_*` settings).
        tokenizer: tokenises `stacked.learn_data` (needed by `learn` only).

    Returns:
        `(tensors, learn_record)`; the record (losses, steps) is None unless maps were trained.
    """
    if not any(entry.op == "learn" for entry in plan.tensors):
        return apply_plan(plan, read, stacked.dtype), None
    from .data import build_dataset
    from .operators.learn import learn_tensors

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
