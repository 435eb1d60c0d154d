"""Shared set-up for the training benchmarks: a BPE tokenizer and packed blocks from the public-domain corpus."""

from __future__ import annotations

import glob
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "data" / "corpus"
WORK = ROOT / "bench" / "work"


def save_results(name: str, data: dict) -> Path:
    """Raw timings of a benchmark, so every README figure can be recomputed: `bench/results/<name>.json`."""
    import json
    import os
    import platform

    path = ROOT / "bench" / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
    path.write_text(json.dumps({"machine": machine, **data}, indent=2) + "\n")
    print(f"raw results: {path.relative_to(ROOT)}")
    return path


def corpus_files() -> list[str]:
    files = sorted(glob.glob(str(CORPUS / "*.txt")))
    if not files:
        raise SystemExit(f"no corpus at {CORPUS} (the benchmarks read ../shared/data/corpus/*.txt)")
    return files


def tokenizer(vocab_size: int = 4096):
    """The demo's Llama-format BPE trained on the corpus, cached in bench/work/."""
    from transformers import AutoTokenizer

    from hf_stack.data import train_tokenizer

    folder = WORK / f"tokenizer-{vocab_size}"
    if not (folder / "tokenizer.json").is_file():
        train_tokenizer(corpus_files(), vocab_size, folder)
    return AutoTokenizer.from_pretrained(folder)


def llama(tok, num_layers: int, hidden: int = 256, seed: int = 0):
    from hf_stack.demo import small_llama

    return small_llama(
        tok, {"hidden_size": hidden, "num_attention_heads": hidden // 64, "block_size": 512}, num_layers, seed
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last `reset_peak_rss` (the kernel's high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets the high-water mark to the current RSS


def metrics(task_results: dict) -> dict:
    """A task's metrics from lm-eval's results (`results[task]`), without their standard errors."""
    return {k: v for k, v in task_results.items() if k.endswith(",none") and "stderr" not in k}
