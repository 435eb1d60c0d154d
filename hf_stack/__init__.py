"""hf_stack: grow small transformers checkpoints into deeper or wider ones (G_stack, arXiv 2405.15319).

Pipeline: source checkpoint -> growth plan (`plan`) -> grown tensors (`tensors`, `convert`) -> standard checkpoint.
Heavy modules are imported on first use so `import hf_stack` and `hf-stack --help` stay instant.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "StackedConfig": "config",
    "HfStackError": "errors",
    "GrowthPlan": "plan",
    "TensorSource": "plan",
    "build_plan": "plan",
    "grow": "convert",
    "StackedModelForCausalLM": "modeling",
    "OPERATORS": "operators",
    "resolve_source": "io",
    "grow_model": "modeling",
    "plan_growth": "timing",
    "GrowthTiming": "timing",
    "build_dataset": "data",
    "StackingTrainer": "trainer",
    "StackingTrainingArguments": "trainer",
    "GrowthMasks": "masks",
    "evaluate_model": "evaluate",
    "EvalCallback": "evaluate",
    "push": "hub",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'hf_stack' has no attribute {name!r}")
