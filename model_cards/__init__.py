"""The model card template, shipped inside the package as `hf_stack.model_cards` (see pyproject.toml)."""
