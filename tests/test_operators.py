"""Every registered operator x direction x architecture: a standard checkpoint whose function matches the claim."""

import json
from concurrent.futures import Future

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_stack import StackedConfig, StackedModelForCausalLM, StackingTrainingArguments, grow
from hf_stack.checkpoints.in_memory import grow_model
from hf_stack.errors import HfStackError
from hf_stack.operators import OPERATORS, operator_table
from hf_stack.training.msg import GrowthMasks
from tests.conftest import TEXT, build_checkpoint
from tests.test_grow import load_all

DIRECTIONS = {"depth": dict(factor=2), "width": dict(width_factor=2), "both": dict(factor=2, width_factor=1.5)}
# float32 tolerance; zero-width also halves the epsilon Qwen3's per-head q_norm/k_norm share with the rest.
ATOL = 5e-5


@pytest.fixture(scope="module")
def learn_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("learn") / "text.txt"
    path.write_text((TEXT + "\n") * 40)
    return str(path)


def settings(operator, direction, learn_data):
    extra = dict(learn_data=learn_data, learn_steps=3, learn_batch_size=2, learn_block_size=16)
    return StackedConfig(operator=operator, **DIRECTIONS[direction], **(extra if operator == "learn" else {}))


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
@pytest.mark.parametrize("operator", sorted(OPERATORS))
def test_operator_writes_a_standard_checkpoint_true_to_its_claim(
    operator, direction, arch, tmp_path, token_ids, learn_data
):
    src = tmp_path / "small"
    small = build_checkpoint(src, arch)
    stacked = settings(operator, direction, learn_data)
    out = tmp_path / "grown"
    plan = grow(src, out, stacked, verify=True)

    # keys and shapes are exactly those of the target config's own model
    config = AutoConfig.from_pretrained(out)
    expected = AutoModelForCausalLM.from_config(config).state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    written = load_all(out)
    assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    if "width" in stacked.directions:

        def head_dim(c):
            return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

        assert config.hidden_size == int(32 * stacked.width_factor) and head_dim(config) == head_dim(small.config)
        assert config.num_key_value_heads == int(small.config.num_key_value_heads * stacked.width_factor)
    if "depth" in stacked.directions:
        assert config.num_hidden_layers == 6

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    assert "auto_map" not in json.loads((out / "config.json").read_text())

    # the in-memory path gives the same tensors, none sharing storage (tied embeddings apart)
    memory = StackedModelForCausalLM.from_small_pretrained(src, stacked)
    state = memory.state_dict()
    for k, v in written.items():
        assert torch.equal(state[k], v), k
    ptrs = [p.data_ptr() for k, p in state.items() if k != "lm_head.weight" or not config.tie_word_embeddings]
    assert len(ptrs) == len(set(ptrs))

    # the function-preserving claim, as README's table states it, holds, and a "no" really changes the logits
    claim = all(OPERATORS[operator].growth(d).function_preserving for d in stacked.directions)
    assert plan.function_preserving == claim
    record = json.loads((out / "growth_config.json").read_text())
    assert record["function_preserving"] == claim and record["directions"] == list(stacked.directions)
    assert StackedConfig.from_pretrained(out) == stacked  # the settings read back
    with torch.no_grad():
        want, got = small(token_ids).logits, model(token_ids).logits
    if claim:
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    else:
        assert (got - want).abs().max() > 1e-3


def test_readme_claims_cover_every_operator_and_direction():
    table = operator_table()
    for name, op in OPERATORS.items():
        for direction in ("depth", "width"):
            fp = "yes" if op.growth(direction).function_preserving else "no"
            assert f"| `{name}` | {direction} | {op.growth(direction).paper_name} | {fp} |" in table


