"""Stage 3, accounting: the N of C = 6ND and each phase's tokens, FLOPs (all and non-embedding) and seconds."""

from __future__ import annotations

from ..plans.timing import training_flops


def count_parameters(model, embeddings: bool = True) -> int:
    """Unique parameters (tied weights once): the N of C = 6ND.

    Args:
        model: a transformers model.
        embeddings: count the token embedding and the output head (default). False gives the non-embedding count
            (Kaplan et al., 2020): the transformer blocks and final norm, the weights depth growth multiplies.
    """
    skip = set()
    if not embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                skip.update(p.data_ptr() for p in module.parameters())
    seen, n = set(skip), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return n


def phase_record(phase: int, model, steps: int, tps: int, seconds: float) -> dict:
    """One phase's accounting: its parameters, steps, tokens, FLOPs in both conventions and training seconds."""
    params, tokens = count_parameters(model), steps * tps
    return {"phase": phase, "num_parameters": params, "steps": steps, "tokens": tokens,
            "flops": training_flops(params, tokens),
            "non_embedding_flops": training_flops(count_parameters(model, embeddings=False), tokens),
            "train_seconds": round(seconds, 3)}  # fmt: skip
