"""Stage 3, the run folder: which run a folder belongs to, its complete checkpoints, and atomic JSON writes.

Layout of a run with growth (K growths, K + 1 phases):
    output_dir/run_config.json      the settings a resume must match
    output_dir/small/checkpoint-*   phase 1 (small model) checkpoints, the last one at the growth step
    output_dir/phase-P/checkpoint-* phases between two growths (2 <= P <= K), the last one at the next growth
    output_dir/grown-init-G/        the model right after growth G < K (+ growth_config.json)
    output_dir/grown-init/          the model right after the last growth
    output_dir/carried_optimizer-G.pt the AdamW moments moved over growth G (carry_optimizer_state only)
    output_dir/growth_state.json    written last at growth: phase 2 may resume from grown-init/
    output_dir/checkpoint-*         the last phase's checkpoints
    output_dir/final/               the final model, tokenizer, card and growth_config.json with both phases
    output_dir/training_log.json    every logged step of both phases with tokens, FLOPs and seconds
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import WRITE_FAILURE_ERRNOS, HfStackError

RUN_CONFIG = "run_config.json"
GROWTH_STATE = "growth_state.json"
SMALL_DIR = "small"
GROWN_INIT = "grown-init"


def phase_dir(out: Path, phase: int, growths: int) -> Path:
    """Where phase `phase` (1: the small model) of a run with `growths` growths keeps its checkpoints."""
    return out if phase == growths + 1 else out / SMALL_DIR if phase == 1 else out / f"phase-{phase}"


def init_dir(out: Path, growth: int, growths: int) -> Path:
    """The model right after growth `growth` (1-based) of `growths`."""
    return out / GROWN_INIT if growth == growths else out / f"{GROWN_INIT}-{growth}"


def carried_optimizer(out: Path, growth: int) -> Path:
    """The AdamW state moved over growth `growth` (one file per growth: a kill during the next growth leaves it)."""
    return out / f"carried_optimizer-{growth}.pt"


def read_growth_state(out: Path) -> dict:
    """`{"phases": accounting of the finished phases, "growths": their growth records}`, empty before any growth."""
    path = out / GROWTH_STATE
    if not path.is_file():
        return {"phases": [], "growths": []}
    state = json.loads(path.read_text())
    if "phases" not in state:  # written by hf_stack 0.1, which grew once
        return {"phases": [state["phase1"]], "growths": [state["growth"]]}
    return state


def write_growth_state(out: Path, phases: list[dict], growths: list[dict]) -> None:
    write_json_atomic(out / GROWTH_STATE, {"phases": phases, "growths": growths})


def check_run_config(out: Path, config: dict, resume, is_main: bool, wait) -> None:
    """Refuse to resume from, or write over, a folder that belongs to a different run; record a new run's settings.

    Args:
        out: the run folder.
        config: the settings a resume must match.
        resume: the trainer's `resume_from_checkpoint`.
        is_main: this process writes (process zero).
        wait: a barrier, so every process reads before process zero writes and all judge the same folder.
    """
    path = out / RUN_CONFIG
    previous = json.loads(path.read_text()) if path.is_file() else None
    wait()
    if previous is not None:
        if not resume:
            raise HfStackError(f"{out} already holds a training run; resume it (--resume) or choose another folder")
        diff = sorted(k for k in set(config) | set(previous) if previous.get(k) != config.get(k))
        if diff:
            raise HfStackError(f"cannot resume from {out}: it belongs to another run ({', '.join(diff)} differ)")
    elif resume:
        raise HfStackError(f"nothing to resume in {out}: it holds no {RUN_CONFIG} from an hf_stack run")
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, config)


def is_write_failure(e: BaseException | None) -> bool:
    """A full disk or file-size limit; torch.save reports it as RuntimeError ("iostream error", "unexpected pos")
    rather than OSError(ENOSPC), so the exception chain is searched."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in WRITE_FAILURE_ERRNOS:
            return True
        if isinstance(e, RuntimeError) and any(
            m in str(e) for m in ("iostream error", "unexpected pos", "failed writing")
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def last_checkpoint(folder: Path, resume) -> str | None:
    """The newest complete checkpoint ([`complete_checkpoints`]) in `folder`; partial ones are removed."""
    if not resume:
        return None
    if isinstance(resume, (str, os.PathLike)) and resume is not True:
        return str(resume)
    complete = complete_checkpoints(folder)
    for partial in folder.glob("checkpoint-*") if folder.is_dir() else ():
        if str(partial) not in complete.values() and partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)  # killed mid-write: never resume from it
    return complete[max(complete)] if complete else None


def complete_checkpoints(folder: Path) -> dict[int, str]:
    """Step -> path of every complete checkpoint in `folder`: its trainer_state.json (transformers writes it last,
    with a plain open and write, so a kill can leave it empty or cut) parses and names its step, and its
    safetensors weights, written before it, hold every byte their headers promise."""
    if not folder.is_dir():
        return {}
    return {int(p.name[11:]): str(p) for p in folder.glob("checkpoint-*")
            if p.name[11:].isdigit() and _is_complete(p, int(p.name[11:]))}  # fmt: skip


def _is_complete(checkpoint: Path, step: int) -> bool:
    """False only on evidence that the write did not finish (a missing, cut or foreign state file, a cut weights
    file): an unreadable disk (permissions, I/O errors) is an error, never a reason to delete a checkpoint."""
    from ..checkpoints.source import read_safetensors_header

    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    except OSError as e:
        raise HfStackError(f"cannot read {checkpoint / 'trainer_state.json'}: {e.strerror or e}") from None
    if not isinstance(state, dict) or state.get("global_step") != step:
        return False
    for shard in checkpoint.glob("*.safetensors"):
        try:
            read_safetensors_header(shard)
        except HfStackError:  # the reader's refusals are all about the bytes: cut, corrupt or missing
            return False
        except OSError as e:
            raise HfStackError(f"cannot read {shard}: {e.strerror or e}") from None
    return True


def resume_point(out: Path, growths: int) -> str:
    """What `--resume` would continue from in the run folder `out` of a run with `growths` growths, in words."""
    done = len(read_growth_state(out)["growths"]) if growths else 0
    last = last_checkpoint(phase_dir(out, done + 1, growths), True)
    if last is not None:
        return last
    if done:
        before = last_checkpoint(phase_dir(out, done, growths), True)
        return f"the grown model in {init_dir(out, done, growths)} (grown from {before})"
    return "the beginning (no checkpoint is complete yet)"


def read_history(small_dir: Path) -> list[dict]:
    last = last_checkpoint(small_dir, True)
    if last is None:
        return []
    state = json.loads((Path(last) / "trainer_state.json").read_text())
    return [e for e in state.get("log_history", []) if "tokens" in e]


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