@pytest.mark.parametrize("factor", [1.5, 3])
def test_direct_width_split_is_exact_for_uneven_copies(factor, tmp_path, token_ids):
    # 1.5x copies only half the units (and heads): RMSNorm and the readers are corrected per copy count.
    small = build_checkpoint(tmp_path / "s", "llama", num_key_value_heads=2)
    model = StackedModelForCausalLM.from_small_pretrained(
        tmp_path / "s", StackedConfig(operator="direct", width_factor=factor)
    )
    assert model.config.num_attention_heads == int(4 * factor)
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids).logits, small(token_ids).logits, atol=ATOL, rtol=0)
        # generation with the grown KV cache follows the small model token for token
        a = model.generate(token_ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = small.generate(token_ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_zero_width_keeps_new_units_silent_and_trainable(tmp_path, token_ids):
    build_checkpoint(tmp_path / "s", "qwen2")
    model = StackedModelForCausalLM.from_small_pretrained(
        tmp_path / "s", StackedConfig(operator="zero", width_factor=2)
    )
    layer = model.model.layers[0]
    assert torch.all(layer.mlp.up_proj.weight[64:, :32] == 0)  # new FFN units are zero...
    assert layer.mlp.gate_proj.weight[64:, :32].abs().sum() > 0  # ...through their up rows only (no saddle)
    assert layer.mlp.down_proj.weight[:, 64:].abs().sum() > 0  # and are read by randomly initialised columns
    assert torch.all(model.model.embed_tokens.weight[:, 32:] == 0)
    hidden = model(token_ids, output_hidden_states=True).hidden_states
    assert all(torch.all(h[..., 32:] == 0) for h in hidden)  # new hidden units stay zero through every layer
    model.train()
    model(token_ids, labels=token_ids).loss.backward()
    # new units get gradients (no zero-times-zero saddle): values, up rows, writes into the stream
    assert layer.self_attn.v_proj.weight.grad[16:].abs().sum() > 0  # 2 -> 4 key/value heads of 8
    assert layer.mlp.up_proj.weight.grad[64:].abs().sum() > 0
    assert layer.mlp.down_proj.weight.grad[32:].abs().sum() > 0
    assert model.model.embed_tokens.weight.grad[:, 32:].abs().sum() > 0


def test_random_operator_initialises_like_the_target_architecture(tmp_path):
    build_checkpoint(tmp_path / "s", "llama", initializer_range=0.05)
    grow(tmp_path / "s", tmp_path / "a", StackedConfig(operator="random", factor=2, width_factor=2, init_seed=1))
    grow(tmp_path / "s", tmp_path / "b", StackedConfig(operator="random", factor=2, width_factor=2, init_seed=1))
    grow(tmp_path / "s", tmp_path / "c", StackedConfig(operator="random", factor=2, width_factor=2, init_seed=2))
    a, b, c = (load_all(tmp_path / x) for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded
    assert not torch.equal(a["model.layers.4.mlp.up_proj.weight"], c["model.layers.4.mlp.up_proj.weight"])
    new_layer = a["model.layers.4.mlp.up_proj.weight"]  # a layer beyond the source's three: all new
    assert abs(new_layer.std().item() - 0.05) < 0.005 and abs(new_layer.mean().item()) < 0.005
    assert torch.all(a["model.layers.4.input_layernorm.weight"] == 1)
    src = load_all(tmp_path / "s")
    # old layers keep the source in the top-left block
    assert torch.equal(a["model.layers.1.mlp.up_proj.weight"][:64, :32], src["model.layers.1.mlp.up_proj.weight"])


def test_learn_trains_the_maps_and_records_it(tmp_path, learn_data, token_ids):
    small = build_checkpoint(tmp_path / "s", "llama")
    stacked = StackedConfig(operator="learn", factor=2, width_factor=2, learn_data=learn_data, learn_steps=25,
                            learn_lr=1e-2, learn_batch_size=4, learn_block_size=16)  # fmt: skip
    grow(tmp_path / "s", tmp_path / "g", stacked)
    record = json.loads((tmp_path / "g" / "growth_config.json").read_text())["learn"]
    assert record["steps"] == 25 and record["loss_last"] < record["loss_first"]
    grown = load_all(tmp_path / "g")
    src = small.state_dict()
    # trained away from the init (layer 3 = stacked copy of layer 0, old units = identity)
    assert not torch.allclose(
        grown["model.layers.3.self_attn.q_proj.weight"][:32, :32], src["model.layers.0.self_attn.q_proj.weight"]
    )
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "g")(token_ids).logits.isfinite().all()


@pytest.mark.parametrize("noise", [0.0, 0.01])
def test_direct_width_noise_keeps_the_function_and_breaks_the_copies_symmetry(noise, tmp_path, token_ids):
    small = build_checkpoint(tmp_path / "s", "llama")
    model = StackedModelForCausalLM.from_small_pretrained(
        tmp_path / "s", StackedConfig(operator="direct", width_factor=2, width_noise=noise)
    )
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids).logits, small(token_ids).logits, atol=ATOL, rtol=0)
    model.train()
    model(token_ids, labels=token_ids).loss.backward()
    up = model.model.layers[0].mlp.up_proj.weight.grad  # FFN unit 0 and its copy, unit 64
    hidden = model.model.layers[0].self_attn.o_proj.weight.grad  # hidden unit 0 and its copy, unit 32
    same = torch.allclose(up[0], up[64]) and torch.allclose(hidden[0], hidden[32])
    assert same == (noise == 0.0)  # exact duplicates learn in lockstep forever; noise lets them diverge


