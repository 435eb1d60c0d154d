"""Data, beside the plans: any `datasets` source tokenised and packed into fixed blocks with document separators,
read by the `learn` operator at growth and by the trainer.

Blocks are contiguous token windows over the concatenated documents (each followed by a separator token), with
no padding; their order is shuffled once with a seed, so the stream is deterministic and a run that grows
mid-way continues on the blocks that follow instead of replaying what the small model saw.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from .errors import HfStackError, error_reason

TEXT_SUFFIXES = (".txt", ".text", ".md")
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def iter_documents(sources: str | list[str], text_column: str = "text", split: str = "train", max_documents=None):
    """Yield documents (strings) from local text / jsonl / json / parquet / csv files, globs, or a Hub dataset id
    (streamed, so only what is used is downloaded)."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not sources:
        raise HfStackError("no training data given; pass --data with files, globs or a Hub dataset id")
    count = 0
    for src in sources:
        for doc in _documents_of(str(src), text_column, split):
            yield doc
            count += 1
            if max_documents is not None and count >= max_documents:
                return


def _documents_of(src: str, text_column: str, split: str):
    files = sorted(glob.glob(src)) if any(c in src for c in "*?[") else ([src] if Path(src).exists() else [])
    if not files and (
        Path(src).suffix in (*TEXT_SUFFIXES, *TABLE_FORMATS) or os.sep in src and not _looks_like_repo(src)
    ):
        raise HfStackError(f"data file {src!r} does not exist")
    if not files:
        yield from _hub_documents(src, text_column, split)
        return
    for f in files:
        path = Path(f)
        if path.is_dir():
            raise HfStackError(f"{path} is a folder; pass the files inside it (e.g. '{path}/*.txt')")
        if path.suffix in TABLE_FORMATS:
            yield from _table_documents(path, text_column)
        else:
            try:
                yield path.read_text(encoding="utf-8")  # one file, one document
            except UnicodeDecodeError as e:
                raise HfStackError(f"{path} is not UTF-8 text (byte {e.start}); convert it with iconv first") from None


def _looks_like_repo(src: str) -> bool:
    parts = src.split("/")
    return len(parts) == 2 and all(parts) and not src.startswith((".", "/"))


def _table_documents(path: Path, text_column: str):
    from datasets import load_dataset

    try:
        ds = load_dataset(TABLE_FORMATS[path.suffix], data_files=str(path), split="train")
    except Exception as e:
        raise HfStackError(f"cannot read {path}: {error_reason(e)}") from None
    if text_column not in ds.column_names:
        raise HfStackError(f"{path} has no {text_column!r} column (columns: {ds.column_names}); pass --text-column")
    for row in ds:
        if row[text_column]:
            yield row[text_column]


def _hub_documents(repo_id: str, text_column: str, split: str):
    from datasets import load_dataset

    try:
        ds = load_dataset(repo_id, split=split, streaming=True)
    except Exception as e:
        raise HfStackError(f"cannot load dataset {repo_id!r}: {error_reason(e)}") from None
    for row in ds:
        if text_column not in row:
            raise HfStackError(f"dataset {repo_id!r} has no {text_column!r} column (columns: {sorted(row)})")
        if row[text_column]:
            yield row[text_column]


def separator_id(tokenizer) -> int:
    """Token that separates documents: EOS if the tokenizer has one, else BOS (the paper's choice)."""
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return tid
    raise HfStackError("the tokenizer has neither an EOS nor a BOS token to separate documents")


def _pieces(doc: str, size: int = 200_000):
    """Split a long document at line breaks so a token budget can stop inside it (a book is one document)."""
    start = 0
    while start < len(doc):
        end = len(doc) if len(doc) - start <= size else doc.rfind("\n", start, start + size) + 1 or start + size
        yield doc[start:end]
        start = end


