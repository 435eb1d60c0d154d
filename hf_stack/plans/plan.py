"""Stage 1, the tensor plan: from a source config and its tensor names to where every target tensor comes from.

Plain data, computed without torch or weights, so `hf-stack grow --dry-run` can print it, tests can check it
exhaustively and `growth_config.json` can record it.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

from ..errors import HfStackError
from ..operators import get_operator
from .config import StackedConfig
from .layers import MAX_TARGET_LAYERS, layer_map_to_slices, parse_layer_map
from .width import (
    LLAMA_AXES,
    UNAVAILABLE,
    WIDTH_FAMILIES,
    Axis,
    family_axes,
    grow_width_config,
    split_axes,
    tensor_axes,
    width_dims,
)

# Architectures named in messages; README "Supported architectures" lists every family the tests grow. Any other
# causal LM whose layers form one list in a known layout is accepted too: depth growth only renames and copies.
TESTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class Layout:
    """Where a model family keeps its decoder layers, input embeddings and output head in a checkpoint, and which
    config key holds its depth: data the plan reads, so a family that names them otherwise is an entry in
    `LAYOUTS`, not code.

    Attributes:
        layers: the prefix of layer i's tensors, before the index.
        embed: the input embeddings.
        heads: the output projection's names, the checkpoint's first (GPT-NeoX stores `embed_out`, which transformers
            5 calls `lm_head` in memory); not stored when the config ties it to the embeddings.
        depth: the config key of the number of layers.
    """

    layers: str = "model.layers."
    embed: str = "model.embed_tokens.weight"
    heads: tuple[str, ...] = ("lm_head.weight",)
    depth: str = "num_hidden_layers"

    def head(self, names) -> str:
        """The head's name among `names` (a checkpoint's or a model's tensors), else the checkpoint's."""
        return next((h for h in self.heads if h in names), self.heads[0])

    def layer_key(self, name: str) -> tuple[int, str] | None:
        """`(i, suffix)` for a tensor of layer i, else None."""
        if not name.startswith(self.layers):
            return None
        index, _, suffix = name[len(self.layers) :].partition(".")
        return (int(index), suffix) if index.isdigit() and suffix else None


LLAMA_LAYOUT = Layout()
LAYOUTS = {
    "gpt2": Layout("transformer.h.", "transformer.wte.weight", depth="n_layer"),
    "gpt_neox": Layout("gpt_neox.layers.", "gpt_neox.embed_in.weight", ("embed_out.weight", "lm_head.weight")),
}


def layout_of(config: dict) -> Layout:
    """The checkpoint layout of a config's model type (Llama's unless `LAYOUTS` names another)."""
    return LAYOUTS.get(config.get("model_type"), LLAMA_LAYOUT)


# The Llama layout's names, for what only reads that layout (width growth, LiGO).
LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
EMBED_KEY = LLAMA_LAYOUT.embed
LM_HEAD_KEY = LLAMA_LAYOUT.heads[0]

# Config lists that are not indexed by layer even when their length happens to equal the layer count.
NON_LAYER_LISTS = frozenset(
    {
        "architectures",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "bad_words_ids",
        "begin_suppress_tokens",
        "suppress_tokens",
        "forced_decoder_ids",
        "transformers_weights",
        "time_step_limit",  # Falcon-H1's (min, max), and its per-branch multipliers
        "mlp_multipliers",
        "ssm_multipliers",
    }
)
# Config lists of layer *indices* (not one entry per layer): remapped to the target layers that copy them.
LAYER_INDEX_LISTS = frozenset({"mlp_only_layers", "no_rope_layer_indices", "full_attention_layer_indices"})
# Scalars whose name mentions layers but which do not depend on the layer count.
LAYER_SCALARS = frozenset(
    {"num_hidden_layers", "max_window_layers", "layer_norm_eps", "layer_norm_epsilon", "layerdrop"}
)
# Per-layer behaviour encoded as a scalar: whether layer i is of the marked kind, given the value. A layer map
# carries the field when the target's kinds (each target layer its source layer's) follow the same rule for some
# value, which the grown config then holds; otherwise growth is refused with the kinds it would need.
PATTERN_SCALARS = {
    # Qwen2/3-MoE: layer i is sparse (experts) when (i + 1) % step == 0; step 1: every layer
    "decoder_sparse_step": ("sparse", lambda i, step: step > 0 and (i + 1) % step == 0, "--order stack"),
    # DeepSeek-V3: the first k layers are dense, the rest mixtures of experts
    "first_k_dense_replace": ("dense", lambda i, k: i < k, "--order interpolate"),
    # Gemma 3: every p-th layer attends globally, the others in a sliding window
    "sliding_window_pattern": ("global", lambda i, p: p > 0 and (i + 1) % p == 0, "--order stack"),
    # SmolLM3: every k-th layer without rotary embeddings (its `no_rope_layers` list, grown per layer, says the same)
    "no_rope_layer_interval": ("without RoPE", lambda i, k: k > 0 and (i + 1) % k == 0, "--order stack"),
    # DeepSeek-V2 style (as published; transformers 5 turns it into `mlp_layer_types`): layer i is a mixture of
    # experts when i >= first_k_dense_replace and i % freq == 0. Each of the two carried by itself carries their
    # conjunction; a list of per-layer flags (Step-3 style) is grown per layer.
    "moe_layer_freq": ("sparse", lambda i, f: f > 0 and i % f == 0, "--order stack"),
}
# Counts of extra layers a checkpoint may store after the decoder's: DeepSeek-V3's multi-token prediction modules,
# trained on the small model's last hidden states, which transformers neither runs nor loads at another index than
# the published one. The grown checkpoint leaves them out and sets the count to 0.
TRAILING_LAYERS = frozenset({"num_nextn_predict_layers"})
# Config flags under which a layer computes something that depends on its index (GPT-2 scales attention by
# 1 / (index + 1)): a moved layer computes another function, so no growth claims to keep the model's.
LAYER_INDEX_DEPENDENT = frozenset({"scale_attn_by_inverse_layer_idx"})


@dataclass(frozen=True)
class TensorSource:
    """Where one target tensor comes from.

    Attributes:
        target: the tensor's name in the grown checkpoint.
        source: the tensor's name in the source checkpoint.
        op: "copy" (bytes unchanged, or grown through `axes`), "zero" (all zeros), "random" (the target
            architecture's init) or "learn" (trained from `source` and its layer type, see the `learn` operator).
        dtype: safetensors dtype string of the source tensor ("BF16", "F32", ...).
        shape: the target tensor's shape.
        axes: for width growth, the plan's axis name of every dimension (None: the dimension keeps its size).
    """

    target: str
    source: str
    op: str
    dtype: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...] | None = None

    @property
    def widened(self) -> bool:
        return self.axes is not None and any(a is not None for a in self.axes)


@dataclass(frozen=True)
class GrowthPlan:
    """Everything needed to build the grown checkpoint, as plain data.

    Attributes:
        operator: registered operator name.
        layer_map: `layer_map[i]` is the source layer that target layer i is built from.
        source_num_layers: number of decoder layers in the source.
        tensors: one entry per target tensor, in the order they are written.
        target_config: the grown `config.json` contents.
        directions: the directions grown, "depth" and / or "width".
        function_preserving: whether the grown model computes the source's logits (the operator's claim).
        width: for width growth, the axes by name (see [`~hf_stack.width.Axis`]).
        init_std: standard deviation of randomly initialised weights (the config's `initializer_range`).
        seed: seeds random initialisation; each tensor draws from its own stream, so any path gives equal values.
    """

    operator: str
    layer_map: tuple[int, ...]
    source_num_layers: int
    tensors: tuple[TensorSource, ...]
    target_config: dict
    directions: tuple[str, ...] = ("depth",)
    function_preserving: bool = False
    width: dict[str, Axis] | None = None
    init_std: float = 0.02
    seed: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_map)

    @property
    def llama_width(self) -> bool:
        """Whether width growth, if any, follows the Llama rules alone: the family has no offsets, scales or roles
        of its own, and the tensors take a dense Llama-style layer's axes only (what `learn`'s maps and MSG's width
        masks are written for)."""
        if not self.width:
            return True
        family = WIDTH_FAMILIES.get(self.target_config.get("model_type"))
        used = {a for e in self.tensors for a in e.axes or () if a}
        return family is not None and family.plain and used <= LLAMA_AXES

    def slices(self) -> list[list[int]]:
        """The layer map as `[start, end)` source ranges (mergekit's `layer_range`, peft's `layer_replication`)."""
        return layer_map_to_slices(self.layer_map)

    def to_dict(self) -> dict:
        out = {
            "operator": self.operator,
            "directions": list(self.directions),
            "function_preserving": self.function_preserving,
            "layer_map": list(self.layer_map),
            "layer_slices": self.slices(),
            "source_num_layers": self.source_num_layers,
            "target_num_layers": self.num_layers,
        }
        if self.width:
            out["width"] = {name: axis.describe() for name, axis in self.width.items()}
        return out

    def picture(self) -> str:
        """The layer map as text: one row per source layer, a mark under each target layer it fills."""
        rows = [f"{'target':<10}" + "".join(str(i % 10) for i in range(self.num_layers))]
        for j in range(self.source_num_layers):
            rows.append(f"{'source ' + str(j):<10}" + "".join("#" if s == j else "." for s in self.layer_map))
        return "\n".join(rows)

    def describe(self) -> str:
        """Human-readable plan: the layer map, config changes and one line per target tensor."""
        op = get_operator(self.operator)
        lines = [f"operator: {self.operator}, {' + '.join(self.directions)}"]
        for d in self.directions:
            g = op.growth(d)
            lines.append(f"{d}: {g.paper_name}: {g.summary}")
        lines += [
            f"layers: {self.source_num_layers} -> {self.num_layers}",
            "layer map (target <- source, [start, end) slices): "
            + " + ".join(f"[{a}, {b})" for a, b in self.slices()),
            self.picture(),
        ]
        if self.width:
            lines.append("width axes:")
            lines += [f"  {axis.describe()}" for axis in self.width.values()]
        lines += [
            f"function preserving: {'yes' if self.function_preserving else 'no'}",
            f"tensors: {len(self.tensors)} ({sum(math.prod(t.shape) for t in self.tensors):,} parameters)",
        ]
        width = max(len(t.target) for t in self.tensors)
        for t in self.tensors:
            note = "" if t.op == "copy" else f"  [{t.op}]"
            if t.widened:
                note += "  grown along " + " x ".join(a or "same" for a in t.axes)
            lines.append(f"  {t.target:<{width}} <- {t.source}  {t.dtype}{list(t.shape)}{note}")
        return "\n".join(lines)


def resolve_layer_map(config: StackedConfig, source_num_layers: int) -> tuple[int, ...]:
    """Turn a `StackedConfig` (factor/layers/order or an explicit map) into the concrete layer map."""
    L = source_num_layers
    if config.layer_map is not None:
        layer_map = parse_layer_map(config.layer_map)
        if config.num_layers is not None and config.num_layers != len(layer_map):
            raise HfStackError(
                f"the layer map has {len(layer_map)} layers but --layers asks for {config.num_layers}; "
                "make them agree or drop --layers"
            )
        if config.factor is not None and config.factor * L != len(layer_map):
            raise HfStackError(
                f"the layer map has {len(layer_map)} layers but factor {config.factor} x {L} source layers is "
                f"{config.factor * L}; drop --factor when giving --layer-map"
            )
    else:
        N = config.target_num_layers(L)
        if N > MAX_TARGET_LAYERS:
            raise HfStackError(f"{N} target layers is more than the supported {MAX_TARGET_LAYERS}")
        if config.order == "stack":
            layer_map = tuple(i % L for i in range(N))
        elif config.order == "interpolate":
            # Each source layer repeated in place, counts as even as N allows: 0,0,1,1,...
            layer_map = tuple(i * L // N for i in range(N))
        else:  # middle (MIDAS): keep the first and last layer, cycle the middle block to fill the rest
            if L < 3:
                raise HfStackError(
                    f"order 'middle' needs at least 3 source layers (first, middle, last); the source has {L}"
                )
            if N < L:
                raise HfStackError(f"order 'middle' cannot shrink {L} layers to {N}")
            middle = list(range(1, L - 1))
            layer_map = (0, *(middle[i % len(middle)] for i in range(N - 2)), L - 1)
    if not layer_map:
        raise HfStackError("the layer map is empty; the grown model needs at least one layer")
    if len(layer_map) > MAX_TARGET_LAYERS:
        raise HfStackError(f"{len(layer_map)} target layers is more than the supported {MAX_TARGET_LAYERS}")
    bad = sorted({j for j in layer_map if j >= L})
    if bad:
        raise HfStackError(f"layer map names source layers {bad} but the source has only {L} layers (0-{L - 1})")
    return layer_map


def grow_config(config: dict, layer_map: tuple[int, ...]) -> dict:
    """Return the target `config.json` contents: the source config with every per-layer field grown.

    Lists with one entry per layer are re-indexed through the layer map; lists of layer indices are remapped;
    `max_window_layers` follows the grown `layer_types`. A field that is per-layer in a way this cannot carry
    over raises rather than being silently dropped.
    """
    depth = layout_of(config).depth
    L = config[depth]
    N = len(layer_map)
    out = copy.deepcopy(config)
    out[depth] = N
    for key, value in config.items():
        if key in TRAILING_LAYERS and value:
            out[key] = 0  # their layers are left out (see TRAILING_LAYERS)
        kind = _layer_field(key, value, L)
        if kind == "pattern":
            out[key] = _carried_pattern(key, value, layer_map, L)
        elif kind == "indices":
            chosen = set(value)
            out[key] = [i for i, j in enumerate(layer_map) if j in chosen]
        elif kind == "per layer":
            out[key] = [copy.deepcopy(value[j]) for j in layer_map]
        elif (
            "layer" in key
            and key not in (depth, *TRAILING_LAYERS, *LAYER_SCALARS, *NON_LAYER_LISTS)
            and value is not None
            and not isinstance(value, (bool, float, str))
        ):
            raise HfStackError(
                f"config field {key!r} looks per-layer but hf_stack does not know how to grow it "
                f"(value {value!r} for {L} layers); open an issue naming the architecture"
            )
    if "max_window_layers" in config and config["max_window_layers"] is not None:
        types = out.get("layer_types")
        if types is not None:
            # transformers derives layer_types from max_window_layers; keep the two consistent: count the
            # leading full-attention layers (layer_types stays authoritative for any other pattern).
            lead = next((i for i, t in enumerate(types) if t != "full_attention"), N)
            out["max_window_layers"] = lead
        elif config["max_window_layers"] >= L:
            out["max_window_layers"] = max(config["max_window_layers"], N)
        elif config.get("use_sliding_window") is False:
            pass  # no layer slides (Qwen2.5 as published): the field is not read
        else:
            raise HfStackError(
                "config has max_window_layers below num_hidden_layers but no layer_types; "
                "save the source with transformers >= 5 so layer_types is written"
            )
    return out


def _carried_pattern(key: str, value: int, layer_map: tuple[int, ...], num_source_layers: int) -> int:
    """The value of a PATTERN_SCALARS field that gives the target layers their source layers' kinds."""
    kind, rule, keeps = PATTERN_SCALARS[key]
    want = [rule(j, value) for j in layer_map]
    # the source's value first (kept whenever it still fits), 0 last (a divisor there divides by zero)
    candidates = [value, *range(1, len(layer_map) + 2), 0]
    fit = next((v for v in candidates if [rule(i, v) for i in range(len(layer_map))] == want), None)
    if fit is None:
        marked = [i for i, m in enumerate(want) if m]
        raise HfStackError(
            f"config field {key!r}={value} marks layers {[j for j in range(num_source_layers) if rule(j, value)]} of "
            f"the source {kind}; this layer map would make target layers {marked} {kind}, a pattern {key!r} cannot "
            f"express; choose a layer map that keeps it ({keeps} does)"
        )
    return fit


