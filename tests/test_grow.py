"""End-to-end growth on real tiny checkpoints: both paths, every tested architecture, reload with transformers."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_stack import StackedConfig, StackedModelForCausalLM, grow
from hf_stack.plans.plan import layer_map_to_slices
from tests.conftest import build_checkpoint


def load_all(folder):
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    return tensors


def test_in_memory_growth_returns_transformers_own_class(small, arch, tmp_path, token_ids):
    source = AutoModelForCausalLM.from_pretrained(small)
    model = StackedModelForCausalLM.from_small_pretrained(small, StackedConfig(factor=4))
    assert type(model) is type(source)  # LlamaForCausalLM, Qwen2ForCausalLM, ...: never a wrapper
    assert model.config.num_hidden_layers == 12
    src_state, state = source.state_dict(), model.state_dict()
    for i in range(12):
        for key in src_state:
            if key.startswith("model.layers.0."):
                suffix = key[len("model.layers.0.") :]
                assert torch.equal(state[f"model.layers.{i}.{suffix}"], src_state[f"model.layers.{i % 3}.{suffix}"])
        # every decoder layer knows its own index, so the KV cache has one slot per layer
        assert model.model.layers[i].self_attn.layer_idx == i
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(state[key], src_state[key])
    if source.config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    out = tmp_path / "grown"
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config
    source_config = json.loads((small / "config.json").read_text())
    assert set(config) <= set(source_config) | {"dtype"}  # no custom keys
    assert (out / "growth_config.json").is_file() and (out / "tokenizer.json").is_file()
    if arch == "qwen2":  # sliding layers above max_window_layers=2 repeat with the stack
        assert config["layer_types"] == ["full_attention", "full_attention", "sliding_attention"] * 4

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(source)
    with torch.no_grad():
        assert torch.equal(reloaded(token_ids).logits, model(token_ids).logits)
        # generation with a KV cache runs through all 12 layers
        gen = reloaded.generate(token_ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        no_cache = reloaded.generate(token_ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(gen, no_cache)
    AutoTokenizer.from_pretrained(out)


def test_streaming_and_in_memory_give_identical_tensors(small, arch, tmp_path):
    stacked = StackedConfig(num_layers=7, order="interpolate")
    plan = grow(small, tmp_path / "streamed", stacked, verify=True)
    model = StackedModelForCausalLM.from_small_pretrained(small, stacked)
    model.save_pretrained(tmp_path / "memory")
    streamed, memory = load_all(tmp_path / "streamed"), load_all(tmp_path / "memory")
    assert streamed.keys() == memory.keys() == {t.target for t in plan.tensors}
    for k in streamed:
        assert streamed[k].dtype == memory[k].dtype and torch.equal(streamed[k], memory[k]), k
    tied = model.config.tie_word_embeddings
    assert ("lm_head.weight" in streamed) == (not tied)
    a = json.loads((tmp_path / "streamed" / "growth_config.json").read_text())
    b = json.loads((tmp_path / "memory" / "growth_config.json").read_text())
    assert a == b
    assert a["layer_map"] == list(plan.layer_map) and a["layer_slices"] == layer_map_to_slices(plan.layer_map)
    # the streamed config loads as a standard config with the grown depth
    config = AutoConfig.from_pretrained(tmp_path / "streamed")
    assert config.num_hidden_layers == 7 and not hasattr(config, "auto_map")


def test_growth_config_reads_back(llama_small, tmp_path):
    grow(llama_small, tmp_path / "g", StackedConfig(layer_map="0-2,0-2,1"))
    back = StackedConfig.from_pretrained(tmp_path / "g")
    assert back == StackedConfig(layer_map="0-2,0-2,1")
    prov = back.provenance
    assert prov["source"]["name_or_path"] == str(llama_small)
    assert prov["source"]["num_layers"] == 3 and prov["target_num_layers"] == 7
    assert prov["operator"] == "stack" and prov["hf_stack_version"]


def test_sharded_source_and_output(tmp_path):
    src = tmp_path / "sharded"
    build_checkpoint(src, "llama", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    grow(src, out, StackedConfig(factor=2), max_shard_size="30KB", verify=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    tensors = load_all(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    AutoModelForCausalLM.from_pretrained(out)


def test_dtype_conversion(llama_small, tmp_path):
    grow(llama_small, tmp_path / "bf16", StackedConfig(factor=2, dtype="bfloat16"), verify=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert model.dtype == torch.bfloat16
    src = AutoModelForCausalLM.from_pretrained(llama_small)
    assert torch.equal(model.model.layers[4].mlp.up_proj.weight, src.model.layers[1].mlp.up_proj.weight.bfloat16())
    mem = StackedModelForCausalLM.from_small_pretrained(llama_small, StackedConfig(factor=2), dtype="bfloat16")
    assert mem.dtype == torch.bfloat16


def test_source_dtype_is_kept(tmp_path):
    src = tmp_path / "bf16src"
    build_checkpoint(src, "qwen3", dtype="bfloat16")
    grow(src, tmp_path / "out", StackedConfig(factor=2))
    assert {t.dtype for t in load_all(tmp_path / "out").values()} == {torch.bfloat16}


@pytest.mark.parametrize("order", ["stack", "interpolate", "middle"])
def test_zero_operator_preserves_the_function(small, arch, order, tmp_path, token_ids):
    source = AutoModelForCausalLM.from_pretrained(small)
    grow(small, tmp_path / "z", StackedConfig(factor=2, operator="zero", order=order), verify=True)
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "z")
    assert grown.config.num_hidden_layers == 6
    with torch.no_grad():
        torch.testing.assert_close(grown(token_ids).logits, source(token_ids).logits, rtol=1e-5, atol=1e-5)


def test_stack_changes_the_function(llama_small, tmp_path, token_ids):
    # G_stack is not function preserving (the paper's point); guard against a plan that silently zeroes layers.
    source = AutoModelForCausalLM.from_pretrained(llama_small)
    grown = StackedModelForCausalLM.from_small_pretrained(llama_small, StackedConfig(factor=2))
    with torch.no_grad():
        assert not torch.allclose(grown(token_ids).logits, source(token_ids).logits, atol=1e-3)


def test_pickle_source_needs_opt_in(tmp_path):
    src = tmp_path / "pickled"
    model = build_checkpoint(src, "llama")
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    from hf_stack import HfStackError

    with pytest.raises(HfStackError, match="--allow-pickle"):
        grow(src, tmp_path / "out", StackedConfig(factor=2))
    assert not (tmp_path / "out").exists()
    grow(src, tmp_path / "out", StackedConfig(factor=2), allow_pickle=True, verify=True)
    assert not list((tmp_path / "out").glob("*.bin"))  # the output is always safetensors


def test_hub_id_source_from_cache_offline(llama_small, tmp_path):
    """A Hub id resolves through huggingface_hub (HF_HUB_OFFLINE=1, cache_dir, revision) to a cached snapshot."""
    import shutil

    cache = tmp_path / "cache"
    sha = "a" * 40
    snap = cache / "models--org--small" / "snapshots" / sha
    shutil.copytree(llama_small, snap)
    (cache / "models--org--small" / "refs").mkdir()
    (cache / "models--org--small" / "refs" / "main").write_text(sha)
    grow("org/small", tmp_path / "out", StackedConfig(factor=2), cache_dir=cache, revision="main", verify=True)
    prov = StackedConfig.from_pretrained(tmp_path / "out").provenance["source"]
    assert prov == {**prov, "name_or_path": "org/small", "revision": "main", "commit": sha}
    model = StackedModelForCausalLM.from_small_pretrained("org/small", StackedConfig(factor=2), cache_dir=cache)
    assert model.config.num_hidden_layers == 6
    from hf_stack import HfStackError

    with pytest.raises(HfStackError, match="cannot download 'org/other'"):
        grow("org/other", tmp_path / "out2", cache_dir=cache)