def tokenize_documents(documents, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """Concatenate tokenised documents, each followed by the separator; stop once `max_tokens` are collected."""
    sep = separator_id(tokenizer)
    chunks, total, n_docs = [], 0, 0
    for doc in documents:
        if not doc.strip():  # whitespace-only documents carry no text; they would train on separators alone
            continue
        n_docs += 1
        for piece in _pieces(doc):
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            chunks.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
        chunks.append(np.asarray([sep], dtype=np.int64))
        total += 1
        if max_tokens is not None and total >= max_tokens:
            break
    if total <= n_docs:  # nothing but separators (or no documents at all): every document tokenised to nothing
        raise HfStackError("the training data tokenises to nothing (empty files or an empty text column)")
    return np.concatenate(chunks)


def pack(tokens: np.ndarray, block_size: int, seed: int = 0, shuffle: bool = True):
    """Cut the token stream into `block_size` blocks (the remainder is dropped) and shuffle them with `seed`.

    Returns:
        A `datasets.Dataset` with `input_ids` and `labels` (equal: the model shifts labels itself), torch format.
    """
    from datasets import Dataset

    if block_size < 2:
        raise HfStackError(f"block size must be at least 2, got {block_size}")
    n = len(tokens) // block_size
    if n == 0:
        raise HfStackError(f"the data has {len(tokens)} tokens, fewer than one block of {block_size}")
    blocks = tokens[: n * block_size].reshape(n, block_size)
    if shuffle:
        blocks = blocks[np.random.default_rng(seed).permutation(n)]
    ds = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    return ds.with_format("torch")


def build_dataset(
    sources,
    tokenizer,
    block_size: int,
    *,
    seed: int = 0,
    max_tokens: int | None = None,
    validation_fraction: float = 0.0,
    text_column: str = "text",
    split: str = "train",
):
    """Tokenise and pack `sources`; optionally hold out the stream's tail for validation (never trained on).

    Returns:
        `(train, validation)` datasets; `validation` is None when `validation_fraction` is 0.
    """
    if not 0 <= validation_fraction < 1:
        raise HfStackError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    budget = None if max_tokens is None else int(max_tokens / (1 - validation_fraction)) + block_size
    tokens = tokenize_documents(iter_documents(sources, text_column, split), tokenizer, budget)
    n_val = int(len(tokens) * validation_fraction)
    if 0 < n_val < block_size:
        raise HfStackError(
            f"the validation tail ({validation_fraction:g} of {len(tokens):,} tokens) is shorter than one block of "
            f"{block_size}; add data or hold out a larger fraction"
        )
    train_tokens, val_tokens = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    train = pack(train_tokens, block_size, seed)
    validation = pack(val_tokens, block_size, seed, shuffle=False) if n_val else None
    return train, validation


def unigram_loss(train, validation, vocab_size: int | None = None, max_blocks: int = 50_000) -> float:
    """Validation cross-entropy (nats per predicted token) of the training data's token frequencies.

    The floor any trained model must beat: a model no better than this has learnt only which tokens are common.
    Counts come from the first `max_blocks` training blocks (add-one smoothing, so unseen tokens cost a finite
    amount); the positions scored are the ones a causal LM's loss scores (every label of a block but the first,
    without the -100s it ignores).

    Args:
        train: packed training blocks (`input_ids`), as `pack` / `build_dataset` return them.
        validation: packed validation blocks.
        vocab_size: the model's vocabulary, the support of the smoothing (default: the largest id seen, plus one).
        max_blocks: bound on the blocks counted (memory and time stay small on large datasets).
    """
    counted = np.concatenate([np.asarray(x).reshape(-1) for x in train.with_format("numpy")[:max_blocks]["input_ids"]])
    column = "labels" if "labels" in validation.column_names else "input_ids"
    scored = np.concatenate([np.asarray(x).reshape(-1)[1:] for x in validation.with_format("numpy")[column]])
    scored = scored[scored >= 0]  # -100: positions the loss ignores
    size = max(vocab_size or 0, int(max(counted.max(initial=0), scored.max(initial=0))) + 1)
    counts = np.bincount(counted, minlength=size).astype(np.float64) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    return float(-log_p[scored].mean())


def train_tokenizer(files_or_docs, vocab_size: int, folder: Path):
    """A Llama-format BPE tokenizer (`▁` word boundaries, <s> </s> <unk>, LlamaTokenizer class) trained on the data."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=True)
    tok.train_from_iterator(iter_documents(files_or_docs), trainer)
    fast = LlamaTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", add_bos_token=False
    )
    fast.save_pretrained(folder)
    return fast
