"""Stage 1, width growth as plain data: which source unit (hidden, attention, FFN) every target unit copies, and its scale.

A grown tensor is described per dimension by an [`Axis`]: target unit k takes source unit `index[k]` times
`scale[k]`, or, when `index[k]` is -1, is new and filled per the operator (`fill`). A weight of shape
(out, in) grown along axes (r, c) is `W'[k, l] = W[r.index[k], c.index[l]] * r.scale[k] * c.scale[l]`.
Computed from the configs alone, without torch, so `--dry-run` can print it and tests can check it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from ..errors import HfStackError

# The axis of each dimension of every tensor a Llama-style model holds (None: the dimension does not grow).
# "hidden" units written into the residual stream and read from it take the same scale; norms take their own.
LAYER_AXES = {
    "input_layernorm.weight": ("norm",),
    "post_attention_layernorm.weight": ("norm",),
    "self_attn.q_proj.weight": ("q_out", "hidden_in"),
    "self_attn.q_proj.bias": ("q_out",),
    "self_attn.k_proj.weight": ("k_out", "hidden_in"),
    "self_attn.k_proj.bias": ("k_out",),
    "self_attn.v_proj.weight": ("v_out", "hidden_in"),
    "self_attn.v_proj.bias": ("v_out",),
    "self_attn.o_proj.weight": ("hidden_out", "attn_in"),
    "self_attn.o_proj.bias": ("hidden_out",),
    "self_attn.q_norm.weight": (None,),  # per head_dim, which width growth keeps
    "self_attn.k_norm.weight": (None,),
    "mlp.gate_proj.weight": ("gate_out", "hidden_in"),
    "mlp.gate_proj.bias": ("gate_out",),
    "mlp.up_proj.weight": ("up_out", "hidden_in"),
    "mlp.up_proj.bias": ("up_out",),
    "mlp.down_proj.weight": ("hidden_out", "ffn_in"),
    "mlp.down_proj.bias": ("hidden_out",),
    # mixtures of experts (checkpoints store experts one by one; `*` is the expert's index): the router reads the
    # stream like any projection, every expert is an FFN of the experts' size, a shared expert one of its own size
    "block_sparse_moe.gate.weight": (None, "hidden_in"),
    "block_sparse_moe.experts.*.w1.weight": ("expert_gate_out", "hidden_in"),
    "block_sparse_moe.experts.*.w3.weight": ("expert_up_out", "hidden_in"),
    "block_sparse_moe.experts.*.w2.weight": ("hidden_out", "expert_ffn_in"),
    "mlp.gate.weight": (None, "hidden_in"),
    "mlp.experts.*.gate_proj.weight": ("expert_gate_out", "hidden_in"),
    "mlp.experts.*.up_proj.weight": ("expert_up_out", "hidden_in"),
    "mlp.experts.*.down_proj.weight": ("hidden_out", "expert_ffn_in"),
    "mlp.shared_expert.gate_proj.weight": ("shared_gate_out", "hidden_in"),
    "mlp.shared_expert.up_proj.weight": ("shared_up_out", "hidden_in"),
    "mlp.shared_expert.down_proj.weight": ("hidden_out", "shared_ffn_in"),
    "mlp.shared_expert_gate.weight": (None, "hidden_in"),
}
# A dense Llama-style layer's axes: what `learn`'s width maps (`hf_stack.checkpoints.ligo.MAP_OF_AXIS`) and MSG's
# width masks are written for (`GrowthPlan.llama_width`)
LLAMA_AXES = frozenset({"hidden_out", "hidden_in", "norm", "q_out", "k_out", "v_out", "attn_in", "gate_out", "up_out",
                          "ffn_in", "embed_out", "final_norm"})  # fmt: skip
# FFN sizes besides intermediate_size, each grown like it: (axis prefix, config key); experts without their own size
# (Mixtral, OLMoE) use intermediate_size
FFN_SIZES = (("expert", "moe_intermediate_size"), ("shared", "shared_expert_intermediate_size"))
FFN_AXES = ("gate_out", "up_out", "ffn_in")
OTHER_AXES = {
    "model.embed_tokens.weight": (None, "embed_out"),
    "model.norm.weight": ("final_norm",),
    "lm_head.weight": (None, "hidden_in"),
}
NORM_SUFFIXES = ("layernorm.weight", "norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")  # GPT-2's ln_*
# 1-D weights that transformers' init sets though they are no norm, by name: Mamba's (Falcon-H1's) skip connection
# D and time-step bias start at 1, its A_log at log(1), log(2), ... one per head
MAMBA_VECTORS = {"mamba.D": lambda k: 1.0, "mamba.dt_bias": lambda k: 1.0, "mamba.A_log": lambda k: math.log(k + 1)}
# Model types whose RMSNorms all multiply by (1 + w): the offset their stored norm weights are read with.
NORM_OFFSETS = dict.fromkeys(("gemma", "gemma2", "gemma3_text", "vaultgemma"), 1.0)
# Gemma 2/3's sandwich norms: a post-norm normalises a branch's output before it joins the residual stream (a
# writer); the pre-norms read the stream for the branch (readers, as Llama's two norms).
SANDWICH_NORMS = {
    "post_attention_layernorm.weight": ("post_norm",),
    "pre_feedforward_layernorm.weight": ("norm",),
    "post_feedforward_layernorm.weight": ("post_norm",),
}
# OLMo 2/3, OLMoE: queries and keys normalised over the whole projection (all heads), not per head
WHOLE_QK_NORMS = {"self_attn.q_norm.weight": ("q_norm_full",), "self_attn.k_norm.weight": ("k_norm_full",)}
# OLMo 2/3's layers have no pre-norms: post-norms on both branches, whose projections read the raw stream
POST_NORM_LAYERS = {
    "post_attention_layernorm.weight": ("post_norm",),
    "post_feedforward_layernorm.weight": ("post_norm",),
    "self_attn.q_proj.weight": ("q_out", "raw_in"),
    "self_attn.k_proj.weight": ("k_out", "raw_in"),
    "self_attn.v_proj.weight": ("v_out", "raw_in"),
    "mlp.gate_proj.weight": ("gate_out", "raw_in"),
    "mlp.up_proj.weight": ("up_out", "raw_in"),
}


@dataclass(frozen=True)
class WidthFamily:
    """What a model family's width growth reads beyond the Llama layout: data the plan reads, not special cases.

    Attributes:
        norm_offset: its RMSNorm multiplies by `norm_offset + weight` (Gemma's `1 + w`): a norm's scale applies to
            that sum, and a new unit's "one" is stored as `1 - norm_offset`.
        embed_scale: the embeddings are multiplied by sqrt(hidden_size) in the forward (Gemma), which width changes:
            the embedding takes sqrt(H / H') more, and a head tied to it is made up for by the final norm.
        layer_axes: the family's own layer tensors and roles over [`LAYER_AXES`]: post-norms (`post_norm`), readers
            of the raw residual stream (`raw_in`: OLMo 2's layers have no pre-norms), q/k norms over the whole
            projection (`q_norm_full`, `k_norm_full`), fused projections (`qkv_out`, `gate_up_out`).
    """

    norm_offset: float = 0.0
    embed_scale: bool = False
    layer_axes: dict = field(default_factory=dict)

    @property
    def plain(self) -> bool:
        """The Llama rules exactly: no offset, scale or roles of its own (see `LLAMA_AXES`)."""
        return self == WidthFamily()


# Model types whose tensors width growth understands, by model_type.
WIDTH_FAMILIES = {
    # the Llama rules (Granite's multipliers scale every unit alike; MoE routers and experts are in LAYER_AXES)
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "mixtral", "qwen2_moe", "qwen3_moe"),
        WidthFamily(),
    ),
    "gemma": WidthFamily(norm_offset=NORM_OFFSETS["gemma"], embed_scale=True),
    **{
        t: WidthFamily(norm_offset=NORM_OFFSETS[t], embed_scale=True, layer_axes=SANDWICH_NORMS)
        for t in ("gemma2", "gemma3_text")
    },
    **dict.fromkeys(("olmo2", "olmo3"), WidthFamily(layer_axes={**POST_NORM_LAYERS, **WHOLE_QK_NORMS})),
    "olmoe": WidthFamily(layer_axes=WHOLE_QK_NORMS),
    "phi3": WidthFamily(
        layer_axes={
            "self_attn.qkv_proj.weight": ("qkv_out", "hidden_in"),
            "mlp.gate_up_proj.weight": ("gate_up_out", "hidden_in"),
        }
    ),
}


@dataclass(frozen=True)
class Axis:
    """How one grown dimension maps onto the source.

    Attributes:
        name: the role, e.g. "hidden_in" (columns that read the residual stream) or "up_out" (FFN units).
        source_size: the dimension's size in the source.
        index: source unit of every target unit; -1 marks a new unit.
        scale: multiplier of every target unit.
        fill: value of new units: "zero", "random" (the target architecture's init) or "one".
        noise: symmetry-breaking noise (times the tensor's std) added to the copies of a unit so that it sums to
            zero over them; only on axes whose copies read identical inputs, where it keeps the function.
        offset: a norm's stored weight w acts as `offset + w` (Gemma's 1): the scale applies to that sum,
            `w' = (offset + w) * scale - offset`, and "one" is stored as `1 - offset`.
    """

    name: str
    source_size: int
    index: tuple[int, ...]
    scale: tuple[float, ...]
    fill: str = "zero"
    noise: float = 0.0
    offset: float = 0.0

    @property
    def target_size(self) -> int:
        return len(self.index)

    def describe(self) -> str:
        """One line: sizes, the index pattern and the distinct scales."""
        new = sum(1 for i in self.index if i < 0)
        copied = self.target_size - new - self.source_size
        parts = [f"{self.name}: {self.source_size} -> {self.target_size}"]
        if copied > 0:
            parts.append(
                f"{copied} units copied from {_ranges([i for i in self.index[self.source_size :] if i >= 0])}"
            )
        if new:
            parts.append(f"{new} new units ({self.fill})")
        scales = sorted(set(self.scale))
        if scales != [1.0]:
            parts.append("scales " + ", ".join(f"{s:.6g}" for s in scales))
        if self.noise:
            parts.append(f"zero-sum noise {self.noise:g} x std over copies")
        return "; ".join(parts)


def _ranges(indices: list[int]) -> str:
    if not indices:
        return "[]"
    out, start, prev = [], indices[0], indices[0]
    for i in indices[1:]:
        if i != prev + 1:
            out.append(f"{start}-{prev}" if prev != start else str(start))
            start = i
        prev = i
    out.append(f"{start}-{prev}" if prev != start else str(start))
    return "[" + ",".join(out) + "]"


@dataclass(frozen=True)
class WidthDims:
    """Source and target sizes of the dimensions width growth changes."""

    hidden: tuple[int, int]
    ffn: tuple[int, int]
    heads: tuple[int, int]
    kv_heads: tuple[int, int]
    head_dim: int
    other_ffn: tuple[tuple[str, tuple[int, int]], ...] = ()  # (config key, sizes) of each `FFN_SIZES` size present

    @property
    def groups(self) -> int:
        return self.heads[0] // self.kv_heads[0]


def width_dims(config: dict, width_factor: float) -> WidthDims:
    """Grown sizes for `width_factor`, refusing factors that would split a head or an attention group."""
    model_type = config.get("model_type")
    if model_type not in WIDTH_FAMILIES:
        raise HfStackError(
            f"width growth supports model types {', '.join(WIDTH_FAMILIES)}; {model_type!r} may name its "
            "tensors or normalise differently, so grow it in depth only"
        )
    sizes = ("hidden_size", "intermediate_size", "num_attention_heads")
    missing = [k for k in sizes if not isinstance(config.get(k), int) or config[k] < 1]
    if missing:
        raise HfStackError(f"width growth needs {', '.join(missing)} in config.json as positive whole numbers")
    H, F, nh = (config[k] for k in sizes)
    nkv = config.get("num_key_value_heads") or nh
    head_dim = config.get("head_dim") or H // nh

    def grown(name: str, n: int) -> int:
        m = n * width_factor
        if abs(m - round(m)) > 1e-9:
            raise HfStackError(
                f"width factor {width_factor} gives {m:g} {name} from {n}; it cannot keep heads whole. Choose a "
                f"factor that makes every size whole, e.g. 2 (sizes: hidden {H}, ffn {F}, heads {nh}, kv heads {nkv})"
            )
        return round(m)

    return WidthDims(
        hidden=(H, grown("hidden units", H)),
        ffn=(F, grown("FFN units", F)),
        heads=(nh, grown("attention heads", nh)),
        kv_heads=(nkv, grown("key/value heads", nkv)),
        head_dim=head_dim,
        other_ffn=tuple((k, (config[k], grown(k, config[k]))) for _, k in FFN_SIZES if isinstance(config.get(k), int)),
    )


def grow_width_config(config: dict, dims: WidthDims, eps_factor: float = 1.0) -> dict:
    """The config with the grown sizes; `head_dim` is kept (RoPE frequencies depend on it)."""
    out = dict(config)
    if eps_factor != 1.0:
        out["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * eps_factor
    out["hidden_size"] = dims.hidden[1]
    out["intermediate_size"] = dims.ffn[1]
    for key, (_, grown) in dims.other_ffn:
        out[key] = grown
    out["num_attention_heads"] = dims.heads[1]
    if config.get("num_key_value_heads") is not None:
        out["num_key_value_heads"] = dims.kv_heads[1]
    # Written explicitly when hidden / heads would no longer give the same head_dim (it does for whole factors).
    if config.get("head_dim") is not None or dims.hidden[1] // dims.heads[1] != dims.head_dim:
        out["head_dim"] = dims.head_dim
    return out


def cyclic(source: int, target: int) -> tuple[int, ...]:
    """Old units in place, then copies cycling over the source units (the paper code's `from_left` choice)."""
    return tuple(k if k < source else (k - source) % source for k in range(target))


def appended(source: int, target: int) -> tuple[int, ...]:
    """Old units in place, then new units (-1)."""
    return tuple(k if k < source else -1 for k in range(target))


def head_units(head_index: tuple[int, ...], head_dim: int) -> tuple[int, ...]:
    """Per-head indices expanded to the head_dim units inside each head."""
    return tuple(-1 if h < 0 else h * head_dim + e for h in head_index for e in range(head_dim))


def q_heads_for(kv_index: tuple[int, ...], groups: int) -> tuple[int, ...]:
    """Query heads that follow their key/value head, so every target group stays a copy of one source group."""
    return tuple(-1 if g < 0 else g * groups + r for g in kv_index for r in range(groups))


def _counts(index: tuple[int, ...]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for i in index:
        if i >= 0:
            counts[i] = counts.get(i, 0) + 1
    return counts


def split_axes(dims: WidthDims, noise: float = 0.0) -> dict[str, Axis]:
    """Function-preserving neuron splitting (Net2Net / HyperCloning, corrected for GQA and RMSNorm).

    Every new unit copies an old one. Units read by a later projection (attention outputs, FFN units) have
    that projection's columns divided by their number of copies. Hidden unit j copied c_j times takes scale
    t = sqrt(H' / (H c_j)) wherever it is written or read, which keeps the RMS of the residual stream; the
    norms then take H / H' so the readers' sums come out unchanged. With a whole factor every t is 1.
    Copies see identical inputs, so `noise` that sums to zero over a unit's copies in the reading columns
    keeps the function and lets the copies' gradients differ (without it they stay duplicates forever).
    """
    (H, Ht), (F, Ft) = dims.hidden, dims.ffn
    hidden = cyclic(H, Ht)
    hc = _counts(hidden)
    t = tuple((Ht / (H * hc[j])) ** 0.5 for j in hidden)
    kv_heads = cyclic(*dims.kv_heads)
    q_heads = q_heads_for(kv_heads, dims.groups)
    qc = _counts(q_heads)  # copies per source query head
    ffn = cyclic(F, Ft)
    fc = _counts(ffn)
    q_units = head_units(q_heads, dims.head_dim)
    kv_units = head_units(kv_heads, dims.head_dim)
    q_size, kv_size = dims.heads[0] * dims.head_dim, dims.kv_heads[0] * dims.head_dim
    ones = lambda n: (1.0,) * n  # noqa: E731
    return {
        "hidden_out": Axis("hidden_out", H, hidden, t),
        "hidden_in": Axis("hidden_in", H, hidden, t, noise=noise),
        "norm": Axis("norm", H, hidden, (H / Ht,) * Ht),
        # a post-norm's output joins the stream as its copies, whose RMS the scales t keep: weights copied as they are
        "post_norm": Axis("post_norm", H, hidden, ones(Ht)),
        "q_out": Axis("q_out", q_size, q_units, ones(len(q_units))),
        "k_out": Axis("k_out", kv_size, kv_units, ones(len(kv_units))),
        "v_out": Axis("v_out", kv_size, kv_units, ones(len(kv_units))),
        # a query head copied c times: each copy's attention output enters o_proj with weight 1/c
        "attn_in": Axis("attn_in", q_size, q_units, tuple(1.0 / qc[u // dims.head_dim] for u in q_units), noise=noise),
        "gate_out": Axis("gate_out", F, ffn, ones(Ft)),
        "up_out": Axis("up_out", F, ffn, ones(Ft)),
        "ffn_in": Axis("ffn_in", F, ffn, tuple(1.0 / fc[j] for j in ffn), noise=noise),
    }


def new_unit_axes(
    dims: WidthDims, out_fill: str, in_fill: str, norm_scale: float, gate_fill: str | None = None
) -> dict[str, Axis]:
    """Old units in place, new units appended and filled: `out_fill` where a new unit is produced, `in_fill`
    where one is read, `gate_fill` (default `out_fill`) for the rows of queries, keys and FFN gates; old norm
    weights times `norm_scale`."""
    gate_fill = gate_fill or out_fill
    (H, Ht), (F, Ft) = dims.hidden, dims.ffn
    q_units = head_units(appended(*dims.heads), dims.head_dim)
    kv_units = head_units(appended(*dims.kv_heads), dims.head_dim)
    q_size, kv_size = dims.heads[0] * dims.head_dim, dims.kv_heads[0] * dims.head_dim

    def axis(name, source, index, fill, scale=1.0):
        return Axis(name, source, index, (scale,) * len(index), fill)

    return {
        "hidden_out": axis("hidden_out", H, appended(H, Ht), out_fill),
        "hidden_in": axis("hidden_in", H, appended(H, Ht), in_fill),
        "norm": axis("norm", H, appended(H, Ht), "one", norm_scale),
        # zero rows in the branch's output lower its RMS as they lower the stream's: the same correction
        "post_norm": axis("post_norm", H, appended(H, Ht), "one", norm_scale),
        "q_out": axis("q_out", q_size, q_units, gate_fill),
        "k_out": axis("k_out", kv_size, kv_units, gate_fill),
        "v_out": axis("v_out", kv_size, kv_units, out_fill),
        "attn_in": axis("attn_in", q_size, q_units, in_fill),
        "gate_out": axis("gate_out", F, appended(F, Ft), gate_fill),
        "up_out": axis("up_out", F, appended(F, Ft), out_fill),
        "ffn_in": axis("ffn_in", F, appended(F, Ft), in_fill),
    }


def random_new_axes(dims: WidthDims, noise: float = 0.0) -> dict[str, Axis]:
    """Old units in place, every new unit initialised like the target architecture (G_random's width rule)."""
    return new_unit_axes(dims, out_fill="random", in_fill="random", norm_scale=1.0)


def _ffn_axes(width_axes, axes: dict[str, Axis], dims: WidthDims, noise: float) -> dict[str, Axis]:
    """The axes of the FFNs besides the dense one (experts, a shared expert: `expert_gate_out`, `shared_ffn_in`,
    ...), each grown by the operator's own rule (`width_axes`) at its size, or as the dense FFN's `axes` where the
    config gives no size of its own."""
    sizes, out = dict(dims.other_ffn), {}
    for prefix, key in FFN_SIZES:
        own = width_axes(replace(dims, ffn=sizes[key]), noise) if key in sizes else axes
        out.update({f"{prefix}_{n}": replace(own[n], name=f"{prefix}_{n}") for n in FFN_AXES})
    return out


def family_axes(width_axes, dims: WidthDims, noise: float, family: WidthFamily, tied: bool) -> dict[str, Axis]:
    """Every axis a family's tensors may take under an operator's rule (`width_axes`, e.g. `split_axes`): the
    operator's own, the other FFN sizes' (experts), and the family's roles (see [`WidthFamily`]): the embedding's and
    final norm's (which Gemma's embedding scale moves), readers of the raw stream, whole-projection q/k norms and
    fused projections, every norm with the family's offset."""
    axes = width_axes(dims, noise)
    axes = {**axes, **_ffn_axes(width_axes, axes, dims, noise)}
    (H, Ht), hidden = dims.hidden, axes["hidden_out"]
    norms = {n: replace(axes[n], offset=family.norm_offset) for n in ("norm", "post_norm")}
    embed, final = hidden, norms["norm"]
    if family.embed_scale:  # x0 = sqrt(H) e: the grown embedding takes sqrt(H / H') so x0's copies keep their scale
        embed = replace(hidden, scale=tuple(s * (H / Ht) ** 0.5 for s in hidden.scale))
        if tied:  # the head is that embedding: the final norm makes up the factor
            final = replace(final, scale=tuple(s * (Ht / H) ** 0.5 for s in final.scale))
    out = {
        **axes,
        **norms,
        "embed_out": replace(embed, name="embed_out"),
        "final_norm": replace(final, name="final_norm"),
    }
    # no norm before the reader: its columns take the norm's correction themselves, over the stream's own RMS
    raw = tuple(i * n / p for i, n, p in zip(axes["hidden_in"].scale, axes["norm"].scale, axes["post_norm"].scale))
    out["raw_in"] = replace(axes["hidden_in"], name="raw_in", scale=raw)
    for part in ("q", "k"):
        unit = axes[f"{part}_out"]
        if any(i < 0 for i in unit.index) or len(set(_counts(unit.index).values())) > 1:
            out[f"{part}_norm_full"] = None  # a tensor that reads it is refused with UNAVAILABLE's reason
        else:  # every head copied equally often: the RMS over the whole projection is unchanged
            ones = (1.0,) * len(unit.index)
            out[f"{part}_norm_full"] = Axis(
                f"{part}_norm_full", unit.source_size, unit.index, ones, "one", offset=family.norm_offset
            )
    out["qkv_out"] = concat("qkv_out", axes["q_out"], axes["k_out"], axes["v_out"])
    out["gate_up_out"] = concat("gate_up_out", axes["gate_out"], axes["up_out"])
    return out


# Why a role is missing from an operator's axes (`family_axes` sets it to None), for `build_plan`'s refusal.
UNAVAILABLE = {
    "q_norm_full": "its queries and keys are normalised over all heads together, which new heads (or heads copied "
    "unequally often) would change; use --operator direct with a whole width factor",
    "qkv_out": "its fused projections hold parts whose new units this operator fills differently; use "
    "--operator direct",
}
UNAVAILABLE["k_norm_full"], UNAVAILABLE["gate_up_out"] = UNAVAILABLE["q_norm_full"], UNAVAILABLE["qkv_out"]


def concat(name: str, *parts: Axis) -> Axis | None:
    """The axis of a fused projection's rows: its parts' units one after the other (Phi-3's qkv_proj, gate_up_proj);
    None where the parts' new units are filled differently (one axis has one fill)."""
    if len({(p.fill, p.noise) for p in parts}) > 1:
        return None
    index, offset = [], 0
    for part in parts:
        index += [i + offset if i >= 0 else -1 for i in part.index]
        offset += part.source_size
    scale = tuple(s for p in parts for s in p.scale)
    return Axis(name, offset, tuple(index), scale, parts[0].fill, parts[0].noise)


def tensor_axes(name: str, suffix: str | None, family: WidthFamily) -> tuple[str | None, ...]:
    """The axes of a tensor by its name (`suffix` for decoder-layer tensors) in `family`; unknown tensors are
    refused."""
    if suffix is not None:
        suffix = re.sub(r"\.experts\.\d+\.", ".experts.*.", suffix)  # every expert alike
    table, key = ({**LAYER_AXES, **family.layer_axes}, suffix) if suffix is not None else (OTHER_AXES, name)
    if key not in table:
        raise HfStackError(
            f"width growth does not know how to grow tensor {name!r}; only depth growth supports this checkpoint"
        )
    return table[key]


def is_norm(name: str) -> bool:
    return name.endswith(NORM_SUFFIXES)


def new_vector(name: str, model_type: str | None, start: int, size: int) -> list[float]:
    """Entries `start` to `start + size` of a new 1-D weight in the architecture's own init: a norm's unit multiplier
    as stored (0 for Gemma's `1 + w` norms), Mamba's vectors per `MAMBA_VECTORS`, 0 for biases and the rest
    (gpt-oss's attention sinks too, which transformers draws at random)."""
    if is_norm(name):
        return [1.0 - NORM_OFFSETS.get(model_type, 0.0)] * size
    rule = next((r for suffix, r in MAMBA_VECTORS.items() if name.endswith(suffix)), lambda k: 0.0)
    return [rule(k) for k in range(start, start + size)]
