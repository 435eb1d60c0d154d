"""hf_stack: grow small transformers checkpoints into deeper or wider ones (G_stack, arXiv 2405.15319).

One way through, a subpackage per stage, none importing a later one: `plans` (growth settings and the tensor plan,
with `operators`), `checkpoints` (read a source, grow its tensors, write a standard checkpoint and its card),
`training` (`StackingTrainer`), `evaluation` (the eight benchmarks), then `analysis` (compare runs, the study) and
`hub`; `cli` and `demo` sit on top. Names are imported on first use so `import hf_stack` and `hf-stack --help` stay
instant.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "HfStackError": "errors",
    "StackedConfig": "plans.config",
    "GrowthPlan": "plans.plan",
    "TensorSource": "plans.plan",
    "build_plan": "plans.plan",
    "when_to_grow": "plans.timing",
    "plan_growth": "plans.timing",  # the old name of when_to_grow
    "GrowthTiming": "plans.timing",
    "OPERATORS": "operators",
    "build_dataset": "data",
    "resolve_source": "checkpoints.source",
    "grow": "checkpoints.streaming",
    "StackedModelForCausalLM": "checkpoints.in_memory",
    "grow_model": "checkpoints.in_memory",
    "StackingTrainer": "training.trainer",
    "StackingTrainingArguments": "training.arguments",
    "GrowthMasks": "training.msg",
    "evaluate_model": "evaluation.harness",
    "EvalCallback": "evaluation.callback",
    "compare": "analysis.compare",
    "trial": "analysis.trial",
    "push": "hub",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'hf_stack' has no attribute {name!r}")
