"""G_zero: new parameters start at zero wherever they would change the output.

Depth (LLaMA-Pro block expansion, Wu et al., 2024, arXiv 2401.02415): a decoder layer whose writes into the
residual stream (`o_proj`, `down_proj`, every expert's and shared expert's down projection, a mixer's output) are
zero adds nothing to the pre-norm residual stream, so every repeated copy is an identity block.
Width: new hidden units are written by zero rows (embedding columns, o_proj and down_proj rows), so they stay
zero in the residual stream; new heads have zero value rows and new FFN units zero up rows, so they add nothing.
Queries, keys and gates of new units keep the target's random init, and so do the columns that read new units:
zeroing both factors of a product (q and k, gate and up) would leave them at a saddle where no gradient flows.
RMSNorm now averages over more units, the new ones zero, so the mean square falls by H / H': old norm weights are
scaled by sqrt(H / H') and `rms_norm_eps` by H / H', which makes the norm's output exactly the source's (the
paper's code does neither).
"""

from ..plans.width import new_unit_axes
from .registry import Growth, Operator, register_operator, repeats

# Every write of a decoder layer into the residual stream, as the families name it (regular expressions over a
# layer's parameter suffixes): the attention output, the dense MLP's, each expert's (Mixtral's w2, OLMoE's and
# Qwen-MoE's per-expert down_proj, gpt-oss's fused experts and their bias), a shared expert's, and a hybrid layer's
# mixer (Falcon-H1's mamba.out_proj, not yet tested). Zeroing a writer zeroes its branch's contribution; a router
# or gate only scales branches, so it may keep the copied values.
RESIDUAL_WRITERS = (
    r"self_attn\.o_proj\.(weight|bias)",
    r"(mlp|feed_forward)\.down_proj\.(weight|bias)",
    r"block_sparse_moe\.experts\.\d+\.w2\.(weight|bias)",
    r"mlp\.experts\.\d+\.down_proj\.(weight|bias)",
    r"mlp\.experts\.down_proj(_bias)?",
    r"mlp\.shared_experts?\.down_proj\.(weight|bias)",
    r"mamba\.out_proj\.(weight|bias)",
)


def _zero_repeats(target_layer: int, layer_map: tuple[int, ...]) -> dict[str, str]:
    return dict.fromkeys(RESIDUAL_WRITERS, "zero") if target_layer in repeats(layer_map) else {}


def _in_source_order(layer_map: tuple[int, ...], num_source_layers: int) -> bool:
    # The first copies must be the source's layers in order: identity blocks may sit anywhere between them.
    new = repeats(layer_map)
    firsts = [j for i, j in enumerate(layer_map) if i not in new]
    return firsts == list(range(num_source_layers))


def _zero_width(dims, noise=0.0):
    scale = (dims.hidden[0] / dims.hidden[1]) ** 0.5
    return new_unit_axes(dims, out_fill="zero", in_fill="random", norm_scale=scale, gate_fill="random")


ZERO = register_operator(
    Operator(
        name="zero",
        paper="https://arxiv.org/abs/2401.02415",
        depth=Growth(
            "G↑zero",
            True,
            "repeated layers are copies with every residual write (o_proj, down_proj, each expert's) zeroed, so each "
            "is an identity block",
        ),
        width=Growth(
            "G→zero",
            True,
            "new units are written by zero rows (value, up, o_proj, down, embedding) and read by randomly "
            "initialised columns; RMSNorm weights scaled by sqrt(H/H') and its epsilon by H/H'",
        ),
        layer_ops=_zero_repeats,
        width_axes=_zero_width,
        width_eps=lambda dims: dims.hidden[0] / dims.hidden[1],
        keeps_function=_in_source_order,
    )
)
