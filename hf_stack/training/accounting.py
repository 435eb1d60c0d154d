"""Stage 3, accounting: the N of C = 6ND and each phase's tokens, FLOPs (all and non-embedding) and seconds.

With every weight trained a token costs 6N FLOPs: 2N forward, 2N for the activations' gradients, 2N for the
weights'. Frozen weights (LoRA and other PEFT methods) skip the last: 4N + 2 N_trained.
"""

from __future__ import annotations

from ..plans.timing import training_flops


def count_parameters(model, embeddings: bool = True, trained_only: bool = False) -> int:
    """Unique parameters (tied weights once): the N of C = 6ND.

    Args:
        model: a transformers model.
        embeddings: count the token embedding and the output head (default). False gives the non-embedding count
            (Kaplan et al., 2020): the transformer blocks and final norm, the weights depth growth multiplies.
        trained_only: count only the parameters that receive gradients (`requires_grad`).
    """
    # By identity: `parameters()` yields a tied weight once, and a sharded parameter (FSDP2's DTensor) has no
    # storage of its own to compare (its numel is the whole tensor's).
    skip = set()
    if not embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                skip.update(id(p) for p in module.parameters())
    return sum(p.numel() for p in model.parameters() if id(p) not in skip and (p.requires_grad or not trained_only))


def model_flops(model, tokens: float, embeddings: bool = True) -> float:
    """Training FLOPs of `model` over `tokens`: 6ND, or 4ND + 2 N_trained D when some weights are frozen."""
    n = count_parameters(model, embeddings)
    trained = count_parameters(model, embeddings, trained_only=True)
    return training_flops(n, tokens) if trained == n else 4.0 * n * tokens + 2.0 * trained * tokens


def phase_record(phase: int, model, steps: int, tps: int, seconds: float) -> dict:
    """One phase's accounting: its parameters, steps, tokens, FLOPs in both conventions and training seconds."""
    tokens = steps * tps
    return {"phase": phase, "num_parameters": count_parameters(model), "steps": steps, "tokens": tokens,
            "num_trained_parameters": count_parameters(model, trained_only=True),
            "flops": model_flops(model, tokens), "non_embedding_flops": model_flops(model, tokens, embeddings=False),
            "train_seconds": round(seconds, 3)}  # fmt: skip
