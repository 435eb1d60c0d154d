"""Stage 2, reading: resolve a source checkpoint (folder or Hub id), locate every tensor, scan for NaN / Inf.

safetensors files are a JSON header plus raw bytes, so tensors are located from the headers and scanned with
numpy, without torch; only pickle (`.bin`) sources, an explicit opt-in, are decoded by torch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import HfStackError, error_reason
from ..plans.plan import build_plan, check_source_config
from ..remote import validate_repo_id

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorLocation:
    """Where a source tensor's bytes live."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file (safetensors) or -1 (pickle)
    nbytes: int


@dataclass
class SourceCheckpoint:
    """A resolved source checkpoint: its folder, config and the location of every tensor.

    Attributes:
        name_or_path: what the user passed (folder or Hub id).
        folder: local folder holding the files.
        revision: requested revision (Hub ids only).
        commit: resolved commit hash (Hub ids only).
        config: `config.json` contents.
        tensors: tensor name -> location.
        pickle: whether weights come from `.bin` files (opt-in).
    """

    name_or_path: str
    folder: Path
    revision: str | None
    commit: str | None
    config: dict
    tensors: dict[str, TensorLocation]
    pickle: bool = False

    @property
    def tensor_infos(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {k: (t.dtype, t.shape) for k, t in self.tensors.items()}


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HfStackError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HfStackError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise HfStackError(f"{what} {path} is not a JSON object")
    return data


def read_safetensors_header(path: Path) -> dict[str, TensorLocation]:
    """Parse a safetensors header and check the file holds every byte it promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HfStackError(f"{path.name} is truncated (shorter than a safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise HfStackError(f"{path.name} has a corrupt or truncated safetensors header")
            raw = f.read(n)
    except FileNotFoundError:
        raise HfStackError(f"shard {path.name} is missing from {path.parent}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HfStackError(f"{path.name} has a corrupt safetensors header (not JSON)") from None
    base = 8 + n
    out: dict[str, TensorLocation] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HfStackError(f"{path.name}: tensor {name!r} has a malformed header entry") from None
        numel = 1
        for s in shape:
            numel *= s
        if dtype not in DTYPE_SIZES or end - begin != numel * DTYPE_SIZES[dtype] or begin < 0:
            raise HfStackError(
                f"{path.name}: tensor {name!r} header ({dtype}, {list(shape)}) does not match its byte range"
            )
        if base + end > size:
            raise HfStackError(f"{path.name} is truncated: tensor {name!r} ends past the end of the file")
        out[name] = TensorLocation(path, dtype, shape, base + begin, end - begin)
    return out


def _safe_member(folder: Path, name: str) -> Path:
    """A file named by the repository (e.g. in a shard index) must stay inside the model folder."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise HfStackError(f"the shard index names {name!r}, which is not a plain file name inside the model folder")
    return folder / name


def _read_weight_map(folder: Path, index_name: str) -> dict[str, str]:
    index = read_json(folder / index_name, "shard index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise HfStackError(f"{index_name} has no weight_map")
    return weight_map


def locate_tensors(folder: Path, allow_pickle: bool = False) -> tuple[dict[str, TensorLocation], bool]:
    """Find every tensor of the checkpoint in `folder`; returns (locations, is_pickle)."""
    if (folder / SAFE_INDEX).is_file():
        weight_map = _read_weight_map(folder, SAFE_INDEX)
        files = {name: _safe_member(folder, name) for name in set(weight_map.values())}
        headers: dict[str, TensorLocation] = {}
        for _name, path in sorted(files.items()):
            headers.update(read_safetensors_header(path))
        missing = sorted(k for k in weight_map if k not in headers)
        if missing:
            raise HfStackError(
                f"the shard index names {len(missing)} tensors that no shard holds (first: {missing[0]!r}); "
                "the download is incomplete or the index is stale"
            )
        return {k: headers[k] for k in weight_map}, False
    if (folder / SAFE_SINGLE).is_file():
        return read_safetensors_header(folder / SAFE_SINGLE), False
    if (folder / PICKLE_INDEX).is_file() or (folder / PICKLE_SINGLE).is_file():
        if not allow_pickle:
            raise HfStackError(
                f"{folder} has only pickle (.bin) weights, which can run code when loaded; pass --allow-pickle "
                "(allow_pickle=True) to load them with torch.load(weights_only=True)"
            )
        return _locate_pickle(folder), True
    raise HfStackError(f"{folder} holds no model weights (model.safetensors or {SAFE_INDEX})")


def _locate_pickle(folder: Path) -> dict[str, TensorLocation]:
    from .tensors import load_pickle_shard, safe_dtype_name

    if (folder / PICKLE_INDEX).is_file():
        weight_map = _read_weight_map(folder, PICKLE_INDEX)
        files = sorted({_safe_member(folder, n) for n in weight_map.values()})
    else:
        files = [folder / PICKLE_SINGLE]
    out: dict[str, TensorLocation] = {}
    for path in files:
        if not path.is_file():
            raise HfStackError(f"shard {path.name} is missing from {folder}")
        for name, t in load_pickle_shard(path).items():
            out[name] = TensorLocation(
                path, safe_dtype_name(t.dtype), tuple(t.shape), -1, t.numel() * t.element_size()
            )
    return out


def resolve_source(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> SourceCheckpoint:
    """Resolve a local folder or a Hub repo id to a [`SourceCheckpoint`] (downloading only what growth needs)."""
    name = str(name_or_path)
    path = Path(name)
    commit = None
    if path.exists():
        if not path.is_dir():
            raise HfStackError(f"{name} is a file; pass the model folder")
        folder = path
    else:
        validate_repo_id(name)
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "LICENSE*", "README.md"]
        if allow_pickle:
            patterns.append("*.bin")
        try:
            folder = Path(
                snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=patterns)
            )
        except Exception as e:
            raise HfStackError(f"cannot download {name!r}: {error_reason(e)}") from None
        commit = folder.name  # snapshot folders are named by commit hash
    config = read_json(folder / "config.json", "config.json")
    check_source_config(config)
    tensors, is_pickle = locate_tensors(folder, allow_pickle=allow_pickle)
    return SourceCheckpoint(name, folder, revision, commit, config, tensors, is_pickle)


# Exponent bits of each float format: a value is NaN or Inf exactly when they are all ones.
_EXPONENT_MASKS = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
                   "F64": ("<u8", 0x7FF0000000000000)}  # fmt: skip


