"""The prefix-sharing scorer against lm-eval's own HFLM: same model, data and batch size, side by side on CPU.

    .venv/bin/python bench/eval.py --items 100 --reps 2

Task files in each benchmark's schema are synthesised from the public-domain corpus (../shared/data/corpus/), so
prompt lengths are realistic and no benchmark item is copied; the model is a 6-layer Llama (hidden 384, about 14M parameters) with a BPE
tokenizer trained on the corpus. Both backends score every task through `evaluate_model`, interleaved; the
script asserts every metric is identical and reports wall-time ratios overall and on the multiple-choice tasks.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, corpus_files, llama, save_results, tokenizer  # noqa: E402

MULTIPLE_CHOICE = ("arc_challenge", "arc_easy", "logiqa", "piqa", "sciq", "winogrande")


def synthesise(folder: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    text = " ".join(Path(f).read_text(encoding="utf-8")[:400_000] for f in corpus_files())
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)) if 40 < len(s) < 240]
    words = text.split()

    def phrase(lo=2, hi=7):
        i = rng.randrange(len(words) - hi)
        return " ".join(words[i : i + rng.randint(lo, hi)])

    def sent():
        return rng.choice(sentences)

    folder.mkdir(parents=True, exist_ok=True)
    labels = ["A", "B", "C", "D"]
    rows = {
        "lambada_openai": [{"text": " ".join(sent() for _ in range(3))} for _ in range(n)],
        "arc_easy": [
            {
                "id": str(i),
                "question": sent(),
                "choices": {"text": [phrase() for _ in labels], "label": labels},
                "answerKey": rng.choice(labels),
            }
            for i in range(n)
        ],  # fmt: skip
        "piqa": [{"goal": sent(), "sol1": sent(), "sol2": sent(), "label": rng.randint(0, 1)} for _ in range(n)],
        "sciq": [
            {
                "question": sent(),
                "correct_answer": phrase(1, 3),
                "distractor1": phrase(1, 3),
                "distractor2": phrase(1, 3),
                "distractor3": phrase(1, 3),
                "support": " ".join(sent() for _ in range(4)),
            }
            for _ in range(n)
        ],  # fmt: skip
        "winogrande": [],
        "logiqa": [
            {
                "label": rng.choice("abcd"),
                "context": " ".join(sent() for _ in range(4)),
                "question": sent(),
                "options": [sent() for _ in range(4)],
            }
            for _ in range(n)
        ],  # fmt: skip
        "wikitext": [
            {"page": " = Page = \n\n " + " ".join(sent() for _ in range(25)) + " \n"} for _ in range(max(2, n // 10))
        ],
    }
    rows["arc_challenge"] = rows["arc_easy"][::-1]
    while len(rows["winogrande"]) < n:
        s = sent().split()
        k = rng.randrange(1, len(s) - 1)
        rows["winogrande"].append({"sentence": " ".join(s[:k] + ["_"] + s[k + 1 :]), "option1": phrase(1, 2),
                                   "option2": phrase(1, 2), "answer": rng.choice("12")})  # fmt: skip
    for task, items in rows.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    args = parser.parse_args()

    import torch

    from hf_stack.evaluation.benchmarks import TASKS
    from hf_stack.evaluation.harness import _task_manager, evaluate_model

    _task_manager()  # index lm-eval's tasks once, outside the timings (both backends share it)
    torch.manual_seed(0)
    tok = tokenizer()
    model = llama(tok, args.layers, args.hidden).eval()
    data = WORK / "eval-data"
    synthesise(data, args.items)
    times: dict[str, dict[str, list[float]]] = {b: {t: [] for t in TASKS} for b in ("hf-stack", "lm-eval")}
    metrics = {}
    for rep in range(args.reps):
        for task in TASKS:
            for backend in times:
                t0 = time.perf_counter()
                r = evaluate_model(model, tok, tasks=task, data_dir=data, batch_size=args.batch_size, backend=backend,
                                   bootstrap_iters=0)  # fmt: skip
                times[backend][task].append(time.perf_counter() - t0)
                values = {k: v for k, v in r["results"][task].items() if k.endswith(",none") and "stderr" not in k}
                metrics.setdefault((task, backend), values)
                assert metrics[(task, backend)] == values
        print(f"rep {rep + 1}/{args.reps} done", flush=True)
    for task in TASKS:
        a, b = metrics[(task, "hf-stack")], metrics[(task, "lm-eval")]
        # accuracies must match exactly; perplexities (exp of a mean) to float precision
        assert a.keys() == b.keys() and all(
            a[k] == b[k] if k.startswith("acc") else abs(a[k] - b[k]) <= 1e-6 * abs(b[k]) for k in a
        ), (task, a, b)
    med = {b: {t: statistics.median(v) for t, v in per.items()} for b, per in times.items()}
    print(
        f"\n{args.items} items per task, batch size {args.batch_size}, medians of {args.reps}; accuracies identical, perplexities within 1e-6\n"
    )
    print("| task | hf-stack s | lm-eval HFLM s | speed-up |\n|---|---|---|---|")
    for t in TASKS:
        print(
            f"| {t} | {med['hf-stack'][t]:.2f} | {med['lm-eval'][t]:.2f} | {med['lm-eval'][t] / med['hf-stack'][t]:.2f}x |"
        )
    for label, subset in (("multiple choice", MULTIPLE_CHOICE), ("all eight", TASKS)):
        ours, theirs = sum(med["hf-stack"][t] for t in subset), sum(med["lm-eval"][t] for t in subset)
        print(f"| **{label}** | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |")
    save_results("eval", {"settings": vars(args), "seconds": times, "medians": med,
                          "ratio_all": sum(med["lm-eval"].values()) / sum(med["hf-stack"].values()),
                          "ratio_multiple_choice": sum(med["lm-eval"][t] for t in MULTIPLE_CHOICE)
                          / sum(med["hf-stack"][t] for t in MULTIPLE_CHOICE)})  # fmt: skip


if __name__ == "__main__":
    main()
