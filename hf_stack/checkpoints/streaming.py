"""Stage 2, writing: grown tensors -> standard checkpoint, the streaming writer behind `hf-stack grow` and `grow`.

Copies that keep the dtype never decode a tensor: bytes go from the source shard to the output shard with
`os.copy_file_range`, so memory stays flat whatever the model size and torch is not imported.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import HfStackError
from ..plans.config import StackedConfig
from ..plans.plan import GrowthPlan
from .card import update_card
from .folders import atomic_output_dir, check_free_space, copy_aux_files, parse_size
from .provenance import growth_record, source_info, write_growth_record
from .source import (
    DTYPE_SIZES,
    SAFE_INDEX,
    SAFE_SINGLE,
    SourceCheckpoint,
    planned_source,
    source_tokenizer,
)

SAFE_DTYPE_OF = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    write: Callable  # (file object) -> None; writes exactly nbytes


def _copy_bytes(src_fd: int, offset: int, nbytes: int, dst) -> None:
    dst.flush()
    dst_fd = dst.fileno()
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, offset + done)
            if n == 0:
                raise HfStackError("a source shard ended early (truncated while reading?)")
            done += n
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (18, 22, 38, 95, 1):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP, EPERM
            raise
        # copy_file_range unsupported here (other OS or filesystem): plain reads and writes.
        dst.seek(0, os.SEEK_END)
        while done < nbytes:
            buf = os.pread(src_fd, min(CHUNK, nbytes - done), offset + done)
            if not buf:
                raise HfStackError("a source shard ended early (truncated while reading?)") from None
            dst.write(buf)
            done += len(buf)
        dst.flush()
    os.lseek(dst_fd, 0, os.SEEK_END)


def _write_zeros(nbytes: int, dst) -> None:
    block = bytes(min(CHUNK, nbytes))
    left = nbytes
    while left:
        dst.write(block[: min(left, len(block))])
        left -= min(left, len(block))


def _header_bytes(tensors: list[OutputTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def write_shards(folder: Path, tensors: list[OutputTensor], max_shard_size: int, progress=None) -> list[str]:
    """Write `tensors` as HF-named safetensors shards (plus the index when there is more than one)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    names = [SAFE_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, shards, strict=False):
        with open(folder / name, "wb") as f:
            f.write(_header_bytes(shard))
            for t in shard:
                t.write(f)
                if progress is not None:
                    progress.update(t.nbytes)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {t.name: name for name, shard in zip(names, shards, strict=False) for t in shard},
        }
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _target_config(plan: GrowthPlan, dtype: str | None) -> dict:
    config = dict(plan.target_config)
    if dtype is not None:
        # transformers 5 writes "dtype"; older checkpoints carry "torch_dtype": update whichever is there.
        key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
        config[key] = dtype
    return config


def _output_tensors(
    plan: GrowthPlan, source: SourceCheckpoint, dtype: str | None, fds: dict, computed: dict | None = None
) -> list[OutputTensor]:
    """One writer per target tensor; `computed` holds tensors already built in memory (trained operators)."""
    out_dtype = SAFE_DTYPE_OF[dtype] if dtype else None
    reader = None
    result = []
    for entry in plan.tensors:
        loc = source.tensors[entry.source]
        target_dtype = out_dtype or entry.dtype
        nbytes = math.prod(entry.shape) * DTYPE_SIZES[target_dtype]
        if computed is not None:
            from .tensors import tensor_buffer

            def write(f, t=computed[entry.target]):
                f.write(tensor_buffer(t))
        elif target_dtype == entry.dtype and not source.pickle and entry.op == "copy" and not entry.widened:
            if loc.file not in fds:
                fds[loc.file] = os.open(loc.file, os.O_RDONLY)
            fd = fds[loc.file]

            def write(f, fd=fd, offset=loc.offset, n=nbytes):
                _copy_bytes(fd, offset, n, f)
        elif entry.op == "zero":

            def write(f, n=nbytes):
                _write_zeros(n, f)
        else:
            # Decoding needed (width growth, random init, dtype cast or pickle source): torch is imported only here.
            from .tensors import TORCH_DTYPES, TensorReader, materialize_blocks, tensor_buffer

            reader = reader or TensorReader(source)

            def write(f, entry=entry, reader=reader):
                for block in materialize_blocks(entry, reader, plan, TORCH_DTYPES.get(dtype)):
                    f.write(tensor_buffer(block))

        result.append(OutputTensor(entry.target, target_dtype, entry.shape, nbytes, write))
    return result


