"""Every family in tests/families.py grown by every operator x direction it supports, from a tiny model built with
transformers' own config class: the layer map checked tensor by tensor, every function-preserving claim by logits
(streamed to disk, grown in memory from a folder, and grown live as in a training run), every refusal by its
message."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_stack import HfStackError, StackedConfig, StackedModelForCausalLM, grow, grow_model
from tests.families import FAMILIES, WIDTH_FAMILIES, build_family

LAYER_MAPS = {"stack": [0, 1, 2, 3, 0, 1, 2, 3], "interpolate": [0, 0, 1, 1, 2, 2, 3, 3]}


def _stored(folder: Path) -> dict:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f.model_type)
def family_source(request, tmp_path_factory):
    """The family's tiny model, its 1-D weights (norms, biases, sinks) moved off 0 and 1 so a missed one shows."""
    family = request.param
    folder = tmp_path_factory.mktemp(family.model_type) / "small"
    model = build_family(family.model_type, folder)
    return family, folder, model


def _logits(model, vocab: int):
    ids = (torch.arange(2 * 16).view(2, 16) * 7 + 3) % vocab
    with torch.no_grad():
        return model.eval()(ids).logits


def test_depth_growth_copies_the_mapped_layers(family_source, tmp_path):
    """`stack` (verified) writes target layer i as source layer layer_map[i], every tensor bit for bit, the rest
    unchanged; `random` writes a checkpoint of the grown depth; both load with AutoModelForCausalLM."""
    family, folder, _ = family_source
    plan = grow(folder, tmp_path / "stack", StackedConfig(factor=2, order=family.order), verify=True, progress=False)
    assert list(plan.layer_map) == LAYER_MAPS[family.order] and not plan.function_preserving
    source, grown = _stored(folder), _stored(tmp_path / "stack")
    expected = {}
    for name, tensor in source.items():
        if name.startswith(family.layers):
            j, rest = name[len(family.layers) :].split(".", 1)
            for i, mapped in enumerate(plan.layer_map):
                if mapped == int(j):
                    expected[f"{family.layers}{i}.{rest}"] = tensor
        else:
            expected[name] = tensor
    assert sorted(grown) == sorted(expected)
    for name, tensor in grown.items():
        assert torch.equal(tensor, expected[name]), name
    for op in ("stack", "random"):
        if op == "random":
            settings = StackedConfig(operator="random", factor=2, order=family.order)
            random_plan = grow(folder, tmp_path / op, settings, progress=False)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / op)
        assert model.config.num_hidden_layers == 8
    # `random` initialises like the architecture's own init: a new layer's 1-D weights (norms, biases, Mamba's
    # vectors) are those of a model transformers builds from the grown config (Gemma's (1 + w) norms start at 0, not
    # 1; GPT-2's ln_1 at 1); the random ones (attention sinks) are drawn, not compared
    fresh = AutoModelForCausalLM.from_config(model.config).state_dict()
    again = AutoModelForCausalLM.from_config(model.config).state_dict()
    grown = _stored(tmp_path / "random")
    for entry in random_plan.tensors:
        want = fresh.get(entry.target)
        if (
            entry.op == "random"
            and len(entry.shape) == 1
            and want is not None
            and torch.equal(want, again[entry.target])
        ):
            torch.testing.assert_close(grown[entry.target], want.to(grown[entry.target].dtype), msg=entry.target)


def test_zero_growth_keeps_the_function_on_disk_in_memory_and_live(family_source, tmp_path):
    """`zero` claims the grown model computes the source's logits: checked on the streamed checkpoint (and by
    `--verify`), on `from_small_pretrained`'s model and on `grow_model` of the live model (the in-run path, where
    transformers 5 holds experts fused)."""
    family, folder, source = family_source
    settings = StackedConfig(operator="zero", factor=2, order=family.order)
    want = _logits(source, source.config.vocab_size)
    plan = grow(folder, tmp_path / "zero", settings, verify=True, progress=False)
    assert plan.function_preserving
    on_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "zero")
    in_memory = StackedModelForCausalLM.from_small_pretrained(folder, settings)
    live, live_plan, _ = grow_model(source, settings)
    assert live_plan.function_preserving
    for model in (on_disk, in_memory, live):
        assert model.config.num_hidden_layers == 8
        torch.testing.assert_close(_logits(model, source.config.vocab_size), want, rtol=0, atol=1e-5)


def test_width_growth_keeps_the_function_or_is_refused(family_source, tmp_path):
    """Streamed (`--verify` checks the kept function by logits) and grown live as in a training run (where
    transformers 5 holds experts fused), or refused with the reason."""
    family, folder, source = family_source
    for operator in ("direct", "zero"):
        settings = StackedConfig(operator=operator, width_factor=2)
        if operator in WIDTH_FAMILIES.get(family.model_type, ()):  # --verify checks the claimed function by logits
            assert grow(folder, tmp_path / operator, settings, verify=True, progress=False).function_preserving
            live, plan, _ = grow_model(source, settings)
            assert plan.function_preserving and live.config.hidden_size == 2 * source.config.hidden_size
            want = _logits(source, source.config.vocab_size)
            # --verify's tolerance: zero's epsilon change reaches Qwen3's per-head q/k norms (up to 1.2e-5)
            torch.testing.assert_close(_logits(live, source.config.vocab_size), want, rtol=0, atol=5e-5)
        else:
            with pytest.raises(HfStackError, match="width growth") as refused:
                grow(folder, tmp_path / operator, settings, progress=False)
            assert family.model_type in str(refused.value)
            if family.model_type in WIDTH_FAMILIES:  # a known family, an operator that cannot keep its function
                assert "keeping its function" in str(refused.value)
            assert not (tmp_path / operator).exists()


@pytest.mark.parametrize("model_type", ["gemma2", "phi3", "mixtral", "olmo2"])
def test_a_non_whole_width_factor_keeps_the_function_or_is_refused(model_type, tmp_path):
    """Width x1.5 copies some units and not others, so the copies take scales t != 1: Gemma 2's scaled embedding,
    (1 + w) norms and post-norms, Phi-3's fused rows and Mixtral's experts must still keep the logits (`--verify`);
    OLMo 2's whole-projection q/k norms cannot (heads copied unequally often) and are refused with that reason."""
    folder = tmp_path / "small"
    build_family(model_type, folder)
    settings = StackedConfig(operator="direct", width_factor=1.5)
    if model_type == "olmo2":
        with pytest.raises(HfStackError, match="copied unequally often"):
            grow(folder, tmp_path / "wide", settings, progress=False)
        return
    plan = grow(folder, tmp_path / "wide", settings, verify=True, progress=False)
    assert plan.function_preserving and len(set(plan.width["hidden_out"].scale)) == 2  # some units copied, some not
