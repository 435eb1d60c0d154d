"""Shared set-up for the training benchmarks: a BPE tokenizer and packed blocks from the public-domain corpus."""

from __future__ import annotations

import glob
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "corpus"
WORK = ROOT / "bench" / "work"


def corpus_files() -> list[str]:
    files = sorted(glob.glob(str(CORPUS / "*.txt")))
    if not files:
        raise SystemExit(f"no corpus at {CORPUS} (the benchmarks read ../shared/data/corpus/*.txt)")
    return files


def tokenizer(vocab_size: int = 4096):
    """A byte-level BPE trained on the corpus, cached in bench/work/."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = WORK / f"tokenizer-{vocab_size}"
    if not (folder / "tokenizer.json").is_file():
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
        )
        tok.train(corpus_files(), trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
        fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def llama(tok, num_layers: int, hidden: int = 256, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=num_layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
