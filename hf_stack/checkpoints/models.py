"""Stage 2, models: transformers' own class for a config dict, filled with grown tensors (no modeling code), and
whether a model is sharded (FSDP2), which training and evaluation both ask."""

from __future__ import annotations

from ..errors import HfStackError, error_reason
from ..plans.plan import layout_of


def _config(config_dict: dict):
    from transformers import CONFIG_MAPPING

    model_type = config_dict.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise HfStackError(
            f"transformers does not know model_type {model_type!r}; upgrade transformers or check config.json"
        )
    cls = CONFIG_MAPPING[model_type]
    # config.json as transformers writes it: what JSON cannot hold (Falcon-H1's infinite `time_step_limit`) is
    # encoded, and decoded by transformers' own reader, which `from_dict` does not call
    return cls.from_dict(cls._decode_special_floats(dict(config_dict)))


def build_model(config_dict: dict, dtype, init: bool = True):
    """The transformers class of `config_dict["model_type"]`, built from the config (no remote code)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = _config(config_dict)
    config.dtype = dtype
    if init:
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)


def instantiate(plan, state: dict):
    """Build the target architecture's own transformers class from the plan's config and the grown tensors.

    Loaded the way `from_pretrained` loads a checkpoint, so the tensors may be in the checkpoint's layout (experts
    one by one, as files store them) or in the model's own (transformers 5 fuses experts into 3-D tensors when
    it loads): transformers' conversions map the one to the other."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    config = _config(plan.target_config)
    dtype = next(iter(state.values())).dtype
    config.dtype = dtype
    cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # the class itself: the Auto class would look for remote code
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype, output_loading_info=True)
    except RuntimeError as e:  # a tensor of another shape than the config's model holds
        raise HfStackError(f"the grown tensors do not fit {cls.__name__}: {error_reason(e)}") from None
    tied = set(layout_of(plan.target_config).heads) if config.tie_word_embeddings else set()
    missing = set(info["missing_keys"]) - tied
    if info["unexpected_keys"] or missing:
        raise HfStackError(
            f"the grown tensors do not fit {cls.__name__}: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(info['unexpected_keys'])[:3]}"
        )
    return model.eval()


def is_sharded(model) -> bool:
    """Whether `model` is sharded by FSDP2 (`fully_shard` applied to the model itself)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def reshard(model) -> None:
    """Every FSDP2 group of `model` back to its shards: a forward outside training (scoring) leaves the groups FSDP
    keeps gathered after forward (the root, the head) unsharded until the next backward."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def every_parameter_sharded(model) -> bool:
    """Whether every parameter of `model` is a `DTensor` shard, once resharded (`reshard`)."""
    from torch.distributed.tensor import DTensor

    reshard(model)
    return all(isinstance(p, DTensor) for p in model.parameters())
