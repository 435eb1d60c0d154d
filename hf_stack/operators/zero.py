"""Depthwise G_zero (LLaMA-Pro block expansion): repeated layers start with zeroed output projections.

A decoder layer whose `o_proj` and `down_proj` are zero adds nothing to the pre-norm residual stream, so it is an
identity map and the grown model computes exactly the source model's function. The first occurrence of each
source layer keeps its weights; every later copy is zeroed (Wu et al., 2024, arXiv 2401.02415).
"""

from . import Operator, register_operator

# Output projections of a Llama-style block: the only writes into the residual stream.
ZEROED_SUFFIXES = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")


def _zero_repeats(target_layer: int, layer_map: tuple[int, ...]) -> dict[str, str]:
    first = layer_map.index(layer_map[target_layer])
    if first == target_layer:
        return {}
    return dict.fromkeys(ZEROED_SUFFIXES, "zero")


ZERO = register_operator(
    Operator(
        name="zero",
        direction="depth",
        function_preserving=True,
        paper="https://arxiv.org/abs/2401.02415",
        summary="G_zero: repeated layers are copies with o_proj and down_proj zeroed, so each is an identity block",
        layer_ops=_zero_repeats,
    )
)
