"""Stage 2, in memory: `StackedModelForCausalLM.from_small_pretrained` and `grow_model` return transformers' own
model class, grown by the same plan and tensor builders as the streaming writer."""

from __future__ import annotations

import os
import types
from pathlib import Path

from ..plans.config import StackedConfig
from ..plans.plan import build_plan
from .folders import copy_aux_files
from .models import instantiate
from .provenance import growth_record, source_info, write_growth_record
from .source import planned_source, source_tokenizer


class StackedModelForCausalLM:
    """Factory for grown models. It is never instantiated: [`from_small_pretrained`] returns the source
    architecture's own class (`LlamaForCausalLM`, `Qwen2ForCausalLM`, ...), so the result saves as a plain
    transformers checkpoint that `AutoModelForCausalLM.from_pretrained` loads without remote code.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("use StackedModelForCausalLM.from_small_pretrained(...), which returns a transformers model")

    @classmethod
    def from_small_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        stacked_config: StackedConfig | None = None,
        *,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        dtype: str | None = None,
    ):
        """Grow a small pretrained checkpoint in memory.

        Args:
            pretrained_model_name_or_path: the small model, a local folder or a Hub repo id.
            stacked_config: growth settings; defaults to `StackedConfig(factor=4)` (G_stack, g = 4).
            revision, token, cache_dir: passed to `huggingface_hub` for Hub ids.
            allow_pickle: accept `.bin` weights (loaded with `weights_only=True`).
            allow_nonfinite: grow even if source weights hold NaN or Inf (refused by default).
            dtype: overrides `stacked_config.dtype` (`"float32"`, `"bfloat16"`, `"float16"`).

        Returns:
            A transformers `PreTrainedModel` of the source's class with the grown number of layers, in eval mode.
            Its `save_pretrained` also writes `growth_config.json` (provenance) and the source's tokenizer files.

        Example:

        ```python
        >>> from hf_stack import StackedConfig, StackedModelForCausalLM
        >>> model = StackedModelForCausalLM.from_small_pretrained("org/small", StackedConfig(factor=4))  # doctest: +SKIP
        >>> model.save_pretrained("grown")  # doctest: +SKIP
        ```

        Paper: https://arxiv.org/abs/2405.15319
        """
        from transformers import GenerationConfig

        from .tensors import TensorReader, grown_tensors

        stacked = stacked_config or StackedConfig()
        if dtype is not None:
            stacked = StackedConfig(**{**stacked.to_dict(), "dtype": dtype})
        source, plan = planned_source(
            pretrained_model_name_or_path, stacked, revision=revision, token=token, cache_dir=cache_dir,
            allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
        )  # fmt: skip
        tensors, learned = grown_tensors(plan, TensorReader(source), stacked, source_tokenizer(source))
        model = instantiate(plan, tensors)
        if (source.folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(source.folder)
        record = growth_record(plan, stacked, source_info(source, plan.source_num_layers), learned)
        _attach_provenance(model, record, source.folder)
        return model


def grow_model(model, stacked_config: StackedConfig, tokenizer=None):
    """Grow a live transformers model (e.g. in the middle of a training run).

    Args:
        model: a causal LM `PreTrainedModel` (unwrapped: no DDP or PEFT wrapper).
        stacked_config: growth settings.
        tokenizer: reads `stacked_config.learn_data` for the `learn` operator.

    Returns:
        `(grown_model, plan, learned)`: the grown model on the CPU in train mode, the [`GrowthPlan`] applied, and
        the `learn` operator's training record (None for other operators).
    """
    from .tensors import grown_tensors

    state = live_state(model, stacked_config)
    plan = plan_for_model(model, stacked_config, state)
    tensors, learned = grown_tensors(plan, lambda k: state[k].detach().cpu(), stacked_config, tokenizer)
    grown = instantiate(plan, tensors)
    grown.generation_config = model.generation_config
    return grown.train(model.training), plan, learned


def live_state(model, stacked_config: StackedConfig) -> dict:
    """A live model's tensors by the names the plan reads: as transformers 5 holds them (experts fused into 3-D
    tensors) for depth growth, which copies them whole; as checkpoints store them (one expert at a time) for width
    growth, which splits each expert (transformers fuses them again as the grown model loads)."""
    state = model.state_dict()
    if "width" in stacked_config.directions:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    return state


def plan_for_model(model, stacked_config: StackedConfig, state: dict | None = None):
    """The [`GrowthPlan`] that `stacked_config` gives for a live model (its `state`, by default its state dict)."""
    from .tensors import safe_dtype_name

    config = model.config.to_dict()
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    state = model.state_dict() if state is None else state
    infos = {k: (safe_dtype_name(v.dtype), tuple(v.shape)) for k, v in state.items()}
    return build_plan(config, infos, stacked_config)


def _attach_provenance(model, record: dict, source_folder: Path) -> None:
    """Make this model instance's `save_pretrained` also write `growth_config.json` and the tokenizer files.

    The model stays an instance of its transformers class; only this one bound method is wrapped, so
    `push_to_hub` (which calls `save_pretrained`) carries the provenance too.
    """
    model.growth_record = record
    plain_save = model.save_pretrained

    def save_pretrained(self, save_directory, *args, **kwargs):
        plain_save(save_directory, *args, **kwargs)
        write_growth_record(Path(save_directory), self.growth_record)
        if source_folder.is_dir():
            copy_aux_files(source_folder, Path(save_directory))

    model.save_pretrained = types.MethodType(save_pretrained, model)
