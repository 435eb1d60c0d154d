"""The prefix-sharing scorer against lm-eval's own HFLM: same models, data and batch size, side by side on CPU.

    .venv/bin/python bench/eval.py --items 60 --reps 2
    .venv/bin/python bench/eval.py --shapes 12x768x8192 --items 30 --reps 1   # one shape

Task files in each benchmark's schema are synthesised from the public-domain corpus (../shared/data/corpus/), so
prompt lengths are realistic and no benchmark item is copied. Each model shape (layers x hidden x vocabulary: a
Llama with a BPE tokenizer of that vocabulary trained on the corpus, fp32, 512 positions) is saved once under
bench/work/. Every (repetition, shape, backend) runs in its own process, interleaved, scoring all eight tasks
through `evaluate_model`; per task it records wall time, peak RSS (the kernel's high-water mark, reset before each
task, after a warm-up forward pass and a two-item evaluation outside the timings) and time per stage (tokenising, layout, forward, head, log-softmax: the scorer's own counters; for HFLM its
`tok_encode` and `_model_call`, the rest of `_loglikelihood_tokens` being the log-softmax and gathers). The script
asserts every metric is identical between the backends and writes everything to bench/results/eval.json.

    .venv/bin/python bench/eval.py --end-to-end --items 500 --reps 2 --shapes 4x256x8192,6x384x4096

What a user waits for: the whole `hf-stack eval` command beside the whole `lm_eval --model hf` command (lm-eval's
own CLI, the same eight tasks through `--include_path`: each task's shipped YAML with its dataset swapped for the
same local file), each a fresh process timed from start to exit, its peak RSS from the kernel (`wait4`), at two
sizes of work: a smoke call (`--limit 5`, as typed to see that it runs: results printed, nothing written) and
every item (results written: `--output`, where hf-stack also draws its bar chart, and `--output_path`), both at
batch 16 without BOS; on every item accuracies must be identical and perplexities equal to 1e-6. Then `EvalCallback` inside a real `StackingTrainer` run: the seconds of its first and later calls (every
step, 20 items per task, all eight tasks), beside one `evaluate_model` call of the same work. Everything goes to
bench/results/eval_end_to_end.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WORK, corpus_files, llama, metrics, peak_rss_mb, reset_peak_rss, save_results, tokenizer  # noqa: E402

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


SHAPES = ("6x384x4096", "4x256x8192", "12x768x8192")
BACKENDS = ("hf-stack", "lm-eval")


def model_folder(shape: str) -> Path:
    """The shape's model, built and saved once (random weights: timings do not depend on training)."""
    folder = WORK / f"eval-model-{shape}"
    if not (folder / "config.json").is_file():
        import torch

        layers, hidden, vocab = map(int, shape.split("x"))
        tok = tokenizer(vocab)
        torch.manual_seed(0)
        llama(tok, layers, hidden).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def timed(lm, f, stage: str):
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        out = f(*args, **kwargs)
        lm.stage_seconds[stage] += time.perf_counter() - t0
        if stage == "forward":  # HFLM's head projects every position its decoder ran
            lm.stage_tokens["forward"] += args[0].numel()
            lm.stage_tokens["head"] += args[0].numel()
        return out

    return call


