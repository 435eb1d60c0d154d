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

import re

from ..plans.width import new_unit_axes
from .registry import Growth, Operator, register_operator, repeats

# Every write of a decoder layer into the residual stream, by branch, as the families name it (regular expressions
# over a layer's parameter suffixes): the attention output (Llama's o_proj, GPT-2's attn.c_proj, GPT-NeoX's
# attention.dense), the feed-forward's (the dense MLP's down projection, each expert's: Mixtral's w2, OLMoE's and
# Qwen-MoE's per-expert down_proj, gpt-oss's fused experts and their bias, a shared expert's), and a hybrid layer's
# mixer (Falcon-H1's mamba.out_proj). Zeroing a writer zeroes its branch's contribution; a router or gate only
# scales branches, so it may keep the copied values.
RESIDUAL_WRITERS = {
    "attention": (
        r"self_attn\.o_proj\.(weight|bias)",
        r"attn\.c_proj\.(weight|bias)",
        r"attention\.dense\.(weight|bias)",
    ),
    "feed-forward": (
        r"(mlp|feed_forward)\.down_proj\.(weight|bias)",
        r"block_sparse_moe\.experts\.\d+\.w2\.(weight|bias)",
        r"mlp\.experts\.\d+\.down_proj\.(weight|bias)",
        r"mlp\.experts\.down_proj(_bias)?",
        r"mlp\.shared_experts?\.down_proj\.(weight|bias)",
        r"mlp\.(c_proj|dense_4h_to_h)\.(weight|bias)",
    ),
    "mixer": (r"mamba\.out_proj\.(weight|bias)",),
}
WRITER_PATTERNS = tuple(p for patterns in RESIDUAL_WRITERS.values() for p in patterns)


def _zero_repeats(target_layer: int, layer_map: tuple[int, ...]) -> dict[str, str]:
    return dict.fromkeys(WRITER_PATTERNS, "zero") if target_layer in repeats(layer_map) else {}


# Modules that make a branch of their own beside attention and the feed-forward (hybrid layers' mixers): a layer
# holding one needs its writer zeroed too before a claim of preservation.
MIXER_MODULES = ("mamba.", "linear_attn.")


def _keeps_function(layer_map: tuple[int, ...], num_source_layers: int, layer_tensors: dict[int, set[str]]) -> bool:
    # The first copies must be the source's layers in order: identity blocks may sit anywhere between them. And
    # every repeated layer must have a writer this table knows for each of its branches (attention, feed-forward,
    # a mixer where it has one): a family whose writers it does not name is grown, but not claimed preserving.
    new = repeats(layer_map)
    firsts = [j for i, j in enumerate(layer_map) if i not in new]

    def known(tensors: set[str]) -> bool:
        branches = ["attention", "feed-forward"]
        if any(t.startswith(MIXER_MODULES) for t in tensors):
            branches.append("mixer")
        return all(any(re.fullmatch(p, t) for p in RESIDUAL_WRITERS[b] for t in tensors) for b in branches)

    return firsts == list(range(num_source_layers)) and all(known(layer_tensors[layer_map[i]]) for i in new)


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
        keeps_function=_keeps_function,
    )
)
