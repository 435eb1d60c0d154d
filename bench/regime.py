"""The regime map: where growth stops paying, from cooldown ladders (hf_stack.analysis.regime's protocol).

    .venv/bin/python bench/regime.py [--recipe bench/regime.yaml] [--targets T1 ...] [--workers 2]

Every arm's per-step log and every ladder rung go to bench/results/<recipe>.json, the tables to stdout, the plot to
bench/results/<recipe>.png. A stopped run resumes: finished arms are read back from
bench/work/<recipe>/runs/*/arm_result.json, and a stopped ladder continues from its last decay-start checkpoint
(finished branches kept).
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
    parser.add_argument("--recipe", default=str(Path(__file__).with_name("regime.yaml")))
    parser.add_argument("--targets", nargs="*", help="Run only these targets (by name).")
    parser.add_argument("--workers", type=int, help="Worker processes (default: the recipe's, 2).")
    args = parser.parse_args()

    from hf_stack.analysis.regime import compact_map, describe_regime, plot_regime, run_regime

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    if args.workers:
        recipe["workers"] = args.workers
    name = Path(args.recipe).stem
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    path = results / f"{name}.json"

    def write(result: dict) -> None:
        """As each target finishes; targets of an earlier call that this one did not run are kept."""
        kept = json.loads(path.read_text())["targets"] if path.is_file() else []
        names = {t["name"] for t in result["targets"]}
        merged = {**result, "targets": [t for t in kept if t["name"] not in names] + result["targets"]}
        order = [t["name"] for t in result["recipe"]["targets"]]
        merged["targets"].sort(key=lambda t: order.index(t["name"]) if t["name"] in order else len(order))
        path.write_text(json.dumps(merged, indent=1, default=str))
        shipped = Path(__file__).resolve().parent.parent / "hf_stack" / "recipes" / "regime_map.json"
        shipped.write_text(json.dumps(compact_map(merged), indent=1) + "\n")  # what `hf-stack when` prints
        plot_regime(merged, results / f"{name}.png")
        print("\n" + describe_regime(merged), flush=True)
        print(f"\nraw results: bench/results/{name}.json; plot: bench/results/{name}.png", flush=True)

    run_regime(recipe, WORK / name, corpus_files(), only=args.targets, on_update=write)


if __name__ == "__main__":
    main()