def planned_source(
    pretrained_model_name_or_path,
    stacked,
    *,
    revision=None,
    token=None,
    cache_dir=None,
    allow_pickle=False,
    allow_nonfinite=False,
):
    """The resolved source and its growth plan, NaN/Inf weights refused unless allowed: the start of every growth."""
    source = resolve_source(
        pretrained_model_name_or_path, revision=revision, token=token, cache_dir=cache_dir, allow_pickle=allow_pickle
    )
    plan = build_plan(source.config, source.tensor_infos, stacked)
    if not allow_nonfinite:
        refuse_nonfinite(source, (t.source for t in plan.tensors))
    return source, plan


def nonfinite_tensors(source: SourceCheckpoint, names) -> list[str]:
    """Names among `names` whose values include NaN or Inf, read in bounded chunks straight from the files."""
    import numpy as np

    bad = []
    for name in names:
        loc = source.tensors[name]
        if loc.dtype not in _EXPONENT_MASKS:
            continue
        if source.pickle:
            import torch

            from .tensors import load_pickle_shard

            if not bool(torch.isfinite(load_pickle_shard(loc.file)[name]).all()):
                bad.append(name)
            continue
        fmt, mask = _EXPONENT_MASKS[loc.dtype]
        # Plain reads of bounded chunks (not a memmap, whose touched pages would all count as resident).
        chunk = 1 << 20
        with open(loc.file, "rb") as f:
            for start in range(0, loc.nbytes, chunk):
                data = np.frombuffer(os.pread(f.fileno(), min(chunk, loc.nbytes - start), loc.offset + start), fmt)
                if ((data & mask) == mask).any():
                    bad.append(name)
                    break
    return bad


def refuse_nonfinite(source: SourceCheckpoint, names) -> None:
    bad = nonfinite_tensors(source, sorted(set(names)))
    if bad:
        raise HfStackError(
            f"{len(bad)} source tensors hold NaN or Inf values (first: {bad[0]}); growing would copy them. "
            "Fix the checkpoint, or pass --allow-nonfinite (allow_nonfinite=True) to grow it anyway"
        )


def resolve_source_metadata(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> SourceCheckpoint:
    """Like [`resolve_source`] but, for Hub ids, fetch only the JSON files and the safetensors headers, so a
    dry run of a 70B source downloads kilobytes."""
    name = str(name_or_path)
    if Path(name).exists():
        return resolve_source(name, allow_pickle=True)
    validate_repo_id(name)
    from huggingface_hub import get_safetensors_metadata, snapshot_download

    try:
        folder = Path(
            snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir, allow_patterns=["*.json"])
        )
        meta = get_safetensors_metadata(name, revision=revision, token=token)
    except Exception as e:
        raise HfStackError(f"cannot read {name!r} from the Hub: {error_reason(e)}") from None
    config = read_json(folder / "config.json", "config.json")
    check_source_config(config)
    tensors = {
        key: TensorLocation(Path(file), info.dtype, tuple(info.shape), -1, info.data_offsets[1] - info.data_offsets[0])
        for file, fmeta in meta.files_metadata.items()
        for key, info in fmeta.tensors.items()
    }
    return SourceCheckpoint(name, folder, revision, folder.name, config, tensors)


def source_tokenizer(source: SourceCheckpoint):
    """The source's tokenizer when it ships one (the `learn` operator reads its data with it), else None."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.folder, trust_remote_code=False)
    except (OSError, ValueError):
        return None
