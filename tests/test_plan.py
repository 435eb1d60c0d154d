"""The growth plan is plain data: layer maps, config growth and tensor sources, checked without torch."""

import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_stack import HfStackError, StackedConfig
from hf_stack.operators import OPERATORS
from hf_stack.plans.plan import (
    build_plan,
    grow_config,
    layer_map_to_slices,
    parse_layer_map,
    resolve_layer_map,
)

SUFFIXES = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight"]


def fake_source(num_layers=6, tied=False, **config):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": num_layers,
           "tie_word_embeddings": tied, **config}  # fmt: skip
    infos = {"model.embed_tokens.weight": ("BF16", (100, 8)), "model.norm.weight": ("BF16", (8,))}
    for i in range(num_layers):
        for s in SUFFIXES:
            infos[f"model.layers.{i}.{s}"] = ("BF16", (8, 8) if "proj" in s else (8,))
    infos["lm_head.weight"] = ("BF16", (100, 8))
    return cfg, infos


def test_stack_order_is_the_papers_g_stack():
    assert resolve_layer_map(StackedConfig(factor=4), 6) == tuple(list(range(6)) * 4)
    assert StackedConfig().factor == 4  # the default is G_stack with g = 4


def test_interpolate_repeats_each_layer_in_place():
    assert resolve_layer_map(StackedConfig(factor=2, order="interpolate"), 3) == (0, 0, 1, 1, 2, 2)
    # N not a multiple of L: counts as even as possible, order kept
    m = resolve_layer_map(StackedConfig(num_layers=7, order="interpolate"), 3)
    assert list(m) == sorted(m) and set(m) == {0, 1, 2} and len(m) == 7


def test_middle_keeps_first_and_last():
    m = resolve_layer_map(StackedConfig(num_layers=10, order="middle"), 6)
    assert m == (0, 1, 2, 3, 4, 1, 2, 3, 4, 5)
    with pytest.raises(HfStackError, match="at least 3"):
        resolve_layer_map(StackedConfig(factor=2, order="middle"), 2)


def test_stack_with_layers_not_a_multiple():
    assert resolve_layer_map(StackedConfig(num_layers=8), 6) == (0, 1, 2, 3, 4, 5, 0, 1)


def test_explicit_layer_map_and_slices():
    m = parse_layer_map("0-5,0-5,2-3")
    assert m == (*range(6), *range(6), 2, 3)
    assert layer_map_to_slices(m) == [[0, 6], [0, 6], [2, 4]]
    assert StackedConfig(layer_map=[0, 1, 2, 0, 1, 2, 7]).layer_map == "0-2,0-2,7"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(factor=0), "at least 1"),
        (dict(factor=1.5), "whole number"),
        (dict(num_layers=-3), "at least 1"),
        (dict(factor=2, num_layers=4), "not both"),
        (dict(order="random"), "unknown order"),
        (dict(operator="nope"), "unknown operator"),
        (dict(dtype="int8"), "unknown dtype"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(HfStackError, match=match):
        StackedConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layer_map="0-5,9"), r"source layers \[9\]"),
        (dict(layer_map="0-x"), "cannot parse"),
        (dict(layer_map="5-2"), "backwards"),
        (dict(layer_map="0-5", num_layers=7), "agree"),
        (dict(num_layers=10**9), "more than the supported"),
    ],
)
def test_bad_layer_maps_are_refused(kwargs, match):
    with pytest.raises(HfStackError, match=match):
        resolve_layer_map(StackedConfig(**kwargs), 6)


def test_plan_names_a_source_for_every_target_tensor():
    cfg, infos = fake_source(6)
    plan = build_plan(cfg, infos, StackedConfig(factor=4))
    targets = [t.target for t in plan.tensors]
    assert len(targets) == len(set(targets)) == 2 + 1 + 24 * len(SUFFIXES)
    for t in plan.tensors:
        if t.target.startswith("model.layers."):
            i = int(t.target.split(".")[2])
            assert t.source == t.target.replace(f"layers.{i}.", f"layers.{i % 6}.", 1)
        else:
            assert t.source == t.target
        assert (t.dtype, t.shape) == infos[t.source]
    assert plan.target_config["num_hidden_layers"] == 24
    assert cfg["num_hidden_layers"] == 6  # the source config is not mutated


