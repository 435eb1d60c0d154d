"""Stage 1, width growth as plain data: which source unit (hidden, attention, FFN) every target unit copies, and its scale.

A grown tensor is described per dimension by an [`Axis`]: target unit k takes source unit `index[k]` times
`scale[k]`, or, when `index[k]` is -1, is new and filled per the operator (`fill`). A weight of shape
(out, in) grown along axes (r, c) is `W'[k, l] = W[r.index[k], c.index[l]] * r.scale[k] * c.scale[l]`.
Computed from the configs alone, without torch, so `--dry-run` can print it and tests can check it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HfStackError

# Model types whose tensors width growth understands: pre-norm RMSNorm decoders with these module names.
WIDTH_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite")

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
}
OTHER_AXES = {
    "model.embed_tokens.weight": (None, "hidden_out"),
    "model.norm.weight": ("norm",),
    "lm_head.weight": (None, "hidden_in"),
}
NORM_SUFFIXES = ("layernorm.weight", "norm.weight")


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
    """

    name: str
    source_size: int
    index: tuple[int, ...]
    scale: tuple[float, ...]
    fill: str = "zero"
    noise: float = 0.0

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

    @property
    def groups(self) -> int:
        return self.heads[0] // self.kv_heads[0]


def width_dims(config: dict, width_factor: float) -> WidthDims:
    """Grown sizes for `width_factor`, refusing factors that would split a head or an attention group."""
    model_type = config.get("model_type")
    if model_type not in WIDTH_MODEL_TYPES:
        raise HfStackError(
            f"width growth supports model types {', '.join(WIDTH_MODEL_TYPES)}; {model_type!r} may name its "
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
    )


def grow_width_config(config: dict, dims: WidthDims, eps_factor: float = 1.0) -> dict:
    """The config with the grown sizes; `head_dim` is kept (RoPE frequencies depend on it)."""
    out = dict(config)
    if eps_factor != 1.0:
        out["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * eps_factor
    out["hidden_size"] = dims.hidden[1]
    out["intermediate_size"] = dims.ffn[1]
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


def tensor_axes(name: str, suffix: str | None) -> tuple[str | None, ...]:
    """The axes of a tensor by its name (`suffix` for decoder-layer tensors); unknown tensors are refused."""
    table, key = (LAYER_AXES, suffix) if suffix is not None else (OTHER_AXES, name)
    if key not in table:
        raise HfStackError(
            f"width growth does not know how to grow tensor {name!r}; only depth growth supports this checkpoint"
        )
    return table[key]


def is_norm(name: str) -> bool:
    return name.endswith(NORM_SUFFIXES)
