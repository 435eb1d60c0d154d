"""Stage 2, checkpoints: read a source checkpoint, grow its tensors by the plan, write a standard transformers
checkpoint (streaming or in memory) with `growth_config.json` and a model card."""
