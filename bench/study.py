"""The fair growth-vs-scratch study: G_stack against scratch under one protocol for every arm.

    .venv/bin/python bench/study.py [--recipe bench/study.yaml] [--workers 2]     # about an hour on 2 CPU cores

`hf_stack.analysis.study.run_study` (its docstring has the protocol): one learning-rate sweep per role, three seeds, scratch
at several budgets each with its own complete schedule, speed-ups interpolated between scratch's annealed end points
in all-parameter FLOPs, non-embedding FLOPs and wall-clock seconds, the small model's health beside scratch's and a
unigram baseline's, and the ablation rows of the recipe. Every arm's per-step log goes to
bench/results/<recipe>.json, the table to stdout, the plot to bench/results/<recipe>.png. A stopped run resumes:
finished arms are read back from bench/work/<recipe>/runs/*/arm_result.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, corpus_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(Path(__file__).with_name("study.yaml")))
    parser.add_argument("--workers", type=int, help="Worker processes (default: the recipe's, 2).")
    args = parser.parse_args()

    from hf_stack.analysis.study import describe_study, plot_study, run_study

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    if args.workers:
        recipe["workers"] = args.workers
    name = Path(args.recipe).stem
    study = run_study(recipe, WORK / name, corpus_files())
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(study, indent=1, default=str))
    plot_study(study, results / f"{name}.png")
    print("\n" + describe_study(study))
    print(f"\nraw results: bench/results/{name}.json; plot: bench/results/{name}.png")


if __name__ == "__main__":
    main()
