"""Stage 1, growth plans: settings, layer maps, width axes and the tensor plan, plain data computed from configs.

Nothing in this package imports torch or transformers, so plans print (`--dry-run`) and test in milliseconds.
"""
