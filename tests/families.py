"""The model families the tests grow, built from transformers' own config classes with their structural features,
and README's "Supported architectures" table, generated from this list (tests/test_readme.py checks it)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """One family of the matrix.

    Attributes:
        name: as README names it.
        model_type: transformers' `model_type` (its config class).
        config: the config fields that give the tiny model its family's structure (beside `common_config`'s).
        layers: the checkpoint prefix of layer i's tensors (written here, not read from hf_stack's layouts).
        order: the layer order depth growth uses (DeepSeek-V3's dense first layers need `interpolate`).
        features: what the tiny model exercises, for the table.
    """

    name: str
    model_type: str
    config: dict = field(default_factory=dict)
    layers: str = "model.layers."
    order: str = "stack"
    features: str = ""


# model type -> the width operators that keep its function (the others are refused, with the reason)
WIDTH_FAMILIES = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "gemma", "gemma2", "gemma3_text"),
                    ("direct", "zero")),
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe"), ("direct", "zero")),
    **dict.fromkeys(("olmo2", "olmo3", "phi3", "olmoe"), ("direct",)),
}  # fmt: skip
EXPERTS = dict(num_experts_per_tok=2)
# DeepSeek's latent attention (every head its own keys) and a dense first layer before the experts
DEEPSEEK = dict(n_routed_experts=4, moe_intermediate_size=32, first_k_dense_replace=1, num_key_value_heads=4,
                q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1,
                topk_group=1, **EXPERTS)  # fmt: skip
FAMILIES = (
    Family(
        "Llama 3.2",
        "llama",
        dict(
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        features="GQA, llama3 RoPE, tied embeddings",
    ),
    Family("Mistral", "mistral", dict(num_key_value_heads=4, sliding_window=16), features="sliding window"),
    Family("Qwen2 / 2.5", "qwen2", dict(use_sliding_window=False, max_window_layers=2), features="attention biases"),
    Family("Qwen3", "qwen3", dict(head_dim=8), features="q/k norms"),
    Family("Gemma", "gemma", dict(head_dim=8), features="(1 + w) norms, scaled embeddings"),
    Family(
        "Gemma 2",
        "gemma2",
        dict(head_dim=8, sliding_window=8, final_logit_softcapping=30.0),
        features="sandwich norms, alternating layer_types, soft-capping",
    ),
    Family(
        "Gemma 3",
        "gemma3_text",
        dict(head_dim=8, sliding_window=8, sliding_window_pattern=2),
        features="sliding_window_pattern, q/k norms",
    ),
    Family("SmolLM3", "smollm3", features="NoPE layers (no_rope_layer_interval)"),
    Family("OLMo 2", "olmo2", features="q/k norms over the whole projection, post-norms"),
    Family("OLMo 3", "olmo3", dict(sliding_window=8), features="sliding layer_types"),
    Family(
        "Granite",
        "granite",
        dict(embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0),
        features="embedding, residual and logit multipliers",
    ),
    Family("Phi-3", "phi3", features="fused qkv_proj and gate_up_proj"),
    Family("Cohere", "cohere", features="parallel attention and MLP, LayerNorm"),
    Family("Cohere 2", "cohere2", dict(sliding_window=8), features="sliding layer_types"),
    Family("GLM-4", "glm4", dict(head_dim=8), features="post-attention and post-MLP norms"),
    Family("Mixtral", "mixtral", dict(num_local_experts=4, **EXPERTS), features="experts (w1/w2/w3)"),
    Family(
        "Qwen2-MoE",
        "qwen2_moe",
        dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32, **EXPERTS),
        features="experts and a shared expert",
    ),
    Family(
        "Qwen3-MoE",
        "qwen3_moe",
        dict(num_experts=4, moe_intermediate_size=32, head_dim=8, **EXPERTS),
        features="experts, decoder_sparse_step",
    ),
    Family("OLMoE", "olmoe", dict(num_experts=4, **EXPERTS), features="experts, q/k norms"),
    Family(
        "gpt-oss",
        "gpt_oss",
        dict(num_local_experts=4, head_dim=8, sliding_window=8, **EXPERTS),
        features="fused experts with biases, attention sinks",
    ),
    Family(
        "DeepSeek-V2",
        "deepseek_v2",
        # moe_layer_freq as published: every layer past the dense ones (transformers keeps the field)
        dict(**DEEPSEEK, moe_layer_freq=1),
        order="interpolate",
        features="latent attention, dense first layer, moe_layer_freq",
    ),
    Family(
        "DeepSeek-V3",
        "deepseek_v3",
        DEEPSEEK,
        order="interpolate",
        features="latent attention, dense first layer, experts",
    ),
    Family(
        "Falcon-H1",
        "falcon_h1",
        dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16, head_dim=8),
        features="attention and Mamba-2 mixer side by side",
    ),
    Family(
        "GPT-NeoX (Pythia)",
        "gpt_neox",
        dict(use_parallel_residual=True),
        layers="gpt_neox.layers.",
        features="gpt_neox.layers, embed_in / embed_out",
    ),
    Family(
        "GPT-2",
        "gpt2",
        dict(n_embd=32, n_layer=4, n_head=4, n_positions=64),
        layers="transformer.h.",
        features="transformer.h, n_layer, Conv1D, tied",
    ),
)


def common_config(vocab_size: int, num_layers: int = 4) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def support_table() -> str:
    """README's table of what tests/test_families.py grows, per family."""
    rows = [
        "| family | `model_type` | structure the test model has | depth: `stack`, `random` | depth: `zero` "
        "(logits kept) | width: `direct`, `zero` |",
        "|---|---|---|---|---|---|",
    ]
    for f in FAMILIES:
        order = "" if f.order == "stack" else f" (`--order {f.order}`)"
        kept = WIDTH_FAMILIES.get(f.model_type, ())
        width = {2: "yes (logits kept)", 1: "`direct` (logits kept); `zero` refused, with the reason"}.get(
            len(kept), "refused, with the reason"
        )
        rows.append(f"| {f.name} | `{f.model_type}` | {f.features} | yes{order} | yes{order} | {width} |")
    return "\n".join(rows)


def build_family(model_type: str, folder):
    """The family's tiny model (`common_config` and its structural features) with a tokenizer, its 1-D weights
    moved off their init, saved to `folder`; returned in eval mode."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from tests.conftest import build_tokenizer, perturb_vectors

    family = next(f for f in FAMILIES if f.model_type == model_type)
    tok = build_tokenizer(folder)
    config = CONFIG_MAPPING[model_type](**{**common_config(len(tok)), **family.config})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    perturb_vectors(model)
    model.save_pretrained(folder)
    return model
