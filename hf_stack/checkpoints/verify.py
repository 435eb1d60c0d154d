"""Stage 2, checking: a grown checkpoint loads with plain transformers and every tensor equals its planned source."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import HfStackError, error_reason
from .tensors import TORCH_DTYPES, TensorReader, materialize


def verify_checkpoint(folder: Path, plan, source, dtype: str | None = None, computed: dict | None = None) -> None:
    """Reload `folder` with `AutoModelForCausalLM` (no remote code) and compare every tensor with the plan
    (or with `computed`, the tensors a trained operator produced).

    Raises:
        HfStackError: if the folder does not load, a tensor is missing or extra, or any value differs.
    """
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=False)
    except Exception as e:
        raise HfStackError(f"verification failed: the grown checkpoint does not load: {error_reason(e)}") from None
    state = model.state_dict()
    expected = {t.target for t in plan.tensors}
    tied = {"lm_head.weight"} if plan.target_config.get("tie_word_embeddings") else set()
    extra = set(state) - expected - tied
    missing = expected - set(state)
    if extra or missing:
        raise HfStackError(
            f"verification failed: missing tensors {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}"
        )
    if tied and state["lm_head.weight"].data_ptr() != state["model.embed_tokens.weight"].data_ptr():
        raise HfStackError("verification failed: embeddings should be tied but lm_head is a separate tensor")
    reader = TensorReader(source)
    torch_dtype = TORCH_DTYPES.get(dtype) if dtype else None
    for entry in plan.tensors:
        want = computed[entry.target] if computed is not None else materialize(entry, reader, plan, torch_dtype)
        got = state[entry.target]
        if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
            raise HfStackError(f"verification failed: {entry.target} differs from {entry.source} ({entry.op})")