@pytest.mark.parametrize("kw", [dict(factor=2), dict(width_factor=2), dict(factor=2, width_factor=1.5)])
def test_growth_masks_start_at_the_source_function_and_end_as_the_plain_model(kw, arch, tmp_path, token_ids):
    small = build_checkpoint(tmp_path / "s", arch)
    grown, plan, _ = grow_model(small, StackedConfig(operator="random", **kw))
    grown.eval()
    with torch.no_grad():
        want, plain = small(token_ids).logits, grown(token_ids).logits
        masks = GrowthMasks(grown, plan)
        masks.set(0.0)
        torch.testing.assert_close(grown(token_ids).logits, want, atol=ATOL, rtol=0)
        masks.set(0.5)
        half = grown(token_ids).logits
        masks.set(1.0)
        assert torch.equal(grown(token_ids).logits, plain)
        masks.remove()
        assert torch.equal(grown(token_ids).logits, plain) and not grown.model.layers[0].mlp.up_proj._forward_hooks
    assert (half - want).abs().max() > 1e-3 and (half - plain).abs().max() > 1e-3


def test_growth_masks_are_for_random_growth_only(tmp_path):
    small = build_checkpoint(tmp_path / "s", "llama")
    grown, plan, _ = grow_model(small, StackedConfig(operator="zero", factor=2))
    with pytest.raises(HfStackError, match="random"):
        GrowthMasks(grown, plan)
    with pytest.raises(HfStackError, match="random operator"):
        StackingTrainingArguments("r", grow_at_tokens=10, max_tokens=100, mask_steps=5, report_to=[],
                                  stacked_config={"operator": "zero", "factor": 2})  # fmt: skip
    with pytest.raises(HfStackError, match="depth growth with the direct"):
        StackingTrainingArguments("r", carry_optimizer_state=True, report_to=[],
                                  stacked_config={"operator": "direct", "width_factor": 2})  # fmt: skip


