"""Data, beside the plans: any `datasets` source tokenised and packed into fixed blocks with document separators,
read by the `learn` operator at growth and by the trainer.

Blocks are contiguous token windows over the concatenated documents (each followed by a separator token), with
no padding; their order is shuffled once with a seed, so the stream is deterministic and a run that grows
mid-way continues on the blocks that follow instead of replaying what the small model saw.

What a run validates on, and the order of the blocks it trains on, do not depend on its budget: runs of different
lengths on the same data and seed validate on the same blocks and train on the same first blocks (the longer run
continues where the shorter one stopped), so their end points can be compared.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
from pathlib import Path

import numpy as np

from .errors import HfStackError, error_reason

TEXT_SUFFIXES = (".txt", ".text", ".md")
TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Blocks are shuffled within windows of this many tokens (a shuffle buffer): a budget reads whole windows, so the
# order of the blocks it trains on is the same in every run that reads at least as far. 2^24 tokens (128 MB of ids):
# a corpus smaller than that is shuffled as a whole, and a small budget costs seconds of tokenising at most.
SHUFFLE_WINDOW_TOKENS = 1 << 24
# The validation set's default size: 2^17 tokens put the standard error of a loss near 0.005 nats.
VALIDATION_TOKENS = 1 << 17


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
    return _token_stream(documents, tokenizer, max_tokens)[0]


def _token_stream(documents, tokenizer, max_tokens: int | None) -> tuple[np.ndarray, bool]:
    """The token stream and whether it holds every document (False: the budget stopped it before the source ended).

    A cut stream is a prefix of the whole one: a document cut short gets no separator."""
    sep = separator_id(tokenizer)
    chunks, total, n_docs = [], 0, 0
    for doc in documents:
        if not doc.strip():  # whitespace-only documents carry no text; they would train on separators alone
            continue
        n_docs += 1
        for piece in _pieces(doc):
            if max_tokens is not None and total >= max_tokens:
                return _joined(chunks, total, n_docs), False
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            chunks.append(np.asarray(ids, dtype=np.int64))
            total += len(ids)
        chunks.append(np.asarray([sep], dtype=np.int64))
        total += 1
    return _joined(chunks, total, n_docs), True


def _joined(chunks: list, total: int, n_docs: int) -> np.ndarray:
    if total <= n_docs:  # nothing but separators (or no documents at all): every document tokenised to nothing
        raise HfStackError("the training data tokenises to nothing (empty files or an empty text column)")
    return np.concatenate(chunks)


def pack(tokens: np.ndarray, block_size: int, seed: int = 0, shuffle: bool = True):
    """Cut the token stream into `block_size` blocks (the remainder is dropped) and shuffle them with `seed`.

    Returns:
        A `datasets.Dataset` with `input_ids` and `labels` (equal: the model shifts labels itself), torch format.
    """
    blocks = _blocks(tokens, block_size)
    if shuffle:
        blocks = blocks[_order(len(blocks), seed, None)]
    return _dataset(blocks)


def _blocks(tokens: np.ndarray, block_size: int) -> np.ndarray:
    if block_size < 2:
        raise HfStackError(f"block size must be at least 2, got {block_size}")
    n = len(tokens) // block_size
    if n == 0:
        raise HfStackError(f"the data has {len(tokens)} tokens, fewer than one block of {block_size}")
    return tokens[: n * block_size].reshape(n, block_size)


def _order(n: int, seed: int, window: int | None) -> np.ndarray:
    if window is None or n == 0:
        return np.random.default_rng(seed).permutation(n)
    return np.concatenate(
        [start + np.random.default_rng([seed, start // window]).permutation(min(window, n - start))
         for start in range(0, n, window)]
    )  # fmt: skip


def _dataset(blocks: np.ndarray):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": blocks, "labels": blocks}).with_format("torch")


def build_dataset(
    sources,
    tokenizer,
    block_size: int,
    *,
    seed: int = 0,
    max_tokens: int | None = None,
    validation_fraction: float = 0.0,
    validation_tokens: int = VALIDATION_TOKENS,
    text_column: str = "text",
    split: str = "train",
):
    """Tokenise and pack `sources`; optionally hold out validation blocks (never trained on).

    Neither set depends on `max_tokens`, which only bounds how much of the stream is read: the validation blocks are
    a `validation_fraction` share of the stream's blocks from its start (every 1/f-th), up to `validation_tokens`
    of them (all of them when the data is smaller), and the training blocks, the others, are shuffled within windows
    of `SHUFFLE_WINDOW_TOKENS` that a budget reads whole. Two runs of different budgets on the same data and seed
    validate on the same blocks, and the shorter run's training blocks are the longer run's first ones.

    Args:
        max_tokens: the training tokens needed (default: read all of `sources`).
        validation_fraction: the share of blocks held out from the stream's start (every 1/f-th; 0: no validation
            set), until there are `validation_tokens` of them.
        validation_tokens: the validation set's size, rounded up to whole blocks.

    Returns:
        `(train, validation)` datasets; `validation` is None when `validation_fraction` is 0.
    """
    if not 0 <= validation_fraction < 1:
        raise HfStackError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    if validation_fraction and validation_tokens < 1:
        raise HfStackError(f"validation tokens must be at least 1, got {validation_tokens}")
    n_val = math.ceil(validation_tokens / block_size) if validation_fraction else 0
    span = math.ceil(n_val / validation_fraction) if validation_fraction else 0  # blocks holding the first n_val
    window = max(1, SHUFFLE_WINDOW_TOKENS // block_size)
    need = None if max_tokens is None else math.ceil(math.ceil(max_tokens / block_size) / window) * window
    # read past the last validation block and whole windows of training blocks (one block of slack for rounding)
    budget = None if need is None else (max(span, need + n_val) + 1) * block_size
    tokens, whole = _token_stream(iter_documents(sources, text_column, split), tokenizer, budget)
    blocks = _blocks(tokens, block_size)
    # block i is held out when it completes another `validation_fraction` of the blocks before it: every 1/f-th
    # block for any f (0.3: three in ten), the first n_val of them
    i = np.arange(len(blocks))
    held = np.floor((i + 1) * validation_fraction) > np.floor(i * validation_fraction)
    held &= np.cumsum(held) <= n_val
    if validation_fraction and not held.any():
        raise HfStackError(
            f"the data holds {len(blocks)} blocks of {block_size}, too few to hold out a {validation_fraction:g} "
            "share for validation; add data or hold out a larger fraction"
        )
    train = blocks[~held]
    if not whole:  # a partial window would differ from the whole one a longer run reads
        train = train[: len(train) // window * window]
    train = _dataset(train[_order(len(train), seed, window)])
    validation = _dataset(blocks[held]) if held.any() else None
    return train, validation


def fingerprint(dataset) -> dict:
    """What identifies a set of packed blocks (a run's validation set): its size and a digest of its token ids.

    Returns:
        `{"blocks", "tokens", "sha256"}` (the first 16 hex digits of the ids' digest, as little-endian int64).
    """
    ids = np.asarray(dataset.with_format("numpy")["input_ids"], dtype="<i8")
    return {"blocks": int(ids.shape[0]), "tokens": int(ids.size),
            "sha256": hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()[:16]}  # fmt: skip


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
