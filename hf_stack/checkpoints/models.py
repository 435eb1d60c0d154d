"""Stage 2, models: transformers' own class for a config dict, filled with grown tensors (no modeling code)."""

from __future__ import annotations

from ..errors import HfStackError


def build_model(config_dict: dict, dtype, init: bool = True):
    """The transformers class of `config_dict["model_type"]`, built from the config (no remote code)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise HfStackError(
            f"transformers does not know model_type {model_type!r}; upgrade transformers or check config.json"
        )
    config = CONFIG_MAPPING[model_type].from_dict(dict(config_dict))
    config.dtype = dtype
    if init:
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)


def instantiate(plan, state: dict):
    """Build the target architecture's own transformers class from the plan's config and the grown tensors."""
    # No random init: every parameter is overwritten by the grown tensors right after.
    model = build_model(plan.target_config, next(iter(state.values())).dtype, init=False)
    config = model.config
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise HfStackError(
            f"the grown tensors do not fit {type(model).__name__}: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    model.tie_weights()
    return model.eval()