def _layer_field(key: str, value, num_layers: int) -> str | None:
    """How a config field describes the layers: "pattern" (a `PATTERN_SCALARS` scalar), "indices" (a
    `LAYER_INDEX_LISTS` list), "per layer" (a list with one entry per layer), or None (not per layer)."""
    if key in NON_LAYER_LISTS or key in LAYER_SCALARS or key in TRAILING_LAYERS:
        return None
    if key in PATTERN_SCALARS and isinstance(value, int) and not isinstance(value, bool):
        return "pattern"
    if key in LAYER_INDEX_LISTS and isinstance(value, list):
        return "indices"
    if isinstance(value, list) and len(value) == num_layers:
        return "per layer"
    return None


def layer_kinds(config: dict, num_layers: int) -> list[tuple]:
    """What the config says of each layer: its entries in per-layer lists (`layer_types`, ...), whether index lists
    (`mlp_only_layers`, ...) name it, its kind under each `PATTERN_SCALARS` field. Equal tuples: alike layers."""
    marks = {
        "pattern": lambda key, value: [PATTERN_SCALARS[key][1](j, value) for j in range(num_layers)],
        "indices": lambda key, value: [j in value for j in range(num_layers)],
        "per layer": lambda key, value: [repr(v) for v in value],
    }
    kinds: list[list] = [[] for _ in range(num_layers)]
    for key, value in sorted(config.items()):
        field = _layer_field(key, value, num_layers)
        if field is not None:
            for kind, mark in zip(kinds, marks[field](key, value)):
                kind.append(mark)
    return [tuple(k) for k in kinds]