def test_tied_embeddings_write_no_lm_head():
    cfg, infos = fake_source(2, tied=True)
    plan = build_plan(cfg, infos, StackedConfig(factor=2))
    assert "lm_head.weight" not in {t.target for t in plan.tensors}
    cfg, infos = fake_source(2, tied=False)
    assert "lm_head.weight" in {t.target for t in build_plan(cfg, infos, StackedConfig(factor=2)).tensors}
    del infos["lm_head.weight"]
    with pytest.raises(HfStackError, match="no lm_head"):
        build_plan(cfg, infos, StackedConfig(factor=2))


def test_zero_operator_zeroes_output_projections_of_repeats_only():
    cfg, infos = fake_source(2)
    plan = build_plan(cfg, infos, StackedConfig(factor=2, operator="zero"))
    zeroed = {t.target for t in plan.tensors if t.op == "zero"}
    assert zeroed == {
        f"model.layers.{i}.{s}" for i in (2, 3) for s in ("self_attn.o_proj.weight", "mlp.down_proj.weight")
    }


@pytest.mark.parametrize("layer_map, kept", [("0,0,1,1,2", True), ("0-2,1,0", True), ("1,0,2", False), ("0,2", False)])
def test_zero_claims_the_function_only_for_maps_that_keep_the_source_order(layer_map, kept):
    cfg, infos = fake_source(3)
    plan = build_plan(cfg, infos, StackedConfig(layer_map=layer_map, operator="zero"))
    assert plan.function_preserving == kept
    assert plan.to_dict()["function_preserving"] == kept


def test_per_layer_config_fields_grow_with_the_layers():
    cfg = {"num_hidden_layers": 3, "layer_types": ["full_attention", "full_attention", "sliding_attention"],
           "max_window_layers": 2, "mlp_only_layers": [1], "eos_token_id": [1, 2, 3], "custom_per_layer": [10, 11, 12]}  # fmt: skip
    out = grow_config(cfg, (0, 1, 2, 0, 1, 2))
    assert out["layer_types"] == ["full_attention", "full_attention", "sliding_attention"] * 2
    assert out["custom_per_layer"] == [10, 11, 12, 10, 11, 12]  # any list with one entry per layer
    assert out["mlp_only_layers"] == [1, 4]  # index lists are remapped
    assert out["eos_token_id"] == [1, 2, 3]  # not per-layer even though its length is 3
    assert out["max_window_layers"] == 2
    out = grow_config(cfg, (0, 0, 1, 1, 2, 2))
    assert out["max_window_layers"] == 4


@pytest.mark.parametrize(
    "field, value, layers, layer_map, grown",
    [
        ("decoder_sparse_step", 1, 2, (0, 1, 0, 1), 1),  # Qwen-MoE: every layer sparse, whatever the map
        ("decoder_sparse_step", 2, 2, (0, 1, 0, 1), 2),  # every second layer sparse, stacked: still every second
        ("first_k_dense_replace", 1, 3, (0, 0, 1, 1, 2, 2), 2),  # DeepSeek: the dense first layer, interpolated
        ("sliding_window_pattern", 6, 6, tuple(range(6)) * 2, 6),  # Gemma 3 (1B as published), stacked
        ("sliding_window_pattern", 2, 2, (0, 1) * 3, 2),  # [local, global] stacked x3: every second global
        ("no_rope_layer_interval", 4, 4, tuple(range(4)) * 2, 4),  # SmolLM3: every 4th layer without RoPE
        ("no_rope_layer_interval", 4, 2, (0, 1, 0, 1), 5),  # none of 2 layers was: none of the 4 is (4 would be)
        ("moe_layer_freq", 1, 3, (0, 0, 1, 1, 2, 2), 1),  # DeepSeek-V2: every layer past the dense ones
        ("moe_layer_freq", 2, 4, tuple(range(4)) * 2, 2),  # every second layer, stacked: still every second
        ("moe_layer_freq", [1, 0, 1], 3, (0, 1, 2) * 2, [1, 0, 1] * 2),  # per-layer flags, grown per layer
    ],
)
def test_per_layer_patterns_are_carried_by_the_layer_map(field, value, layers, layer_map, grown):
    """A scalar that sets which layers are sparse, dense or global is grown by what it means: the target layers get
    their source layers' kinds, and the value that says so is written (the source's when it still fits)."""
    assert grow_config({"num_hidden_layers": layers, field: value}, layer_map)[field] == grown


