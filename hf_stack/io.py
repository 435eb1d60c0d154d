"""Checkpoint I/O: resolve a source (folder or Hub id), read safetensors headers, write shards atomically.

Nothing here imports torch: safetensors files are a JSON header plus raw bytes, so tensors can be located and
copied byte for byte without decoding.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import HfStackError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Files copied next to the grown weights: tokenizer, generation defaults, licence.
AUX_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
)
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
    from .tensors import load_pickle_shard

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
                path, _torch_to_safe_dtype(t.dtype), tuple(t.shape), -1, t.numel() * t.element_size()
            )
    return out


def _torch_to_safe_dtype(dtype) -> str:
    from .tensors import SAFE_DTYPES

    return {v: k for k, v in SAFE_DTYPES.items()}[dtype]


def hub_file(
    repo_id: str, filename: str, revision: str | None = None, token: str | None = None, cache_dir=None
) -> str:
    """Download one file of a Hub repo (honours HF_HUB_OFFLINE and the cache)."""
    from huggingface_hub import hf_hub_download

    validate_repo_id(repo_id)
    try:
        return hf_hub_download(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir)
    except Exception as e:  # huggingface_hub raises many types; all mean "could not get it"
        raise HfStackError(f"cannot get {filename} from {repo_id!r}: {_hub_reason(e)}") from None


def _hub_reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {text}"


def validate_repo_id(repo_id: str, source: bool = True) -> None:
    """Refuse ids the Hub would refuse; `source` says the string could also have been a local folder."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as _validate

    try:
        _validate(repo_id)
    except HFValidationError:
        what = "neither an existing folder nor a valid Hub repo id" if source else "not a valid Hub repo id"
        raise HfStackError(f"{repo_id!r} is {what} (write it as namespace/name)") from None


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
            raise HfStackError(f"cannot download {name!r}: {_hub_reason(e)}") from None
        commit = folder.name  # snapshot folders are named by commit hash
    config = read_json(folder / "config.json", "config.json")
    from .plan import check_source_config

    check_source_config(config)
    tensors, is_pickle = locate_tensors(folder, allow_pickle=allow_pickle)
    return SourceCheckpoint(name, folder, revision, commit, config, tensors, is_pickle)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MB', '2GiB', or a plain byte count."""
    if isinstance(text, int):
        return text
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num) :]
    try:
        value = int(float(num) * units[unit])
    except (ValueError, KeyError):
        raise HfStackError(f"cannot read size {text!r}; write e.g. 5GB or 500MB") from None
    if value <= 0:
        raise HfStackError(f"size {text!r} must be positive")
    return value


# Exponent bits of each float format: a value is NaN or Inf exactly when they are all ones.
_EXPONENT_MASKS = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
                   "F64": ("<u8", 0x7FF0000000000000)}  # fmt: skip


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


def _owner_alive(tmp: Path) -> bool:
    try:
        os.kill(int((tmp / ".hf_stack_pid").read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; rename it into place only if the body succeeds.

    On any error (including a full disk) the temporary folder is removed, so `out` either does not exist or
    holds a complete result; an existing `out` is only replaced with `overwrite`.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise HfStackError(f"output folder {out} already exists; pass --overwrite (overwrite=True) to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    # Leftovers of runs killed with SIGKILL (which no handler can clean up) go first.
    for stale in parent.glob(f".{out.name}.tmp-*") if parent.is_dir() else []:
        if not _owner_alive(stale):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        (tmp / ".hf_stack_pid").write_text(str(os.getpid()))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
    except OSError as e:
        raise HfStackError(f"cannot create the output folder in {parent}: {e.strerror or e}") from None
    try:
        yield tmp
        (tmp / ".hf_stack_pid").unlink()
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, trash / "old")
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise HfStackError(f"no space left on the device holding {parent}; free space and run again") from None
        raise HfStackError(f"writing {out} failed: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    if free < needed:
        raise HfStackError(
            f"not enough disk space in {folder}: the grown checkpoint needs {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free"
        )


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in AUX_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


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
        raise HfStackError(f"cannot read {name!r} from the Hub: {_hub_reason(e)}") from None
    config = read_json(folder / "config.json", "config.json")
    from .plan import check_source_config

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