def check_source_config(config: dict) -> None:
    """Refuse configs growth cannot handle, before anything is read or written."""
    if "auto_map" in config:
        raise HfStackError(
            "the source config has 'auto_map' (custom code from the repository); hf_stack never runs remote code, "
            "so grow only models whose architecture ships with transformers"
        )
    for key in ("text_config", "vision_config", "encoder", "decoder"):
        if isinstance(config.get(key), dict):
            raise HfStackError(
                f"the source config has a nested {key!r}: multimodal and encoder-decoder models are not supported; "
                f"supported: {', '.join(TESTED_ARCHITECTURES)} and the other decoder-only families of README's support table"
            )
    layout = layout_of(config)
    L = config.get(layout.depth)
    if L is None and layout is LLAMA_LAYOUT and any(k in config for k in ("n_layer", "num_layers")):
        # GPT-J, Bloom, ...: another layout that `LAYOUTS` does not describe, not a config missing a field
        raise HfStackError(
            f"{config.get('model_type', 'this architecture')!r} keeps its decoder layers outside model.layers.{{i}} "
            f"(its depth is {'n_layer' if 'n_layer' in config else 'num_layers'}), in a layout hf_stack does not "
            f"know; it grows {', '.join(TESTED_ARCHITECTURES)}, GPT-2, GPT-NeoX and the other families in the README"
        )
    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise HfStackError(f"config.json needs {layout.depth} as a positive integer, found {L!r}")
    archs = config.get("architectures") or []
    # causal LM classes: *ForCausalLM, and the older *LMHeadModel (GPT-2)
    if not archs or not all(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise HfStackError(
            f"unsupported architecture {archs or config.get('model_type')!r}: hf_stack grows causal LMs "
            f"({', '.join(TESTED_ARCHITECTURES)}, and the other decoder-only families of README's support table)"
        )


def check_source_shapes(config: dict, tensor_infos: dict, width: bool = False) -> None:
    """Refuse tensors whose shapes contradict the config, from the headers alone (before any byte is written):
    the written checkpoint would not load. Checked for the model types whose tensors the width axes describe
    (`WIDTH_FAMILIES`); `width` growth also refuses tensors it does not know."""
    family = WIDTH_FAMILIES.get(config.get("model_type"))
    if family is None:
        return
    try:
        dims = width_dims(config, 1.0)  # factor 1: every axis at the source's own size
        axes = family_axes(split_axes, dims, 0.0, family, tied=False)
    except HfStackError:
        if width:
            raise
        return  # sizes missing from the config: nothing to check against (depth growth copies them as they are)
    vocab = config.get("vocab_size")
    for name, (_, shape) in tensor_infos.items():
        m = LAYER_KEY.match(name)
        try:
            names = tensor_axes(name, m.group(2) if m else None, family)
        except HfStackError:
            if width:
                raise
            continue  # depth growth copies tensors it does not know as they are
        want = [n if a is None else axes[a].source_size for n, a in zip(shape, names)]
        if name in (EMBED_KEY, LM_HEAD_KEY) and isinstance(vocab, int):
            want[0] = vocab
        if len(names) != len(shape) or list(shape) != want:
            raise HfStackError(f"tensor {name!r} has shape {list(shape)} but the config implies {want}")


def build_plan(
    config: dict, tensor_infos: dict[str, tuple[str, tuple[int, ...]]], stacked: StackedConfig
) -> GrowthPlan:
    """Compute the growth plan from the source config and its tensor names, dtypes and shapes.

    Args:
        config: the source `config.json` as a dict.
        tensor_infos: source tensor name -> (safetensors dtype string, shape), as read from the headers.
        stacked: the growth settings.

    Returns:
        A [`GrowthPlan`] naming a source for every tensor of the grown checkpoint.
    """
    check_source_config(config)
    layout = layout_of(config)
    L = config[layout.depth]
    directions = stacked.directions
    operator = get_operator(stacked.operator, directions)
    if layout is not LLAMA_LAYOUT and (operator.needs_data or "width" in directions):
        raise HfStackError(
            f"{stacked.operator!r} {' and '.join(directions)} growth reads the Llama layout (model.layers.{{i}}); "
            f"{config.get('model_type')!r} grows in depth by the copying operators (stack, zero, random)"
        )
    axes = family = None
    if "width" in directions:
        dims = width_dims(config, stacked.width_factor)
        family = WIDTH_FAMILIES[config["model_type"]]

    layers: dict[int, set[str]] = {}
    others: list[str] = []
    for key in tensor_infos:
        found = layout.layer_key(key)
        if found:
            layers.setdefault(found[0], set()).add(found[1])
        else:
            others.append(key)
    if not layers or layout.embed not in tensor_infos:
        raise HfStackError(
            f"the checkpoint has no {layout.embed!r} / '{layout.layers}{{i}}.' tensors ({config['architectures'][0]}); "
            f"supported: {', '.join(TESTED_ARCHITECTURES)} and other decoder-only models with that layout"
        )
    trailing = sum(config.get(k) or 0 for k in TRAILING_LAYERS)
    if sorted(layers) not in (list(range(L)), list(range(L + trailing))):
        raise HfStackError(
            f"config.json says {L} layers but the checkpoint holds layers {sorted(layers)}; the checkpoint is "
            "incomplete or does not belong to this config"
        )
    if operator.needs_data and (len(layers) > L or len({frozenset(t) for t in layers.values()}) > 1):
        raise HfStackError(
            f"{stacked.operator!r} growth learns one map per tensor of a layer, so every layer must hold the same "
            "tensors; this checkpoint's layers differ (or it stores prediction layers after them): use stack, zero "
            "or random"
        )
    # Layers the config describes alike must hold the same tensors; layers it sets apart (DeepSeek-V3's dense
    # first layers, Qwen-MoE's mlp_only_layers) may differ, and each target layer takes its source layer's.
    first_of_kind: dict[tuple, int] = {}
    for i, kind in enumerate(layer_kinds(config, L)):
        ref = first_of_kind.setdefault(kind, i)
        if layers[i] != layers[ref]:
            raise HfStackError(
                f"layer {i} has different tensors from layer {ref} (differs in {sorted(layers[i] ^ layers[ref])}), "
                "though the config describes the two alike; the checkpoint is inconsistent"
            )

    # A head the checkpoint does not store is tied to the embeddings unless the config says otherwise.
    head = layout.head(tensor_infos)
    tied = bool(config.get("tie_word_embeddings", head not in tensor_infos))
    if tied:
        others = [k for k in others if k != head]  # tied heads are not stored, as save_pretrained does
    elif head not in tensor_infos:
        raise HfStackError(
            f"the config says tie_word_embeddings is false but the checkpoint has no {head}; "
            "the checkpoint is incomplete"
        )

    check_source_shapes(config, tensor_infos, width="width" in directions)
    if family is not None:
        axes = family_axes(operator.width_axes, dims, stacked.width_noise, family, tied)
    layer_map = resolve_layer_map(stacked, L)
    entries: list[TensorSource] = []

    def add(target: str, source: str, op: str = "copy", suffix: str | None = None) -> None:
        dtype, shape = tensor_infos[source]
        names = None
        if axes is not None:
            names = tensor_axes(source, suffix, family)  # shapes already checked against the config
            for a in names:
                if a is not None and axes[a] is None:
                    raise HfStackError(
                        f"{stacked.operator!r} width growth cannot grow {source!r} of {config['model_type']!r} "
                        f"keeping its function: {UNAVAILABLE[a]}"
                    )
            shape = tuple(n if a is None else axes[a].target_size for n, a in zip(shape, names))
        op = "learn" if operator.needs_data and op == "copy" else op
        entries.append(TensorSource(target, source, op, dtype, tuple(shape), names))

    # Written in transformers' own order: embeddings, layers, then the rest (final norm, head).
    add(layout.embed, layout.embed)
    for i, j in enumerate(layer_map):
        overrides = operator.layer_ops(i, layer_map) if "depth" in directions else {}
        for suffix in sorted(layers[j]):
            op = next((o for pattern, o in overrides.items() if pattern != "*" and re.fullmatch(pattern, suffix)),
                      overrides.get("*", "copy"))  # fmt: skip
            add(f"{layout.layers}{i}.{suffix}", f"{layout.layers}{j}.{suffix}", op, suffix)
    for key in sorted(k for k in others if k != layout.embed):
        add(key, key)

    target_config = grow_config(config, layer_map)
    if tied:  # written out: where the config left it to its class's default, that default may be "untied"
        target_config["tie_word_embeddings"] = True
    if axes is not None:
        target_config = grow_width_config(target_config, dims, operator.width_eps(dims))
    used = {a for e in entries for a in e.axes or () if a}
    plan = GrowthPlan(
        operator=stacked.operator,
        layer_map=layer_map,
        source_num_layers=L,
        tensors=tuple(entries),
        target_config=target_config,
        directions=directions,
        function_preserving=operator.function_preserving(directions)
        and ("depth" not in directions or operator.keeps_function(layer_map, L, layers))
        and not any(config.get(k) for k in LAYER_INDEX_DEPENDENT),
        # the axes the tensors take (the plan prints and applies these)
        width=None if axes is None else {k: a for k, a in axes.items() if k in used},
        init_std=float(config.get("initializer_range") or 0.02),
        seed=stacked.init_seed,
    )
    if operator.needs_data and not plan.llama_width:
        raise HfStackError(
            f"{stacked.operator!r} width growth has maps for a dense Llama-style layer only; "
            f"{config['model_type']!r} grows its own way (norm offsets, scaled embeddings, post-norms, fused "
            "projections or experts): use --operator direct or zero"
        )
    return plan