def test_moe_layer_freq_with_dense_first_layers_is_carried_or_refused_with_the_kinds():
    """DeepSeek-V2 style: sparse where i >= first_k_dense_replace and i % moe_layer_freq == 0. Interpolated, both
    carry (the dense first layer doubles); a map whose sparse layers fall out of step with every freq is refused."""
    cfg = {"num_hidden_layers": 3, "first_k_dense_replace": 1, "moe_layer_freq": 1}
    out = grow_config(cfg, (0, 0, 1, 1, 2, 2))
    assert (out["first_k_dense_replace"], out["moe_layer_freq"]) == (2, 1)
    with pytest.raises(HfStackError, match="moe_layer_freq"):
        grow_config({"num_hidden_layers": 4, "moe_layer_freq": 2}, (0, 0, 1, 1, 2, 2, 3, 3))


def test_published_qwen2_5_without_sliding_grows():
    """Qwen2.5 as published: max_window_layers below the depth, no layer_types, but no sliding window at all."""
    cfg = {"num_hidden_layers": 2, "max_window_layers": 1, "use_sliding_window": False}
    assert grow_config(cfg, (0, 1, 0, 1))["num_hidden_layers"] == 4
    with pytest.raises(HfStackError, match="no layer_types"):
        grow_config({**cfg, "use_sliding_window": True}, (0, 1, 0, 1))


@pytest.mark.parametrize(
    "field, value", [("num_experts_per_layer", [1, 2]), ("first_k_dense_replace", 1), ("sliding_window_pattern", 2)]
)
def test_unknown_per_layer_config_field_is_an_error(field, value):
    with pytest.raises(HfStackError, match=field):
        grow_config({"num_hidden_layers": 3, field: value}, (0, 1, 2, 0, 1, 2))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(auto_map={"AutoModelForCausalLM": "x.Y"}), "auto_map"),
        (dict(architectures=["BertModel"]), "unsupported architecture"),
        (dict(text_config={"num_hidden_layers": 2}), "nested"),
        (dict(num_hidden_layers=0), "positive integer"),
        # GPT-J's layout (transformer.h, like GPT-2's, which LAYOUTS describes): the reason is the layout, not a
        # missing field
        (dict(num_hidden_layers=None, n_layer=2, model_type="gptj"), "'gptj' keeps its decoder layers outside"),
    ],
)
def test_unsupported_sources_are_refused(change, match):
    cfg, infos = fake_source(2)
    with pytest.raises(HfStackError, match=match):
        build_plan({**cfg, **change}, infos, StackedConfig(factor=2))


def test_checkpoint_that_does_not_match_config_is_refused():
    cfg, infos = fake_source(3)
    del infos["model.layers.2.self_attn.q_proj.weight"]
    with pytest.raises(HfStackError, match="layer 2"):
        build_plan(cfg, infos, StackedConfig(factor=2))
    cfg, infos = fake_source(3)
    with pytest.raises(HfStackError, match="says 4 layers"):
        build_plan({**cfg, "num_hidden_layers": 4}, infos, StackedConfig(factor=2))
    with pytest.raises(HfStackError, match="names what|supported"):
        build_plan(cfg, {"transformer.h.0.w": ("F32", (2,))}, StackedConfig(factor=2))


def test_layers_the_config_sets_apart_may_hold_different_tensors():
    """Layers a config describes apart (here layer 0 dense by `mlp_only_layers`, as Qwen-MoE; DeepSeek-V3's
    `first_k_dense_replace` alike) hold different tensors: each target layer takes its own source layer's. The same
    checkpoint without the field is inconsistent and refused."""
    cfg, infos = fake_source(3, mlp_only_layers=[0])
    for i in (1, 2):
        del infos[f"model.layers.{i}.mlp.down_proj.weight"]
        infos[f"model.layers.{i}.mlp.experts.0.down_proj.weight"] = ("BF16", (8, 8))
    plan = build_plan(cfg, infos, StackedConfig(factor=2))
    assert plan.target_config["mlp_only_layers"] == [0, 3]
    for i, j in enumerate(plan.layer_map):
        got = sorted(t.source for t in plan.tensors if t.target.startswith(f"model.layers.{i}."))
        assert got == sorted(k for k in infos if k.startswith(f"model.layers.{j}.")), i
    del cfg["mlp_only_layers"]
    with pytest.raises(HfStackError, match="layer 1 has different tensors from layer 0.*describes the two alike"):
        build_plan(cfg, infos, StackedConfig(factor=2))


