"""The paper's headline at laptop scale: G_stack (grow x4 after d tokens, continue) against training from scratch.

    .venv/bin/python bench/speedup.py [--recipe bench/speedup.yaml]     # about 25 minutes on 2 CPU cores

The demo's experiment (`hf_stack.demo.run_experiment`) on the public-domain corpus in ../shared/data/corpus/
(Austen, the King James Bible, Shakespeare) with the settings in bench/speedup.yaml: a 2-layer Llama (hidden 128)
trained for d tokens, grown x4 with G_stack to 8 layers and trained on with a fresh AdamW and a re-warmed cosine
schedule; beside it the same 8-layer model from random init with 1.2x the grown run's FLOPs. The last 2% of the
token stream is held out for validation loss. Speed-up as in the paper: FLOPs scratch needs to reach the grown
run's final validation loss, over the grown run's FLOPs, minus one (FLOPs = 6 N D, embeddings included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, corpus_files  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(Path(__file__).with_name("speedup.yaml")))
    args = parser.parse_args()

    from hf_stack.demo import run_experiment

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    out = WORK / "speedup"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    r = run_experiment(recipe, out, data=corpus_files())
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    name = Path(args.recipe).stem
    shutil.copy(out / "loss_vs_flops.png", results / f"{name}.png")
    (results / f"{name}.json").write_text(json.dumps(r, indent=2, default=str))
    from hf_stack.compare import describe_speedup

    print(f"\ngrown run: final eval_loss {r['grown_final_loss']:.4f} at {r['grown_flops']:.3g} FLOPs; scratch at the "
          f"same FLOPs: {r['scratch_loss_at_equal_flops']:.4f}\n{describe_speedup(r)}")  # fmt: skip


if __name__ == "__main__":
    main()
