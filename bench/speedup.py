"""The paper's headline at laptop scale: G_stack (grow x4 after d tokens, continue) against training from scratch.

    .venv/bin/python bench/speedup.py            # about 20 minutes on 2 CPU cores

Data: the public-domain corpus in ../shared/data/corpus/ (Austen, the King James Bible, Shakespeare), a byte-level
BPE of 4096 tokens trained on it, 128-token packed blocks; the stream's last 2% is held out for validation loss.
Grown run: a 2-layer Llama (hidden 128) trained for d tokens, grown x4 with G_stack to 8 layers, then trained with a
fresh AdamW and a re-warmed cosine schedule on the blocks that follow, for a total compute C_g. Scratch: the same
8-layer target from random init for `--scratch-compute` x C_g. The speed-up is the paper's: FLOPs scratch needs to
reach the grown run's final validation loss, over C_g, minus one (FLOPs = 6 N D, embeddings included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, corpus_files, llama, tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--small-layers", type=int, default=2)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--grow-at-tokens", type=float, default=1.0e6, help="d: tokens for the small model")
    parser.add_argument("--grown-tokens", type=float, default=2.6e6, help="tokens for the grown model after growth")
    parser.add_argument("--scratch-compute", type=float, default=1.6, help="scratch compute as a multiple of C_g")
    parser.add_argument("--eval-steps", type=int, default=100)
    args = parser.parse_args()

    from hf_stack import StackedConfig, StackingTrainer, StackingTrainingArguments, build_dataset
    from hf_stack.compare import compare, read_curve
    from hf_stack.trainer import count_parameters

    tok = tokenizer()
    block, batch = 128, 16
    tps = block * batch
    small = llama(tok, args.small_layers, args.hidden)
    big = llama(tok, args.small_layers * args.factor, args.hidden, seed=1)
    n_small, n_big = count_parameters(small), count_parameters(big)
    d = int(args.grow_at_tokens) // tps * tps
    c_grown = 6 * n_small * d + 6 * n_big * args.grown_tokens
    scratch_tokens = int(args.scratch_compute * c_grown / (6 * n_big)) // tps * tps
    needed = max(d + args.grown_tokens, scratch_tokens)
    train, val = build_dataset(corpus_files(), tok, block, seed=0, max_tokens=needed * 1.02, validation_fraction=0.02)
    val = val.select(range(min(len(val), 200)))
    print(f"small {n_small:,} params, target {n_big:,}; d = {d:,} tokens; C_g = {c_grown:.3g} FLOPs; "
          f"scratch {scratch_tokens:,} tokens; {len(train):,} training blocks, {len(val)} validation blocks", flush=True)  # fmt: skip

    common = dict(per_device_train_batch_size=batch, per_device_eval_batch_size=50, eval_strategy="steps",
                  eval_steps=args.eval_steps, logging_steps=args.eval_steps, save_strategy="no", report_to=[],
                  use_cpu=True, seed=0, lr_scheduler_type="cosine", weight_decay=0.1, adam_beta2=0.95,
                  max_grad_norm=1.0, disable_tqdm=False)  # fmt: skip
    runs = WORK / "speedup"
    shutil.rmtree(runs, ignore_errors=True)
    grown_args = StackingTrainingArguments(
        str(runs / "grown"), grow_at_tokens=d, max_tokens=d + int(args.grown_tokens), learning_rate=2e-3,
        grown_learning_rate=1e-3, warmup_steps=0.05, stacked_config=StackedConfig(factor=args.factor), **common,
    )  # fmt: skip
    StackingTrainer(model=small, args=grown_args, train_dataset=train, eval_dataset=val).train()
    scratch_args = StackingTrainingArguments(
        str(runs / "scratch"), max_tokens=scratch_tokens, learning_rate=1e-3, warmup_steps=0.05, **common
    )
    StackingTrainer(model=big, args=scratch_args, train_dataset=train, eval_dataset=val).train()

    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    r = compare(runs / "grown", runs / "scratch", results / "speedup.png")
    scratch = read_curve(runs / "scratch")
    at_equal = next((loss for f, loss in zip(scratch.flops, scratch.loss) if f >= c_grown), scratch.loss[-1])
    r.update(settings=vars(args), small_params=n_small, target_params=n_big, d=d, scratch_tokens=scratch_tokens,
             scratch_loss_at_equal_flops=at_equal)  # fmt: skip
    (results / "speedup.json").write_text(json.dumps(r, indent=2))
    sign = ">=" if r["lower_bound"] else "="
    print(f"\ngrown run: final eval_loss {r['grown_final_loss']:.4f} at {r['grown_flops']:.3g} FLOPs; "
          f"scratch at the same FLOPs: {at_equal:.4f}; scratch reaches {r['grown_final_loss']:.4f} at "
          f"{r['scratch_flops_to_match']:.3g} FLOPs\nspeed-up {sign} {r['speedup']:.1%}; plot {r['plot']}")  # fmt: skip


if __name__ == "__main__":
    main()