def test_layouts_are_data():
    """GPT-NeoX keeps its layers, embeddings and head under other names: the plan reads them from LAYOUTS."""
    cfg = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "num_hidden_layers": 2}
    infos = {"gpt_neox.embed_in.weight": ("F32", (10, 4)), "embed_out.weight": ("F32", (10, 4)),
             "gpt_neox.final_layer_norm.weight": ("F32", (4,))}  # fmt: skip
    for i in range(2):
        infos[f"gpt_neox.layers.{i}.attention.dense.weight"] = ("F32", (4, 4))
    plan = build_plan(cfg, infos, StackedConfig(factor=2))
    assert [t.target for t in plan.tensors] == ["gpt_neox.embed_in.weight"] + [
        f"gpt_neox.layers.{i}.attention.dense.weight" for i in range(4)
    ] + ["embed_out.weight", "gpt_neox.final_layer_norm.weight"]
    assert [t.source for t in plan.tensors][1:5] == [
        f"gpt_neox.layers.{j}.attention.dense.weight" for j in (0, 1, 0, 1)
    ]
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2, "tie_word_embeddings": True}
    infos = {"transformer.wte.weight": ("F32", (10, 4)), **{f"transformer.h.{i}.mlp.c_proj.weight": ("F32", (4, 4))
                                                              for i in range(2)}}  # fmt: skip
    plan = build_plan(gpt2, infos, StackedConfig(factor=2))  # GPT-2: depth in n_layer, the head tied, unstored
    assert plan.target_config["n_layer"] == 4 and "num_hidden_layers" not in plan.target_config
    assert [t.target for t in plan.tensors][-1] == "transformer.h.3.mlp.c_proj.weight"


def test_describe_lists_every_target_tensor():
    cfg, infos = fake_source(2)
    plan = build_plan(cfg, infos, StackedConfig(factor=2))
    text = plan.describe()
    assert "[0, 2) + [0, 2)" in text
    for t in plan.tensors:
        assert f"{t.target} " in text


def test_plans_do_not_need_torch():
    code = (
        "import sys; from hf_stack.plans.plan import build_plan, resolve_layer_map; from hf_stack import StackedConfig;"
        "import hf_stack.checkpoints.streaming, hf_stack.cli; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@settings(max_examples=200, deadline=None)
@given(
    L=st.integers(1, 12),
    order=st.sampled_from(["stack", "interpolate", "middle"]),
    n=st.integers(1, 64),
    operator=st.sampled_from(sorted(OPERATORS)),
)
def test_every_valid_setting_gives_a_complete_plan(L, order, n, operator):
    cfg, infos = fake_source(L)
    learn = {"learn_data": "text.txt"} if OPERATORS[operator].needs_data else {}
    stacked = StackedConfig(num_layers=n, order=order, operator=operator, **learn)
    try:
        plan = build_plan(cfg, infos, stacked)
    except HfStackError:
        assert order == "middle" and (L < 3 or n < L)  # the only refusals for in-range settings
        return
    assert plan.num_layers == n
    assert all(0 <= j < L for j in plan.layer_map)
    assert {t.target for t in plan.tensors} == {f"model.layers.{i}.{s}" for i in range(n) for s in SUFFIXES} | {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}  # fmt: skip
    if order == "interpolate":
        assert list(plan.layer_map) == sorted(plan.layer_map)
    if order == "stack":
        assert plan.layer_map == tuple(i % L for i in range(n))
    assert sum(b - a for a, b in plan.slices()) == n


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=40))
def test_explicit_maps_round_trip_through_the_spec(layer_map):
    spec = StackedConfig(layer_map=layer_map).layer_map
    assert parse_layer_map(spec) == tuple(layer_map)
    if max(layer_map) >= 8:
        with pytest.raises(HfStackError, match="only 8 layers"):
            resolve_layer_map(StackedConfig(layer_map=spec), 8)


