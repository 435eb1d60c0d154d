"""Stage 2, writing: output folders that appear only when complete, free-space checks, shard sizes and the files
copied beside grown weights."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import WRITE_FAILURE_ERRNOS, HfStackError

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
        if e.errno in WRITE_FAILURE_ERRNOS:
            raise HfStackError(
                f"no space left on the device holding {parent} (or a file-size limit was hit): {e.strerror}; "
                "the partial output was removed; free space and run again"
            ) from None
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
