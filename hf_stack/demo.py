"""`make demo`: the growth path end to end on a laptop: build a small Llama, grow it x4, reload it with transformers.

Run with `python -m hf_stack.demo --output demo-output`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. In the beginning God created the heaven and the earth. To be, or not to be, that is the question."
)


def build_small(folder: Path, num_layers: int = 2) -> None:
    """A small randomly initialised Llama with its own BPE tokenizer, saved as a plain checkpoint."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo-output", help="Folder for the demo's outputs.")
    args = parser.parse_args(argv)
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_stack import StackedConfig, StackedModelForCausalLM, grow

    small = out / "small"
    print(f"1/3 building a small 2-layer Llama in {small}")
    build_small(small)
    print("2/3 growing it x4 with G_stack (streaming, verified)")
    plan = grow(small, out / "grown", StackedConfig(factor=4), verify=True, progress=True)
    print(plan.describe().split("\n  ")[0])
    print("3/3 reloading the grown checkpoint with plain transformers")
    model = AutoModelForCausalLM.from_pretrained(out / "grown")
    tokenizer = AutoTokenizer.from_pretrained(out / "grown")
    in_memory = StackedModelForCausalLM.from_small_pretrained(small, StackedConfig(factor=4))
    ids = tokenizer("To be, or not to be", return_tensors="pt").input_ids
    with torch.no_grad():
        same = torch.equal(model(ids).logits, in_memory(ids).logits)
    print(f"   {type(model).__name__} with {model.config.num_hidden_layers} layers; in-memory path identical: {same}")
    print(f"outputs: {out.resolve()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