# ---------------------------------------------------------------- width plans

LLAMA_SHAPES = {"input_layernorm.weight": ("H",), "post_attention_layernorm.weight": ("H",),
                "self_attn.q_proj.weight": ("Q", "H"), "self_attn.k_proj.weight": ("K", "H"),
                "self_attn.v_proj.weight": ("K", "H"), "self_attn.o_proj.weight": ("H", "Q"),
                "mlp.gate_proj.weight": ("F", "H"), "mlp.up_proj.weight": ("F", "H"), "mlp.down_proj.weight": ("H", "F")}  # fmt: skip


def fake_llama(H, F, heads, kv, head_dim, L=2):
    sizes = {"H": H, "F": F, "Q": heads * head_dim, "K": kv * head_dim}
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": L, "hidden_size": H,
           "intermediate_size": F, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
           "tie_word_embeddings": False}  # fmt: skip
    infos = {"model.embed_tokens.weight": ("F32", (50, H)), "model.norm.weight": ("F32", (H,)),
             "lm_head.weight": ("F32", (50, H))}  # fmt: skip
    for i in range(L):
        for s, dims in LLAMA_SHAPES.items():
            infos[f"model.layers.{i}.{s}"] = ("F32", tuple(sizes[d] for d in dims))
    return cfg, infos, sizes