def worker(shape: str, backend: str, batch_size: int, data: Path) -> dict:
    """One backend, one shape, every task: timings, peaks, stages and metrics, in this (fresh) process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_stack.evaluation import harness
    from hf_stack.evaluation.benchmarks import TASKS

    harness._task_manager()  # index lm-eval's tasks once, outside the timings
    folder = model_folder(shape)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():  # a process's first forward passes set up threads and kernels: outside the timings
        for _ in range(2):
            model(torch.zeros((16, 64), dtype=torch.long))
    made = []
    real_make_lm = harness.make_lm

    def make_lm(*args, **kwargs):
        lm = real_make_lm(*args, **kwargs)
        if backend == "lm-eval":  # HFLM has no stage counters: time its tokenising and forward calls
            lm.stage_seconds = {"tokenise": 0.0, "forward": 0.0}
            lm.stage_tokens = {"forward": 0, "head": 0}
            for name, stage in (("tok_encode", "tokenise"), ("_model_call", "forward")):
                setattr(lm, name, timed(lm, getattr(lm, name), stage))
        made.append(lm)
        return lm

    harness.make_lm = make_lm
    # a process's first evaluation imports and sets up lm-eval's and datasets' machinery: outside the timings too
    harness.evaluate_model(model, tok, tasks="piqa", data_dir=data, limit=2, backend=backend, bootstrap_iters=0)
    out = {}
    for task in TASKS:
        reset_peak_rss()
        t0 = time.perf_counter()
        r = harness.evaluate_model(model, tok, tasks=task, data_dir=data, batch_size=batch_size, backend=backend,
                                   bootstrap_iters=0)  # fmt: skip
        wall = time.perf_counter() - t0
        stages, tokens = dict(made[-1].stage_seconds), dict(made[-1].stage_tokens)
        if backend == "lm-eval":
            stages["log-softmax and gathers"] = max(0.0, wall - sum(stages.values()))
        out[task] = {"seconds": wall, "peak_rss_mb": peak_rss_mb(), "stages": stages, "tokens": tokens,
                     "metrics": metrics(r["results"][task])}  # fmt: skip
    return out


def lm_eval_tasks(data: Path) -> tuple[Path, list[str]]:
    """The eight tasks for plain `lm_eval --include_path`: each shipped YAML included, its data swapped for `data`'s
    file (what `hf-stack eval --data-dir` does through its run group)."""
    import yaml

    from hf_stack.evaluation import harness
    from hf_stack.evaluation.benchmarks import TASKS

    folder = data.with_name(data.name + "-lm-eval-tasks")
    folder.mkdir(exist_ok=True)
    index = harness._task_manager()[0].task_index
    for task in TASKS:
        cfg = index[task].cfg
        split_key = "test_split" if cfg.get("test_split") else "validation_split"
        spec = {"include": str(index[task].yaml_path), "task": f"local_{task}", "tag": [], "dataset_path": "json",
                "dataset_name": None, "training_split": None, "validation_split": None, "test_split": None,
                "fewshot_split": None, split_key: cfg[split_key],
                "dataset_kwargs": {"data_files": {cfg[split_key]: str((data / f"{task}.jsonl").resolve())}}}  # fmt: skip
        (folder / f"local_{task}.yaml").write_text(yaml.safe_dump(spec))
    return folder, [f"local_{t}" for t in TASKS]


# Starts the command from a small process and reports its rusage: a child's peak RSS starts at its parent's RSS at
# fork (the kernel carries the old address space's high-water mark over `exec`), and this script's is large.
LAUNCHER = """import os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - t0, usage.ru_maxrss, os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


