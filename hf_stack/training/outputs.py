"""Stage 3, final outputs: the trained model in `final/` with its card, loss plot and provenance, and
`training_log.json` beside it, written once training ends."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..checkpoints.card import training_section, update_card
from ..checkpoints.provenance import write_growth_record
from .log import TRAINING_LOG, plot, read_curve
from .run_folder import read_growth_state, write_json_atomic

FLOPS_CONVENTION = (
    "6 N D per phase, N = all parameters (embeddings included, tied weights once), or 4 N D + 2 N_trained D when "
    "weights are frozen (PEFT); growth_flops: the learn operator's map training at growth (6 N_target per token); "
    "non_embedding_flops: N without the token embedding and output head; train_seconds: wall-clock of training in "
    "this process, evaluation excluded"
)


def training_summary(phases: list[dict]) -> dict:
    """The `training` record of `growth_config.json` and `training_log.json`: every phase and the totals."""
    return {
        "phases": phases,
        "total_tokens": sum(p["tokens"] for p in phases),
        # growth_flops: LiGO's map training at growth (operator learn), counted with the phase before it
        "total_flops": sum(p["flops"] + p.get("growth_flops", 0.0) for p in phases),
        "total_non_embedding_flops": sum(
            p.get("non_embedding_flops", 0.0) + p.get("growth_non_embedding_flops", 0.0) for p in phases
        ),
        "total_train_seconds": round(sum(p.get("train_seconds", 0.0) for p in phases), 3),
        # passes over the run's training data (above 1: it trained on some blocks again)
        "data_epochs": phases[-1].get("data_epoch"),
        "flops_convention": FLOPS_CONVENTION,
    }


def write_final_outputs(
    out: Path,
    model,
    tokenizer,
    phases: list[dict],
    history: list[dict],
    baselines: dict | None = None,
    growths: list[dict] | None = None,
    extra: dict | None = None,
    state_dict: dict | None = None,
) -> None:
    """Write `out/final/` (model, tokenizer, growth_config.json with both phases, card, loss plot) and
    `out/training_log.json`; `final/` is built beside and renamed into place, so it is whole or absent.

    Args:
        out: the run folder.
        model: the trained model (unwrapped).
        tokenizer: saved beside it when given.
        phases: one accounting record per phase ([`~hf_stack.training.accounting.phase_record`]).
        history: every logged step of every phase.
        baselines: e.g. `{"unigram_eval_loss": ...}`, the floor `hf-stack compare`'s health check reads.
        growths: the run's growth records (default: read from `out`'s growth state).
        extra: more top-level keys of `training_log.json` (e.g. `cooldowns`, a ladder's end points).
        state_dict: the weights to save in place of `model`'s own (a sharded model's, gathered on this process).
    """
    final, tmp = out / "final", out / "final.tmp"
    model.save_pretrained(tmp, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    training = training_summary(phases)
    growths = read_growth_state(out)["growths"] if growths is None else growths
    # grown in the run: the final model's own growth (its layer map, operator, settings), with every growth when
    # there were several; grown before it (`from_small_pretrained`): that record; not grown: {}
    record = growths[-1] if growths else getattr(model, "growth_record", None) or {}
    if len(growths) > 1:
        record = {**record, "growths": growths}
    write_growth_record(tmp, {**record, "training": training})
    log = {"training": training, "log_history": history}
    if baselines:
        log["baselines"] = baselines
    log.update(extra or {})
    write_json_atomic(out / TRAINING_LOG, log)
    loss_plot = None
    if any("loss" in e for e in history):
        plot([read_curve(out, "loss")], tmp / "training_loss.png", title="training loss (dotted: growth)")
        loss_plot = "training_loss.png"
    update_card(
        tmp, repo_id=out.resolve().name, sections={"training": training_section(training, loss_plot)}, figure=True
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
