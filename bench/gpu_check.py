"""The GPU check: one short script for a session that is lent a GPU (sized for a few minutes on one; not yet run on one).

    .venv/bin/python bench/gpu_check.py                       # on the GPU; results to bench/results/gpu/
    .venv/bin/python bench/gpu_check.py --dry-run --data F.txt --out DIR   # CPU, tiny sizes: what the tests run

1. Training, bf16 with SDPA: a `StackingTrainer` run that grows x2 in the run (G_stack) beside a plain
   `transformers.Trainer` training the grown shape from scratch for the same steps, on the same blocks: tokens/s of
   each phase (over its seconds, growth included, and the median of its logged steps) and of the plain Trainer's
   loop, and peak memory.
2. Scoring, bf16: `evaluate_model` with hf_stack's scorer beside lm-eval's HFLM on the same items: every metric of
   both (in bf16 the two may differ: HFLM's log-softmax runs in bf16, the scorer's in float32), seconds and peak
   memory of each.
3. FSDP2 growth, where there are two GPUs or more: `hf-stack train --fsdp ... --fsdp_config '{"version": 2}'` with
   in-run growth under torchrun on every GPU, bf16; its records (each phase's parallelism, tokens/s) and each rank's
   peak memory (rank 0 holds the gathered full state at growth, the others only shards). The dry run starts it on
   2 CPU processes with the tests' shim (tests/fsdp_cpu), so this part cannot rot either.

Data: the public-domain corpus (../shared/data/corpus) and items synthesised from it (as `bench/eval.py`); with
`--dry-run`, the `--data` text file and the package's smoke samples.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, WORK, metrics, peak_rss_mb, reset_peak_rss  # noqa: E402

SIZES = {  # layers of the small model (grown x2), hidden size, block, batch, steps per phase, eval items
    "gpu": dict(layers=6, hidden=768, block=512, batch=16, steps=150, items=500, vocab=8192),
    "dry": dict(layers=1, hidden=64, block=32, batch=4, steps=3, items=2, vocab=300),
}


def peak_memory_mb(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb()


def reset_peak_memory(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def training(size: dict, tok, files: list[str], device, dry: bool) -> dict:
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_stack import StackedConfig, StackingTrainer, StackingTrainingArguments, build_dataset
    from hf_stack.demo import small_llama

    recipe = {"hidden_size": size["hidden"], "num_attention_heads": max(1, size["hidden"] // 64),
              "block_size": size["block"]}  # fmt: skip
    tokens_per_step = size["block"] * size["batch"]
    train, _ = build_dataset(files, tok, size["block"], max_tokens=tokens_per_step * size["steps"] * 2)
    common = dict(per_device_train_batch_size=size["batch"], learning_rate=1e-3, save_strategy="no", report_to=[],
                  disable_tqdm=True, seed=0, bf16=not dry, use_cpu=dry, logging_steps=1)  # fmt: skip
    out: dict = {}
    with tempfile.TemporaryDirectory() as folder:
        reset_peak_memory(device)
        args = StackingTrainingArguments(f"{folder}/grown", max_tokens=tokens_per_step * size["steps"] * 2,
                                         grow_at_tokens=tokens_per_step * size["steps"],
                                         stacked_config=StackedConfig(factor=2), **common)  # fmt: skip
        model = small_llama(tok, recipe, size["layers"], seed=0)
        out["attention"] = model.config._attn_implementation  # transformers' default where it runs: SDPA
        trainer = StackingTrainer(model=model, args=args, train_dataset=train, processing_class=tok)
        t0 = time.perf_counter()
        trainer.train()
        log = json.loads((Path(folder) / "grown" / "training_log.json").read_text())
        phases = log["training"]["phases"]
        out["stacking_trainer"] = {
            "seconds": time.perf_counter() - t0,
            # per phase: over its training seconds (growth included), and the median of its logged steps' rates
            "phases": [{"num_parameters": p["num_parameters"], "tokens": p["tokens"],
                        "tokens_per_second": p["tokens"] / p["train_seconds"],
                        "tokens_per_second_steady": statistics.median(
                            e["tokens_per_second"] for e in log["log_history"]
                            if e.get("phase") == k and "tokens_per_second" in e)}
                       for k, p in enumerate(phases, 1)],
            "peak_memory_mb": peak_memory_mb(device),
        }  # fmt: skip
        reset_peak_memory(device)
        model = small_llama(tok, recipe, size["layers"] * 2, seed=0)
        plain = Trainer(model=model, args=TrainingArguments(f"{folder}/plain", max_steps=size["steps"], **common),
                        train_dataset=train, data_collator=default_data_collator)  # fmt: skip
        metrics = plain.train().metrics
        out["plain_trainer"] = {"num_layers": size["layers"] * 2,
                                "tokens_per_second": tokens_per_step * size["steps"] / metrics["train_runtime"],
                                "peak_memory_mb": peak_memory_mb(device)}  # fmt: skip
    out["ratio_grown_phase_to_plain"] = (
        out["stacking_trainer"]["phases"][-1]["tokens_per_second_steady"] / out["plain_trainer"]["tokens_per_second"]
    )
    return out


FSDP_WORKER = """
import json, os, resource, sys
import torch
from hf_stack.cli import main
code = main(sys.argv[2:])
peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
with open(os.path.join(sys.argv[1], f"peak-{os.environ['RANK']}.json"), "w") as f:
    json.dump({"rank": int(os.environ["RANK"]), "peak_memory_mb": peak}, f)
