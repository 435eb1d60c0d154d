"""Tokens/s of `StackingTrainer` against a plain `transformers.Trainer`: same model, data and arguments.

    .venv/bin/python bench/train_throughput.py --reps 3 --steps 60

Both trainers run interleaved in this process on the same packed corpus blocks (plain continued pre-training, no
growth, so the two do the same work); the figure is the ratio of median tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import corpus_files, llama, save_results, tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()

    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_stack import StackingTrainer, StackingTrainingArguments, build_dataset

    tok = tokenizer()
    block, batch = 128, 8
    train, _ = build_dataset(corpus_files(), tok, block, max_tokens=block * batch * args.steps * 2)
    common = dict(per_device_train_batch_size=batch, learning_rate=1e-3, logging_steps=10, save_strategy="no",
                  report_to=[], use_cpu=True, disable_tqdm=True, seed=0, max_steps=args.steps)  # fmt: skip
    tokens = block * batch * args.steps
    rates: dict[str, list[float]] = {"Trainer": [], "StackingTrainer": []}
    end_to_end: dict[str, list[float]] = {"Trainer": [], "StackingTrainer": []}
    for rep in range(args.reps):
        for name in rates:
            with tempfile.TemporaryDirectory() as out:
                model = llama(tok, args.layers)
                if name == "Trainer":
                    trainer = Trainer(model=model, args=TrainingArguments(out, **common), train_dataset=train,
                                      data_collator=default_data_collator)  # fmt: skip
                else:
                    targs = StackingTrainingArguments(out, max_tokens=tokens, **common)
                    trainer = StackingTrainer(model=model, args=targs, train_dataset=train)
                t0 = time.perf_counter()
                out = trainer.train()
                end_to_end[name].append(tokens / (time.perf_counter() - t0))
                # the training loop itself, as the Trainer times it (StackingTrainer also writes a final model,
                # card and loss plot after the loop; that shows in the end-to-end figure)
                rates[name].append(tokens / out.metrics["train_runtime"])
            print(f"rep {rep + 1}/{args.reps} {name}: {rates[name][-1]:,.0f} tokens/s in the loop, "
                  f"{end_to_end[name][-1]:,.0f} end to end", flush=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in rates.items()}
    e2e = {k: statistics.median(v) for k, v in end_to_end.items()}
    print(
        f"\n{args.layers}-layer Llama (hidden 256), {args.steps} steps of {batch}x{block} tokens, medians of {args.reps}"
    )
    print("| trainer | tokens/s, training loop | tokens/s, end to end |\n|---|---|---|")
    for k in med:
        print(f"| {k} | {med[k]:,.0f} | {e2e[k]:,.0f} |")
    loop, total = med["StackingTrainer"] / med["Trainer"], e2e["StackingTrainer"] / e2e["Trainer"]
    print(f"\nStackingTrainer / Trainer: {loop:.3f}x in the loop, {total:.3f}x end to end")
    save_results("train_throughput", {"settings": vars(args) | {"block": block, "batch": batch},
                                      "tokens_per_second_loop": rates, "tokens_per_second_end_to_end": end_to_end,
                                      "ratio_loop": loop, "ratio_end_to_end": total})  # fmt: skip


if __name__ == "__main__":
    main()