def grow(
    pretrained_model_name_or_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    stacked_config: StackedConfig | None = None,
    *,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    verify: bool = False,
    progress: bool | None = None,
) -> GrowthPlan:
    """Grow a checkpoint on disk, streaming: one tensor at a time, memory flat in the model size.

    Writes a standard transformers checkpoint (sharded safetensors, `config.json`, tokenizer and generation
    files) plus `growth_config.json` to `output_dir`, atomically: the folder appears only once complete.

    Args:
        pretrained_model_name_or_path: the small model, a local folder or a Hub repo id.
        output_dir: the folder to create.
        stacked_config: growth settings; defaults to `StackedConfig(factor=4)` (G_stack).
        revision, token, cache_dir: passed to `huggingface_hub` for Hub ids.
        allow_pickle: accept `.bin` weights (loaded with `weights_only=True`).
        allow_nonfinite: grow even if source weights hold NaN or Inf (refused by default).
        overwrite: replace an existing `output_dir`.
        max_shard_size: largest output shard, e.g. "5GB".
        verify: reload the result with `AutoModelForCausalLM` and check it against the source (copies and copied
            units, and the logits of function-preserving growth; see `hf_stack.checkpoints.verify`).
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        The [`GrowthPlan`] that was applied.

    Example:

    ```python
    >>> from hf_stack import StackedConfig, grow
    >>> plan = grow("./small", "./grown", StackedConfig(factor=4))  # doctest: +SKIP
    >>> plan.slices()  # doctest: +SKIP
    [[0, 6], [0, 6], [0, 6], [0, 6]]
    ```
    """
    stacked = stacked_config or StackedConfig()
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise HfStackError(f"output folder {out} already exists; pass --overwrite (overwrite=True) to replace it")
    shard_limit = parse_size(max_shard_size)
    source, plan = planned_source(
        pretrained_model_name_or_path, stacked, revision=revision, token=token, cache_dir=cache_dir,
        allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
    )  # fmt: skip
    computed, learned = None, None
    if any(entry.op == "learn" for entry in plan.tensors):
        # Trained operators need every tensor at once; the streaming writer then only serialises them.
        from .tensors import TensorReader, grown_tensors

        computed, learned = grown_tensors(plan, TensorReader(source), stacked, source_tokenizer(source))
    fds: dict = {}
    try:
        tensors = _output_tensors(plan, source, stacked.dtype, fds, computed)
        total = sum(t.nbytes for t in tensors)
        check_free_space(out.parent if str(out.parent) else Path("."), total + 16 * 1024 * 1024)
        from tqdm.auto import tqdm

        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            with tqdm(
                total=total, unit="B", unit_scale=True, desc="grow", disable=None if progress is None else not progress
            ) as bar:
                write_shards(tmp, tensors, shard_limit, progress=bar)
            (tmp / "config.json").write_text(json.dumps(_target_config(plan, stacked.dtype), indent=2) + "\n")
            copy_aux_files(source.folder, tmp)
            record = growth_record(plan, stacked, source_info(source, plan.source_num_layers), learned)
            write_growth_record(tmp, record)
            update_card(tmp, repo_id=out.name, source_card=source.folder / "README.md")
            if verify:
                from .verify import verify_checkpoint

                verify_checkpoint(tmp, plan, source, stacked.dtype, computed)
    finally:
        for fd in fds.values():
            os.close(fd)
    return plan
