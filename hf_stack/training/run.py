"""Stage 3, `hf-stack train`: load the model and tokenizer, pack the data, run `StackingTrainer`."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import HfStackError, error_reason
from .arguments import StackingTrainingArguments
from .log import TRAINING_LOG
from .trainer import StackingTrainer, check_run


def run_training(cli, args: StackingTrainingArguments) -> dict:
    """What `hf-stack train` does: load the model and tokenizer, pack the data, train, return the summary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

    from ..checkpoints.source import resolve_source
    from ..data import build_dataset
    from ..plans.plan import check_source_shapes

    name = cli.model or cli.from_scratch_like
    # resolve_source validates the folder or Hub id (no remote code, safetensors) before anything heavy runs.
    source = resolve_source(name, revision=cli.revision)
    check_source_shapes(source.config, source.tensor_infos)  # from the headers, before any weight loads
    try:
        tokenizer = AutoTokenizer.from_pretrained(cli.tokenizer or source.folder)
    except Exception as e:
        raise HfStackError(f"cannot load a tokenizer from {cli.tokenizer or name}: {error_reason(e)}") from None
    # Data first: bad data should fail before the model is loaded.
    train, validation = build_dataset(
        cli.data, tokenizer, cli.block_size, seed=args.seed, max_tokens=args.max_tokens,
        validation_fraction=cli.validation_fraction, validation_tokens=cli.validation_tokens,
        text_column=cli.text_column,
    )  # fmt: skip
    config = AutoConfig.from_pretrained(source.folder, trust_remote_code=False)
    # Then the settings, the context and the run folder, still before the weights load.
    check_run(args, len(train), cli.block_size, config, cli.resume or None)
    set_seed(args.seed)
    if cli.from_scratch_like:
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.folder, trust_remote_code=False)
    if validation is not None and args.eval_strategy == "no":
        args.eval_strategy, args.eval_steps = "steps", args.eval_steps or args.logging_steps
    peft_config = None
    if cli.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cli.lora_r, lora_alpha=2 * cli.lora_r, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    trainer = StackingTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=validation, processing_class=tokenizer,
        peft_config=peft_config,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=cli.resume or None)
    summary = json.loads((Path(args.output_dir) / TRAINING_LOG).read_text())["training"]
    return {**summary, "final": str(Path(args.output_dir) / "final")}