@pytest.mark.parametrize("f", [2, 3])
def test_direct_width_split_matches_the_net2net_formula_written_out(f, tmp_path):
    """The split, restated here without the plan: target hidden unit k copies source unit k mod H, FFN unit k copies
    k mod F, query head h copies ((h // G) mod n_kv) G + h mod G (whole GQA groups), key/value head g copies g mod
    n_kv; readers of an f times copied attention output or FFN unit take 1/f of its column; norms take H / H'."""
    small = build_checkpoint(tmp_path / "s", "llama", num_layers=2)  # H 32, F 64, 4 heads of 8, 2 kv heads
    grow(tmp_path / "s", tmp_path / "g", StackedConfig(operator="direct", width_factor=f, width_noise=0.0))
    src, out = small.state_dict(), load_all(tmp_path / "g")
    H, F, hd, G, n_kv = 32, 64, 8, 2, 2
    hidden, ffn = torch.arange(f * H) % H, torch.arange(f * F) % F
    q_heads = torch.tensor([((h // G) % n_kv) * G + h % G for h in range(4 * f)])
    q_units = (q_heads[:, None] * hd + torch.arange(hd)).flatten()
    kv_units = ((torch.arange(n_kv * f) % n_kv)[:, None] * hd + torch.arange(hd)).flatten()
    assert torch.equal(out["model.embed_tokens.weight"], src["model.embed_tokens.weight"][:, hidden])
    assert torch.equal(out["lm_head.weight"], src["lm_head.weight"][:, hidden])
    assert torch.allclose(out["model.norm.weight"], src["model.norm.weight"][hidden] / f, rtol=1e-6, atol=0)
    for i in range(2):
        s = {k.split(f"layers.{i}.")[1]: v for k, v in src.items() if f"layers.{i}." in k}
        o = {k.split(f"layers.{i}.")[1]: v for k, v in out.items() if f"layers.{i}." in k}
        assert torch.equal(o["self_attn.q_proj.weight"], s["self_attn.q_proj.weight"][q_units][:, hidden])
        for name in ("k_proj", "v_proj"):
            assert torch.equal(o[f"self_attn.{name}.weight"], s[f"self_attn.{name}.weight"][kv_units][:, hidden])
        torch.testing.assert_close(o["self_attn.o_proj.weight"], s["self_attn.o_proj.weight"][hidden][:, q_units] / f,
                                   rtol=1e-6, atol=0)  # fmt: skip
        for name in ("gate_proj", "up_proj"):
            assert torch.equal(o[f"mlp.{name}.weight"], s[f"mlp.{name}.weight"][ffn][:, hidden])
        torch.testing.assert_close(o["mlp.down_proj.weight"], s["mlp.down_proj.weight"][hidden][:, ffn] / f,
                                   rtol=1e-6, atol=0)  # fmt: skip
        for name in ("input_layernorm", "post_attention_layernorm"):
            torch.testing.assert_close(o[f"{name}.weight"], s[f"{name}.weight"][hidden] / f, rtol=1e-6, atol=0)


def test_width_noise_sums_to_zero_over_the_copies_written_out(tmp_path):
    """The symmetry-breaking noise, checked without the plan: the noisy growth minus the noiseless one is zero
    except in the readers' columns, sums to zero over the copies of each source unit (k mod H, k mod F), and is of
    the requested size (width_noise times the tensor's standard deviation)."""
    build_checkpoint(tmp_path / "s", "llama", num_layers=1)
    grow(tmp_path / "s", tmp_path / "plain", StackedConfig(operator="direct", width_factor=2, width_noise=0.0))
    grow(tmp_path / "s", tmp_path / "noisy", StackedConfig(operator="direct", width_factor=2, width_noise=0.05))
    src, plain, noisy = load_all(tmp_path / "s"), load_all(tmp_path / "plain"), load_all(tmp_path / "noisy")
    H, F = 32, 64
    noisy_tensors = 0
    for name, value in noisy.items():
        noise = value - plain[name]
        if not noise.any():
            continue
        noisy_tensors += 1
        assert noise.ndim == 2, name
        units = H if noise.shape[1] == 2 * H else F  # the copied axis the noise runs along: the columns
        assert noise.shape[1] == 2 * units, name
        sums = torch.zeros(noise.shape[0], units).index_add_(1, torch.arange(2 * units) % units, noise)
        assert sums.abs().max() <= 1e-6 * max(1.0, float(value.abs().max())), name
        ratio = float(noise.std() / src[name].std())
        assert 0.02 < ratio < 0.1, (name, ratio)
    assert noisy_tensors >= 5  # the readers: q, k, v, gate, up (and down, reading the FFN units)


@pytest.mark.parametrize("operator", ["direct", "zero", "random"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_verify_catches_a_wrong_width_builder(operator, dtype, tmp_path, monkeypatch):
    """--verify checks the written tensors against the source, not against a second run of the same builder: a
    builder bug (here: every widened block off by 1%) fails it, in bfloat16 too (each value's own rounding is
    allowed, not a share of the tensor's largest)."""
    import hf_stack.checkpoints.tensors as tensors

    build_checkpoint(tmp_path / "s", "llama", num_layers=2)
    stacked = StackedConfig(operator=operator, width_factor=2, dtype=dtype)
    grow(tmp_path / "s", tmp_path / "ok", stacked, verify=True)
    real = tensors._widen_block
    for planted in ("", "q_proj", "up_proj", "gate_proj"):  # every widened block, then the noisy readers alone
        monkeypatch.setattr(
            tensors, "_widen_block",
            lambda entry, *a, p=planted, **k: real(entry, *a, **k) * (1.01 if p in entry.target else 1.0),
        )  # fmt: skip
        with pytest.raises(HfStackError, match="verification failed"):
            grow(tmp_path / "s", tmp_path / "bad", stacked, verify=True)
        assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("operator", ["direct", "zero"])
def test_verify_passes_sixteen_bit_width_growth(operator, tmp_path):
    """Each noisy copy is rounded to bfloat16 on its own: verify allows that rounding and no more."""
    build_checkpoint(tmp_path / "s", "llama", num_layers=2)
    grow(
        tmp_path / "s", tmp_path / "g", StackedConfig(operator=operator, width_factor=2, dtype="bfloat16"), verify=True
    )
    assert json.loads((tmp_path / "g" / "config.json").read_text())["dtype"] == "bfloat16"


def _noise_written_out(name, r0, rows, axis, std, plan):
    """The zero-sum noise as first written (a dense scatter per block): the reference the sliced and gathered
    builder must reproduce bit for bit."""
    from hf_stack.checkpoints.tensors import _generator

    first: dict[int, int] = {}
    later = [k for k, j in enumerate(axis.index) if j >= 0 and first.setdefault(j, k) != k]
    noise = torch.zeros(rows, axis.target_size)
    if later:
        eps = torch.randn(rows, len(later), generator=_generator(plan, "noise", name, r0)) * std
        sums = torch.zeros(rows, axis.source_size).index_add_(1, torch.tensor([axis.index[k] for k in later]), eps)
        noise[:, later] = eps
        noise[:, list(first.values())] = -sums[:, list(first)]
    return noise


def _widen_block_written_out(entry, src, plan, r0, r1, std):
    """The widened rows r0:r1 as first written (per-block index lists, dense noise): the reference for the
    sliced, gathered, threaded builder."""
    from hf_stack.checkpoints.tensors import _fill

    work = torch.promote_types(src.dtype, torch.float32)
    names = list(entry.axes) + [None] * (2 - len(entry.axes))
    row_axis, col_axis = (plan.width[n] if n else None for n in names[:2])
    shape = (r1 - r0, *entry.shape[1:])
    new_rows = new_cols = None
    if row_axis is not None:
        index = torch.tensor(row_axis.index[r0:r1])
        block = src.index_select(0, index.clamp(min=0)).to(work)
        scale = torch.tensor(row_axis.scale[r0:r1], dtype=work).view(-1, *([1] * (block.ndim - 1)))
        block = block * scale + row_axis.offset * (scale - 1)  # a norm's offset: (offset + w) * scale - offset
        new_rows = index < 0
    else:
        block = src[r0:r1].to(work)
    if col_axis is not None:
        index = torch.tensor(col_axis.index)
        block = block.index_select(1, index.clamp(min=0)) * torch.tensor(col_axis.scale, dtype=work)
        if col_axis.noise:
            block += _noise_written_out(entry.target, r0, r1 - r0, col_axis, col_axis.noise * std, plan)
        new_cols = index < 0
    if new_rows is not None and new_rows.any():
        block[new_rows] = _fill(entry.target, r0, (int(new_rows.sum()), *shape[1:]), row_axis, plan).to(work)
    if new_cols is not None and new_cols.any():
        block[:, new_cols] = _fill("cols:" + entry.target, r0, (shape[0], int(new_cols.sum())), col_axis, plan).to(
            work
        )
    return block


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("operator, factor", [("direct", 3), ("zero", 2)])
def test_threaded_width_blocks_are_the_formula_written_out(operator, factor, dtype, tmp_path, monkeypatch):
    """Width growth in many small blocks (so tensors are built ahead on worker threads, with reused buffers and
    the std arriving while the first blocks are drawn): every tensor must be, bit for bit, the per-block formula
    as first written, for unit and non-unit scales, up to two later copies, new units and three dtypes."""
    import math

    from hf_stack.checkpoints import tensors
    from hf_stack.checkpoints.source import resolve_source
    from hf_stack.plans.plan import build_plan

    build_checkpoint(tmp_path / "s", num_layers=1, dtype=dtype)
    source = resolve_source(str(tmp_path / "s"))
    stacked = StackedConfig(operator=operator, width_factor=factor, width_noise=0.01)
    plan = build_plan(source.config, source.tensor_infos, stacked)
    read = tensors.TensorReader(source)
    monkeypatch.setattr(tensors, "BLOCK_ELEMENTS", 500)
    n_blocks = 0
    for entry in plan.tensors:
        got = tensors.materialize(entry, read, plan)
        src = read(entry.source)
        if not entry.widened:
            assert torch.equal(got, src)
            continue
        shape = entry.shape
        step = max(1, 500 // max(1, math.prod(shape[1:]))) if len(shape) > 1 else shape[0]
        std = float(src.std()) if any(n and plan.width[n].noise for n in entry.axes) else 0.0
        blocks = [_widen_block_written_out(entry, src, plan, r0, min(shape[0], r0 + step), std)
                  for r0 in range(0, shape[0], step)]  # fmt: skip
        n_blocks += len(blocks)
        assert torch.equal(got, torch.cat(blocks).to(got.dtype)), entry.target
    assert n_blocks > 10 * len(plan.tensors)


@pytest.mark.parametrize("layout", ["appended x2", "appended x3", "interleaved x2", "shuffled x3 with new units"])
def test_width_noise_by_slices_and_gathers_is_the_dense_formula(layout):
    """The block builder adds the noise with slices (a few contiguous runs) or gathers (many), and sums over up to
    two later copies by rank: each must give the bytes of the plain dense formula, for the same seed."""
    from types import SimpleNamespace

    from hf_stack.checkpoints.tensors import _add_zero_sum_noise, _axis_tensors
    from hf_stack.plans.width import Axis

    g = torch.Generator().manual_seed(0)
    source = 96
    if layout == "appended x2":
        index = list(range(source)) * 2
    elif layout == "appended x3":
        index = list(range(source)) * 3
    elif layout == "interleaved x2":  # each unit next to its copy: 96 runs of one
        index = [j for j in range(source) for _ in range(2)]
    else:
        index = [*range(source), *torch.randint(0, source, (200,), generator=g).tolist(), -1, -1]
        index = [index[k] for k in torch.randperm(len(index), generator=g).tolist()]
    axis = Axis("hidden_in", source, tuple(index), (1.0,) * len(index), noise=0.01)
    plan = SimpleNamespace(seed=7)
    block = torch.randn(5, len(index), generator=g)
    expected = block + _noise_written_out("w", 10, 5, axis, 0.01 * 0.3, plan)
    std = Future()
    std.set_result(0.3)
    got = block.clone()
    _add_zero_sum_noise(got, "w", 10, axis, std, plan)
    assert torch.equal(got, expected)
    maps = _axis_tensors(axis)
    # both ways of applying a map are exercised: slices for appended copies, gathers for scattered ones
    assert (maps.later.runs is None) == (layout == "interleaved x2")
    assert (maps.first.runs is None) == (layout in ("interleaved x2", "shuffled x3 with new units"))


MOE = {
    # (config class fields) -> each family's names for its experts' residual writes
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),  # block_sparse_moe.experts.N.w2
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),  # mlp.experts.N.down_proj
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),  # fused mlp.experts.down_proj and its bias
    # mlp.experts.N.down_proj, and a config saying every layer is sparse (decoder_sparse_step 1)
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8),
    # and a shared expert beside the routed ones (mlp.shared_expert.down_proj)
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(MOE))
def test_zero_growth_of_mixture_of_experts_keeps_the_function(family, tmp_path):
    """`zero` claims the function is kept: with experts, every expert's down projection (and bias) writes into the
    residual stream too, so each must be zeroed in the repeated layers, or the logits move (by 0.01-0.03 here)."""
    from transformers import CONFIG_MAPPING

    from tests.conftest import build_tokenizer

    tok = build_tokenizer(tmp_path / "s")
    config = CONFIG_MAPPING[family](vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=1, eos_token_id=2, **MOE[family])  # fmt: skip
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in source.parameters():  # biases and norms away from 0 and 1, so a missed one shows
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    source.save_pretrained(tmp_path / "s")
    plan = grow(tmp_path / "s", tmp_path / "g", StackedConfig(operator="zero", factor=2))
    assert plan.function_preserving
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()
    assert grown.config.num_hidden_layers == 4
    ids = torch.arange(1, 17)[None] % len(tok)
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, source.eval()(ids).logits, rtol=0, atol=1e-5)


def test_smollm3_grows_with_its_layers_without_rope(tmp_path):
    """SmolLM3 (every 4th layer without rotary embeddings, as `no_rope_layers` and `no_rope_layer_interval` say)
    stacks x2 with its pattern carried: zero growth keeps the logits, the grown layers keep their source's RoPE."""
    from transformers import CONFIG_MAPPING

    from tests.conftest import build_tokenizer

    tok = build_tokenizer(tmp_path / "s")
    config = CONFIG_MAPPING["smollm3"](vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    assert config.no_rope_layers == [1, 1, 1, 0]
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(config)
    source.save_pretrained(tmp_path / "s")
    plan = grow(tmp_path / "s", tmp_path / "g", StackedConfig(operator="zero", factor=2))
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "g").eval()
    assert plan.function_preserving and grown.config.no_rope_layers == [1, 1, 1, 0] * 2
    assert grown.config.no_rope_layer_interval == 4
    ids = torch.arange(1, 17)[None] % len(tok)
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, source.eval()(ids).logits, rtol=0, atol=1e-5)
