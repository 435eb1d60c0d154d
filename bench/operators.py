"""The paper's operator table at laptop scale: the eight growth operators against one scratch baseline.

    .venv/bin/python bench/operators.py            # about 18 minutes on 2 CPU cores

Every operator grows into the same target, an 8-layer Llama with hidden 128 (2 heads of 64, FFN 336), so one
from-scratch run of that target is the baseline for all eight, as in the paper's operator comparison. Depthwise
operators grow a 2-layer model of the target's width x4; widthwise operators grow an 8-layer model of half the
width (hidden 64, 1 head, FFN 168) x2. Each small model trains on d tokens, is grown inside the run by
`StackingTrainer` (fresh AdamW, re-warmed cosine schedule) and trains on. `random` ramps its new parts in with MSG
masks over 100 steps; `learn` trains its LiGO maps for 50 steps on the same corpus. Data: the public-domain corpus
in ../shared/data/corpus/; the last 2% of the token stream is held out for validation loss. Speed-up as in the
paper (and `hf-stack compare`): FLOPs scratch needs to reach a grown run's final validation loss, over that run's
FLOPs, minus one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, corpus_files, tokenizer  # noqa: E402

SETTINGS = dict(block=128, batch=16, d=2.0e5, grown_tokens=6.0e5, scratch_tokens=1.2e6, lr=5e-3, grown_lr=3e-3,
                eval_steps=50, seed=0)  # fmt: skip
TARGET = dict(hidden_size=128, intermediate_size=336, num_attention_heads=2, num_hidden_layers=8)
SMALL = {
    "depth": dict(TARGET, num_hidden_layers=2),
    "width": dict(hidden_size=64, intermediate_size=168, num_attention_heads=1, num_hidden_layers=8),
}
GROWTH = {"depth": dict(factor=4), "width": dict(width_factor=2)}


def llama(tok, shape: dict, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tok), num_key_value_heads=shape["num_attention_heads"], **shape,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, architectures=["LlamaForCausalLM"])  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--operators", default="direct,zero,random,learn")
    parser.add_argument("--directions", default="depth,width")
    parser.add_argument("--width-noise", type=float, default=None, help="direct width: override the default noise.")
    parser.add_argument("--output", default="operators", help="Results name (bench/results/<name>.json).")
    args = parser.parse_args()

    from hf_stack import StackedConfig, StackingTrainer, StackingTrainingArguments, build_dataset
    from hf_stack.compare import compare, read_curve

    s = SETTINGS
    tok = tokenizer()
    files = corpus_files()
    needed = max(s["d"] + s["grown_tokens"], s["scratch_tokens"])
    train, val = build_dataset(
        files, tok, s["block"], seed=s["seed"], max_tokens=needed * 1.02, validation_fraction=0.02
    )
    val = val.select(range(min(len(val), 100)))
    out = WORK / args.output
    shutil.rmtree(out, ignore_errors=True)
    common = dict(per_device_train_batch_size=s["batch"], per_device_eval_batch_size=50, eval_strategy="steps",
                  eval_steps=s["eval_steps"], logging_steps=s["eval_steps"], save_strategy="no", report_to=[],
                  use_cpu=True, seed=s["seed"], lr_scheduler_type="cosine", weight_decay=0.1, adam_beta2=0.95,
                  max_grad_norm=1.0, warmup_steps=0.05, disable_tqdm=True)  # fmt: skip

    print("scratch: the 8-layer hidden-128 target from random init", flush=True)
    scratch_args = StackingTrainingArguments(str(out / "scratch"), max_tokens=s["scratch_tokens"],
                                             learning_rate=s["grown_lr"], **common)  # fmt: skip
    StackingTrainer(model=llama(tok, TARGET, s["seed"] + 1), args=scratch_args, train_dataset=train,
                    eval_dataset=val, processing_class=tok).train()  # fmt: skip
    scratch = read_curve(out / "scratch")

    rows = []
    for direction in args.directions.split(","):
        for name in args.operators.split(","):
            extra = {}
            if name == "learn":
                extra = dict(learn_data=",".join(files), learn_steps=50, learn_batch_size=8, learn_block_size=128)
            if args.width_noise is not None and name == "direct" and direction == "width":
                extra = dict(width_noise=args.width_noise)
            stacked = StackedConfig(operator=name, **GROWTH[direction], **extra)
            run = out / f"{name}-{direction}"
            print(f"{name} {direction}: train {SMALL[direction]}, grow, train on", flush=True)
            targs = StackingTrainingArguments(str(run), grow_at_tokens=s["d"], max_tokens=s["d"] + s["grown_tokens"],
                                              learning_rate=s["lr"], grown_learning_rate=s["grown_lr"],
                                              stacked_config=stacked, mask_steps=100 if name == "random" else 0,
                                              **common)  # fmt: skip
            StackingTrainer(model=llama(tok, SMALL[direction], s["seed"]), args=targs, train_dataset=train,
                            eval_dataset=val, processing_class=tok).train()  # fmt: skip
            r = compare(run, out / "scratch", run / "compare.png")
            at_equal = next((v for f, v in zip(scratch.flops, scratch.loss) if f >= r["grown_flops"]), None)
            rows.append(dict(operator=name, direction=direction, final_loss=r["grown_final_loss"],
                             flops=r["grown_flops"], scratch_loss_at_equal_flops=at_equal, speedup=r["speedup"],
                             lower_bound=r["lower_bound"]))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

    print(f"\nscratch: final validation loss {scratch.loss[-1]:.4f} after {scratch.flops[-1]:.3g} FLOPs\n")
    print("| operator | direction | validation loss | FLOPs | scratch at equal FLOPs | speed-up |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        equal = f"{r['scratch_loss_at_equal_flops']:.4f}" if r["scratch_loss_at_equal_flops"] is not None else "-"
        bound = ">" if r["lower_bound"] else ""
        print(f"| `{r['operator']}` | {r['direction']} | {r['final_loss']:.4f} | {r['flops']:.3g} | {equal} | "
              f"{bound}{r['speedup']:+.1%} |")  # fmt: skip
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    summary = {"settings": SETTINGS, "width_noise": args.width_noise, "target": TARGET, "small": SMALL, "rows": rows,
               "scratch": {"final_loss": scratch.loss[-1], "flops": scratch.flops[-1]}}  # fmt: skip
    (results / f"{args.output}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