sys.exit(code)
"""


def fsdp2_growth(size: dict, tok, files: list[str], dry: bool) -> dict | str:
    """In-run growth under FSDP2 on every GPU (2 CPU processes in the dry run), through the CLI as users run it."""
    import os
    import subprocess

    import torch

    from hf_stack.demo import small_llama

    procs = 2 if dry else torch.cuda.device_count()
    if procs < 2:
        return "not run: one GPU (sharding needs two or more)"
    recipe = {"hidden_size": size["hidden"], "num_attention_heads": max(1, size["hidden"] // 64),
              "block_size": size["block"]}  # fmt: skip
    tokens_per_step = size["block"] * size["batch"] * procs
    with tempfile.TemporaryDirectory() as folder:
        small_llama(tok, recipe, size["layers"], seed=0).save_pretrained(f"{folder}/small")
        tok.save_pretrained(f"{folder}/small")
        Path(f"{folder}/worker.py").write_text(FSDP_WORKER)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if dry:  # accelerate does not shard on CPUs by itself: the tests' shim lets it (see its docstring)
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "fsdp_cpu"), env.get("PYTHONPATH", "")])
            env["CUDA_VISIBLE_DEVICES"] = ""
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               f"{folder}/worker.py", folder, "train", "--model", f"{folder}/small", "--data", *files,
               "--block-size", str(size["block"]), "--per-device-train-batch-size", str(size["batch"]),
               "--grow-at-tokens", str(tokens_per_step * size["steps"]),
               "--max-tokens", str(tokens_per_step * size["steps"] * 2), "--factor", "2", "--learning-rate", "1e-3",
               "--validation-fraction", "0", "--disable-tqdm", "true", "--fsdp", "full_shard auto_wrap",
               "--fsdp_config", '{"version": 2}', *(["--use-cpu", "true"] if dry else ["--bf16", "true"]),
               "-o", f"{folder}/run"]  # fmt: skip
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(f"error: the FSDP2 run failed:\n{r.stderr[-3000:]}")
        log = json.loads(Path(f"{folder}/run/training_log.json").read_text())
        return {
            "processes": procs,
            "seconds": time.perf_counter() - t0,
            "phases": [{"num_parameters": p["num_parameters"], "tokens": p["tokens"], "parallelism": p["parallelism"],
                        "tokens_per_second": p["tokens"] / p["train_seconds"]} for p in log["training"]["phases"]],
            "peak_memory_mb_per_rank": [json.loads(Path(f"{folder}/peak-{k}.json").read_text())["peak_memory_mb"]
                                        for k in range(procs)],
        }  # fmt: skip


def scoring(size: dict, tok, device, dry: bool, data: Path) -> dict:
    import torch

    from hf_stack.demo import small_llama
    from hf_stack.evaluation.harness import evaluate_model

    recipe = {"hidden_size": size["hidden"], "num_attention_heads": max(1, size["hidden"] // 64),
              "block_size": size["block"]}  # fmt: skip
    model = small_llama(tok, recipe, size["layers"] * 2, seed=0).to(device, torch.float32 if dry else torch.bfloat16)
    out = {}
    for backend in ("hf-stack", "lm-eval"):
        reset_peak_memory(device)
        t0 = time.perf_counter()
        results = evaluate_model(model, tok, data_dir=data, limit=size["items"], backend=backend, bootstrap_iters=0)
        out[backend] = {"seconds": time.perf_counter() - t0, "peak_memory_mb": peak_memory_mb(device),
                        "metrics": {t: metrics(r) for t, r in results["results"].items()}}  # fmt: skip
    out["speedup"] = out["lm-eval"]["seconds"] / out["hf-stack"]["seconds"]
    out["largest_metric_difference"] = max(
        abs(v - out["lm-eval"]["metrics"][t][k]) / max(1.0, abs(v))
        for t, ms in out["hf-stack"]["metrics"].items()
        for k, v in ms.items()
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (the tests run this)")
    parser.add_argument("--data", nargs="+", help="training text files (default: the public-domain corpus)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"), help="folder for the results")
    args = parser.parse_args(argv)

    import torch

    from hf_stack.data import train_tokenizer

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("error: no GPU here; run with --dry-run to check the script on CPU")
    device = torch.device("cpu" if dry else "cuda")
    size = SIZES["dry" if dry else "gpu"]
    if args.data:
        files = args.data
    else:
        from common import corpus_files

        files = corpus_files()
    with tempfile.TemporaryDirectory() as folder:
        from transformers import AutoTokenizer

        train_tokenizer(files, size["vocab"], Path(folder) / "tok")
        tok = AutoTokenizer.from_pretrained(Path(folder) / "tok")
        if dry:
            from hf_stack.evaluation.benchmarks import SAMPLES_DIR as data
        else:
            from eval import synthesise

            data = WORK / f"eval-data-{size['items']}"
            synthesise(data, size["items"])
        result = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)",
            "torch": torch.__version__,
            "sizes": size,
            "training": training(size, tok, files, device, dry),
            "scoring": scoring(size, tok, device, dry, data),
            "fsdp2_growth": fsdp2_growth(size, tok, files, dry),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check-{result['date'][:10]}{'-dry' if dry else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    t, s = result["training"], result["scoring"]
    print(f"training: grown phase {t['ratio_grown_phase_to_plain']:.2f}x the plain Trainer's tokens/s; "
          f"scoring: {s['speedup']:.2f}x HFLM, largest metric difference {s['largest_metric_difference']:.2g}")  # fmt: skip
    print(f"results: {path}")


if __name__ == "__main__":
    main()