def run_command(cmd: list, out: Path) -> dict:
    """One command in a fresh process: its wall seconds (start to exit) and peak RSS (the kernel's, for it alone)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with open(out.with_suffix(".log"), "w") as log:
        p = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *map(str, cmd)], stdout=log,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=out.parent)  # fmt: skip
    log_text = out.with_suffix(".log").read_text()
    *_, last = p.stderr.strip().splitlines() or [""]
    wall, maxrss, code = last.split()
    if p.returncode or int(code):
        raise SystemExit(f"{cmd[0]} failed; see {out.with_suffix('.log')}\n{p.stderr[-2000:]}{log_text[-2000:]}")
    return {"seconds": float(wall), "peak_rss_mb": int(maxrss) / 1024}


def end_to_end(args) -> None:
    from hf_stack.evaluation.benchmarks import TASKS

    bin_dir = Path(sys.executable).parent
    data = WORK / f"eval-data-{args.items}"
    synthesise(data, args.items)
    tasks_dir, local_tasks = lm_eval_tasks(data)
    shapes = args.shapes.split(",")
    sizes = {"smoke (--limit 5)": 5, f"all {args.items} items": None}
    runs: dict = {s: {z: {b: [] for b in BACKENDS} for z in sizes} for s in shapes}
    out_dir = WORK / "eval-end-to-end"
    out_dir.mkdir(exist_ok=True)
    for rep in range(args.reps):
        for shape in shapes:
            model = model_folder(shape)
            for size, limit in sizes.items():
                extra = ["--limit", limit] if limit else []
                for backend in BACKENDS:
                    out = out_dir / f"{shape}-{limit or 'all'}-{backend}"
                    if backend == "hf-stack":
                        cmd = [bin_dir / "hf-stack", "eval", model, "--data-dir", data, "--batch-size", args.batch_size,
                               *extra, *([] if limit else ["--output", out.with_suffix(".json")])]  # fmt: skip
                    else:
                        cmd = [bin_dir / "lm_eval", "--model", "hf", "--model_args",
                               f"pretrained={model},dtype=float32,add_bos_token=False", "--include_path", tasks_dir,
                               "--tasks", ",".join(local_tasks), "--batch_size", args.batch_size, "--device", "cpu",
                               *extra, *([] if limit else ["--output_path", out])]  # fmt: skip
                    r = run_command(cmd, out)
                    if not limit:  # the metrics, from the results files
                        found = (
                            [out.with_suffix(".json")]
                            if backend == "hf-stack"
                            else sorted(out.glob("*/results_*.json"))
                        )
                        results = json.loads(found[-1].read_text())["results"]
                        r["metrics"] = {
                            t: metrics(results[t if backend == "hf-stack" else f"local_{t}"]) for t in TASKS
                        }
                    runs[shape][size][backend].append(r)
                    print(f"rep {rep + 1}/{args.reps} {shape} {size} {backend}: {r['seconds']:.1f} s, "
                          f"{r['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    summary = {}
    print(
        "\n| shape | work | hf-stack eval | lm_eval --model hf | speed-up | peak RSS ratio |\n|---|---|---|---|---|---|"
    )
    for shape in shapes:
        for size in sizes:
            ours, theirs = runs[shape][size]["hf-stack"], runs[shape][size]["lm-eval"]
            for task in TASKS if "metrics" in ours[0] else ():  # accuracies identical; perplexities to 1e-6
                a, b = ours[0]["metrics"][task], theirs[0]["metrics"][task]
                assert a.keys() == b.keys() and all(
                    a[k] == b[k] if k.startswith("acc") else abs(a[k] - b[k]) <= 1e-6 * abs(b[k]) for k in a
                ), (shape, size, task, a, b)
            row = {b: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mb")}
                   for b, rs in (("hf-stack", ours), ("lm-eval", theirs))}  # fmt: skip
            row["speedup"] = row["lm-eval"]["seconds"] / row["hf-stack"]["seconds"]
            row["peak_rss_ratio"] = row["hf-stack"]["peak_rss_mb"] / row["lm-eval"]["peak_rss_mb"]
            summary.setdefault(shape, {})[size] = row
            print(f"| {shape} | {size} | {row['hf-stack']['seconds']:.1f} s, {row['hf-stack']['peak_rss_mb']:.0f} MB | "
                  f"{row['lm-eval']['seconds']:.1f} s, {row['lm-eval']['peak_rss_mb']:.0f} MB | {row['speedup']:.2f}x | "
                  f"{row['peak_rss_ratio']:.2f} |")  # fmt: skip
    calls = {shape: callback_calls(shape, args.items) for shape in shapes}
    print("\n| shape | EvalCallback first call | later calls (median) | first / later | of a call: forward, head, "
          "log-softmax | one evaluate_model call |\n|---|---|---|---|---|---|")  # fmt: skip
    for shape, c in calls.items():
        compute = sum(
            v for k, v in c["scorer_stage_seconds_per_call"].items() if k in ("forward", "head", "log-softmax")
        )
        print(f"| {shape} | {c['calls'][0]:.2f} s | {c['later']:.2f} s | {c['calls'][0] / c['later']:.2f}x | "
              f"{compute:.2f} s | {c['evaluate_model']:.2f} s |")  # fmt: skip
    save_results("eval_end_to_end", {"settings": vars(args), "runs": runs, "summary": summary, "callback": calls})


def callback_calls(shape: str, items: int) -> dict:
    """`EvalCallback` at every step of a real `StackingTrainer` run (in a fresh process): each call's seconds."""
    cmd = [sys.executable, __file__, "--callback-worker", shape, "--items", str(items)]
    p = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    )
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def callback_worker(shape: str, data: Path, calls: int = 4, limit: int = 20) -> dict:
    import shutil

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_stack import EvalCallback, StackingTrainer, StackingTrainingArguments
    from hf_stack.evaluation.harness import evaluate_model

    folder, run = model_folder(shape), WORK / "eval-callback-run"
    shutil.rmtree(run, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = torch.randint(0, len(tok), (calls * 4, 128), generator=torch.Generator().manual_seed(0)).tolist()
    args = StackingTrainingArguments(str(run), max_tokens=128 * 4 * calls,
                                     per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True,
                                     save_strategy="no", learning_rate=1e-4)  # fmt: skip
    trainer = StackingTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows})
    )
    cb = EvalCallback(tok, data_dir=data, limit=limit, every_n_steps=1, trainer=trainer)
    trainer.add_callback(cb)
    trainer.train()
    seconds = [h["bench/seconds"] for h in cb.history]
    stages = {k: v / len(seconds) for k, v in cb._lm[1].stage_seconds.items()}  # the scorer's, per call
    start = time.perf_counter()  # what each call cost when the callback called evaluate_model
    evaluate_model(model, tok, data_dir=data, limit=limit, bootstrap_iters=0)
    return {"calls": seconds, "later": statistics.median(seconds[1:]), "evaluate_model": time.perf_counter() - start,
            "limit": limit, "scorer_stage_seconds_per_call": stages}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="layers x hidden x vocabulary, comma-separated")
    parser.add_argument("--end-to-end", action="store_true", help="whole CLI calls and EvalCallback calls")
    parser.add_argument("--worker", nargs=2, metavar=("SHAPE", "BACKEND"), help=argparse.SUPPRESS)
    parser.add_argument("--callback-worker", metavar="SHAPE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callback_worker:
        print(json.dumps(callback_worker(args.callback_worker, WORK / f"eval-data-{args.items}")))
        return
    if args.end_to_end:
        end_to_end(args)
        return
    data = WORK / "eval-data"
    if args.worker:
        print(json.dumps(worker(*args.worker, args.batch_size, data)))
        return

    from hf_stack.evaluation.benchmarks import TASKS

    synthesise(data, args.items)
    shapes = args.shapes.split(",")
    for shape in shapes:
        model_folder(shape)
    runs: dict = {s: {b: [] for b in BACKENDS} for s in shapes}
    for rep in range(args.reps):
        for shape in shapes:
            for backend in BACKENDS:
                cmd = [sys.executable, __file__, "--worker", shape, backend, "--items", str(args.items),
                       "--batch-size", str(args.batch_size)]  # fmt: skip
                p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                if p.returncode:
                    raise SystemExit(p.stderr[-3000:])
                runs[shape][backend].append(json.loads(p.stdout.strip().splitlines()[-1]))
                total = sum(t["seconds"] for t in runs[shape][backend][-1].values())
                print(f"rep {rep + 1}/{args.reps} {shape} {backend}: {total:.1f} s", flush=True)
    summary = {}
    for shape in shapes:
        ours_runs, ref_runs = runs[shape]["hf-stack"], runs[shape]["lm-eval"]
        for task in TASKS:
            a, b = ours_runs[0][task]["metrics"], ref_runs[0][task]["metrics"]
            # accuracies must match exactly; perplexities (exp of a mean) to float precision
            assert a.keys() == b.keys() and all(
                a[k] == b[k] if k.startswith("acc") else abs(a[k] - b[k]) <= 1e-6 * abs(b[k]) for k in a
            ), (shape, task, a, b)

        def med(rs, task, key):
            return statistics.median(r[task][key] for r in rs)

        rows = {t: {b: {"seconds": med(rs, t, "seconds"), "peak_rss_mb": med(rs, t, "peak_rss_mb")}
                    for b, rs in (("hf-stack", ours_runs), ("lm-eval", ref_runs))} for t in TASKS}  # fmt: skip
        print(f"\n### {shape} (layers x hidden x vocab), {args.items} items per task, batch {args.batch_size}, "
              f"medians of {args.reps}; accuracies identical, perplexities within 1e-6\n")  # fmt: skip
        print("| task | hf-stack s | HFLM s | speed-up | hf-stack peak MB | HFLM peak MB | memory ratio |")
        print("|---|---|---|---|---|---|---|")
        for t in TASKS:
            o, r = rows[t]["hf-stack"], rows[t]["lm-eval"]
            print(f"| {t} | {o['seconds']:.2f} | {r['seconds']:.2f} | {r['seconds'] / o['seconds']:.2f}x | "
                  f"{o['peak_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {o['peak_rss_mb'] / r['peak_rss_mb']:.2f} |")  # fmt: skip
        subsets = {"multiple choice": MULTIPLE_CHOICE, "all eight": TASKS}
        ratios = {}
        for label, subset in subsets.items():
            ours = sum(rows[t]["hf-stack"]["seconds"] for t in subset)
            theirs = sum(rows[t]["lm-eval"]["seconds"] for t in subset)
            ratios[label] = theirs / ours
            print(f"| **{label}** | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x | | | |")
        peak = max(rows[t]["hf-stack"]["peak_rss_mb"] for t in TASKS) / max(
            rows[t]["lm-eval"]["peak_rss_mb"] for t in TASKS
        )
        print(f"\npeak RSS over the eight, hf-stack / HFLM: {peak:.2f}")
        print("\nstages, seconds summed over the eight (first repetition):")
        for b, rs in (("hf-stack", ours_runs), ("lm-eval", ref_runs)):
            stages: dict[str, float] = {}
            for t in TASKS:
                for k, v in rs[0][t]["stages"].items():
                    stages[k] = stages.get(k, 0.0) + v
            print(f"- {b}: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        print("\npositions through the decoder (padding included) / the head, summed over the eight:")
        for b, rs in (("hf-stack", ours_runs), ("lm-eval", ref_runs)):
            n_fwd = sum(rs[0][t]["tokens"]["forward"] for t in TASKS)
            n_head = sum(rs[0][t]["tokens"]["head"] for t in TASKS)
            print(f"- {b}: {n_fwd} / {n_head}")
        summary[shape] = {"per_task": rows, "ratio_all": ratios["all eight"],
                          "ratio_multiple_choice": ratios["multiple choice"], "peak_rss_ratio": peak}  # fmt: skip
    save_results("eval", {"settings": vars(args), "runs": runs, "summary": summary})


if __name__ == "__main__":
    main()