@settings(max_examples=150, deadline=None)
@given(
    heads_kv=st.sampled_from([(4, 1), (4, 2), (4, 4), (8, 2), (6, 3), (2, 2)]),
    head_dim=st.sampled_from([2, 4, 8]),
    ffn_mult=st.integers(1, 4),
    width_factor=st.sampled_from([1.5, 2, 2.5, 3, 4, 1.25]),
    operator=st.sampled_from(["direct", "zero", "random"]),
)
def test_width_plans_keep_heads_whole_and_splits_exact(heads_kv, head_dim, ffn_mult, width_factor, operator):
    heads, kv = heads_kv
    H = heads * head_dim
    cfg, infos, sizes = fake_llama(H, H * ffn_mult, heads, kv, head_dim)
    stacked = StackedConfig(operator=operator, width_factor=width_factor)
    whole = all(abs(n * width_factor - round(n * width_factor)) < 1e-9 for n in (H, H * ffn_mult, heads, kv))
    if not whole:
        with pytest.raises(HfStackError, match="cannot keep heads whole"):
            build_plan(cfg, infos, stacked)
        return
    plan = build_plan(cfg, infos, stacked)
    grown = {k: round(v * width_factor) for k, v in sizes.items()}
    t = plan.target_config
    assert (t["hidden_size"], t["intermediate_size"]) == (grown["H"], grown["F"])
    assert (t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]) == (
        round(heads * width_factor), round(kv * width_factor), head_dim)  # fmt: skip
    for entry in plan.tensors:  # every target tensor has the grown shape its role asks for
        if entry.target.startswith("model.layers."):
            want = tuple(grown[d] for d in LLAMA_SHAPES[entry.target.split(".", 3)[3]])
            assert entry.shape == want, entry.target
    axes, groups = plan.width, heads // kv
    q, k = axes["q_out"].index, axes["k_out"].index
    for u in range(len(q)):  # units of a query head come from one source head, in order, within its GQA group
        if q[u] >= 0:
            assert q[u] % head_dim == u % head_dim
            group = (u // head_dim) // groups
            assert k[group * head_dim] >= 0 and q[u] // head_dim // groups == k[group * head_dim] // head_dim
    if operator == "direct":
        assert plan.function_preserving and all(j >= 0 for a in axes.values() for j in a.index)
        hidden = axes["hidden_in"]
        for j in range(H):  # the residual stream keeps its RMS: sum of t^2 over copies = H'/H
            total = sum(s * s for i, s in zip(hidden.index, hidden.scale) if i == j)
            assert total == pytest.approx(grown["H"] / H)
        for name in ("attn_in", "ffn_in"):  # a copied unit's readers share its weight
            a = axes[name]
            for j in range(a.source_size):
                assert sum(s for i, s in zip(a.index, a.scale) if i == j) == pytest.approx(1.0)
    else:
        for a in axes.values():
            assert a.index[: a.source_size] == tuple(range(a.source_size))
            assert all(j == -1 for j in a.index[a.source_size :])


def test_width_refuses_architectures_and_tensors_it_does_not_know():
    cfg, infos, _ = fake_llama(8, 16, 4, 2, 2)
    gemma = {**cfg, "model_type": "cohere", "architectures": ["CohereForCausalLM"]}  # LayerNorm, parallel branches
    with pytest.raises(HfStackError, match="width growth supports model types"):
        build_plan(gemma, infos, StackedConfig(operator="direct", width_factor=2))
    build_plan(gemma, infos, StackedConfig(operator="zero", factor=2))  # depth growth only renames tensors
    # Gemma grows in width by its own rules ((1 + w) norms, scaled embeddings), which LiGO's maps do not know
    gemma = {**cfg, "model_type": "gemma", "architectures": ["GemmaForCausalLM"]}
    assert build_plan(gemma, infos, StackedConfig(operator="direct", width_factor=2)).width["norm"].offset == 1.0
    with pytest.raises(HfStackError, match="'learn' width growth has maps for a dense Llama-style layer only"):
        build_plan(gemma, infos, StackedConfig(operator="learn", width_factor=2, learn_data="x.txt"))
    # Mixtral's layers take the Llama rules, but LiGO has no maps for its experts
    experts = {k.replace("mlp.up_proj", "block_sparse_moe.experts.0.w3"): v for k, v in infos.items()}
    mixtral = {**cfg, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}
    with pytest.raises(HfStackError, match="'mixtral' grows its own way"):
        build_plan(mixtral, experts, StackedConfig(operator="learn", width_factor=2, learn_data="x.txt"))
    from hf_stack.checkpoints.ligo import MAP_OF_AXIS
    from hf_stack.plans.width import LLAMA_AXES

    assert set(MAP_OF_AXIS) == LLAMA_AXES
    no_ffn = {k: v for k, v in cfg.items() if k != "intermediate_size"}
    with pytest.raises(HfStackError, match="needs intermediate_size"):
        build_plan(no_ffn, infos, StackedConfig(operator="direct", width_factor=2))
    wrong = {**infos, "model.layers.1.self_attn.k_proj.weight": ("F32", (8, 8))}  # 2 kv heads of 2 would be 4 rows
    with pytest.raises(HfStackError, match=r"k_proj.weight' has shape \[8, 8\] but the config implies \[4, 8\]"):
        build_plan(cfg, wrong, StackedConfig(operator="zero", width_factor=2))
    extra = {**infos, **{f"model.layers.{i}.mlp.router.weight": ("F32", (4, 8)) for i in range(2)}}
    with pytest.raises(HfStackError, match="does not know how to grow tensor 'model.layers.0.mlp.router.weight'"):
        build_plan(cfg, extra, StackedConfig(operator="zero", width_factor=2))


def test_width_plan_describes_every_axis_and_records_it():
    cfg, infos, _ = fake_llama(8, 16, 4, 2, 2)
    plan = build_plan(cfg, infos, StackedConfig(operator="direct", factor=2, width_factor=1.5))
    text = plan.describe()
    assert "hidden_in: 8 -> 12; 4 units copied from [0-3]; scales 0.866025, 1.22474" in text
    assert "k_out: 4 -> 6; 2 units copied from [0-1]" in text  # one whole key/value head copied
    line = next(x for x in text.splitlines() if x.strip().startswith("model.layers.3.mlp.down_proj.weight "))
    assert "<- model.layers.1.mlp.down_proj.weight  F32[12, 24]  grown along hidden_out x ffn_in" in line
    record = plan.to_dict()
    assert record["directions"] == ["depth", "width"] and not record["function_preserving"]
    assert set(record["width"]) == set(plan.width)


@pytest.mark.parametrize(
    ("name", "shape", "want"),
    [("model.layers.0.mlp.down_proj.weight", (3, 3), [8, 16]), ("model.embed_tokens.weight", (49, 8), [50, 8]),
     ("model.layers.1.input_layernorm.weight", (9,), [8])],
)  # fmt: skip
def test_depth_growth_refuses_shapes_the_config_contradicts(name, shape, want):
    cfg, infos, _ = fake_llama(8, 16, 4, 2, 2)
    cfg["vocab_size"] = 50
    build_plan(cfg, infos, StackedConfig(factor=2))
    wrong = {**infos, name: ("F32", shape)}
    with pytest.raises(
        HfStackError, match=re.escape(f"{name!r} has shape {list(shape)} but the config implies {want}")
    ):
        build_plan(cfg, wrong, StackedConfig(factor=2))


def test_zero_claims_the_function_only_where_it_knows_every_branchs_writer():
    """A repeated layer is an identity only if its attention and feed-forward writes are zeroed: a family whose
    writers the table does not name grows, but its plan does not claim to keep the function."""
    cfg, infos = fake_source(2)
    assert build_plan(cfg, infos, StackedConfig(operator="zero", factor=2)).function_preserving
    renamed = {k.replace("mlp.down_proj", "ffn.w_out"): v for k, v in infos.items()}
    plan = build_plan(cfg, renamed, StackedConfig(operator="zero", factor=2))
    assert not plan.function_preserving and "function preserving: no" in plan.describe()
    assert [t.op for t in plan.tensors if t.target == "model.layers.3.self_attn.o_proj.weight"] == ["zero"]


def test_trailing_prediction_layers_are_left_out():
    """DeepSeek-V3 as published stores its multi-token prediction module as one layer after the decoder's
    (`num_nextn_predict_layers`), which transformers loads only at that index: the grown checkpoint leaves it out and
    says so in its config; the decoder's layers are mapped as usual."""
    cfg, infos = fake_source(2, num_nextn_predict_layers=1)
    infos["model.layers.2.eh_proj.weight"] = ("BF16", (8, 16))
    plan = build_plan(cfg, infos, StackedConfig(factor=2))
    assert plan.target_config["num_hidden_layers"] == 4 and plan.target_config["num_nextn_predict_layers"] == 0
    assert not any("eh_proj" in t.target or t.source.startswith("model.layers.2.") for t in plan.tensors)
    assert {t.target.split(".")[2] for t in plan.tensors if t.target.startswith("model.layers.")} == {
        "0",
        "1",
        "2",
        "3",
    }
    with pytest.raises(HfStackError, match="every layer must hold the same tensors"):  # LiGO maps per tensor
        build_plan(cfg, infos, StackedConfig(operator="learn", factor=2, learn_data="x.txt"))
    del infos["model.layers.2.eh_proj.weight"]  # as transformers saves it (it does not run the module)
    assert build_plan(cfg, infos, StackedConfig(factor=2)).num_layers == 4


def test_a_head_left_to_the_class_default_is_written_tied():
    """No `tie_word_embeddings` in the config and no head stored: tied, and the grown config says so (a class whose
    default is untied would otherwise load a random head)."""
    cfg, infos = fake_source(2)
    del cfg["tie_word_embeddings"], infos["lm_head.weight"]
    plan = build_plan(cfg, infos, StackedConfig(factor=2))
    assert plan.target_config["tie_word_embeddings"] is True and "lm_head.weight" not in [
        t.target for t in plan.tensors
    ]


def test_layer_index_dependent_computation_is_never_claimed_kept():
    cfg, infos = fake_source(2, scale_attn_by_inverse_layer_idx=True)
    assert not build_plan(cfg, infos, StackedConfig(operator="zero", factor=2)).function_preserving


def test_a_mixer_whose_writer_is_unknown_is_not_claimed_kept():
    """A hybrid layer's mixer is a third branch: zeroing attention and feed-forward is not enough."""
    cfg, infos = fake_source(2)
    for i in range(2):
        infos[f"model.layers.{i}.linear_attn.in_proj.weight"] = ("BF16", (8, 8))
        infos[f"model.layers.{i}.linear_attn.out.weight"] = ("BF16", (8, 8))  # not a name the table knows
    assert not build_plan(cfg, infos, StackedConfig(operator="zero", factor=2)).function_preserving
    renamed = {
        k.replace("linear_attn.out", "mamba.out_proj").replace("linear_attn", "mamba"): v for k, v in infos.items()
    }
    assert build_plan(cfg, renamed, StackedConfig(operator="zero", factor=2)).function_preserving
