"""Stage 4, benchmarks as data: the paper's eight tasks, their Hub datasets, the metric each reports, and the
model-index entries they become; no lm-eval, torch or transformers import, so cards and the Hub stage read it."""

from __future__ import annotations

from pathlib import Path

from ..errors import HfStackError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SAMPLES_DIR = TASKS_DIR / "samples"
GROUP = "hf_stack_8"
TASKS = ("lambada_openai", "arc_challenge", "arc_easy", "logiqa", "piqa", "sciq", "winogrande", "wikitext")
# Fields each task's prompt and target read (the Hub datasets' own schemas).
REQUIRED_FIELDS = {
    "lambada_openai": ("text",),
    "arc_challenge": ("question", "choices", "answerKey"),
    "arc_easy": ("question", "choices", "answerKey"),
    "logiqa": ("label", "context", "question", "options"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "sciq": ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "wikitext": ("page",),
}
# Hub dataset, config and evaluated split of each task (lm-eval 0.4.13), for model-index entries.
DATASETS = {
    "lambada_openai": ("EleutherAI/lambada_openai", "default", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "logiqa": ("EleutherAI/logiqa", "logiqa", "test"),
    "piqa": ("baber/piqa", None, "validation"),
    "sciq": ("allenai/sciq", None, "test"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "wikitext": ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test"),
}
# The folder of lm-eval's own tasks (under `lm_eval/tasks/`) that defines each task: the only YAMLs a run indexes
# (indexing all of lm-eval's, some 15,000 tasks, costs seconds per process).
LM_EVAL_TASK_DIRS = {
    "lambada_openai": "lambada", "arc_challenge": "arc", "arc_easy": "arc", "logiqa": "logiqa", "piqa": "piqa",
    "sciq": "sciq", "winogrande": "winogrande", "wikitext": "wikitext",
}  # fmt: skip
# The metric the paper reports per task (accuracy; perplexity for wikitext).
HEADLINE = {t: "acc,none" for t in TASKS} | {"wikitext": "word_perplexity,none"}


def parse_tasks(tasks: str | list[str] | None) -> list[str]:
    if tasks is None or tasks == GROUP or tasks == [GROUP]:
        return list(TASKS)
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [t for t in names if t not in TASKS and t != GROUP]
    if unknown or not names:
        raise HfStackError(f"unknown task {', '.join(unknown) or '(none)'}; choose from: {GROUP}, {', '.join(TASKS)}")
    return list(TASKS) if GROUP in names else names


def headline(results: dict) -> dict[str, float]:
    """Task -> the paper's metric (accuracy, or word perplexity for wikitext), plus the seven-task average."""
    out = {t: results["results"][t][m] for t, m in HEADLINE.items() if t in results["results"]}
    accs = [v for t, v in out.items() if t != "wikitext"]
    if accs:
        out["average (acc)"] = sum(accs) / len(accs)
    return out


def official(results: dict) -> bool:
    """Whether `results` scored every item of each task's official split (the Hub dataset, no `--limit`)."""
    settings = results.get("hf_stack", {})
    return settings.get("data_dir") is None and settings.get("limit") is None


def results_table(results: dict, title: str = "hf_stack evaluation") -> str:
    """A markdown table of the headline metrics (for cards and logs), labelled when not on the official splits."""
    rows = ["| task | metric | value |", "|---|---|---|"]
    for task, value in headline(results).items():
        metric = "word perplexity" if task == "wikitext" else "accuracy"
        rows.append(f"| {task} | {metric} | {value:.4f} |")
    if not official(results):
        settings = results.get("hf_stack", {})
        scope = [f"local files ({settings['data_dir']})"] if settings.get("data_dir") else []
        scope += [f"the first {settings['limit']} items of each task"] if settings.get("limit") else []
        rows += ["", f"Not the official splits: scored on {' and '.join(scope)}, so not in the model-index."]
    return "\n".join(rows)


def eval_results(results: dict) -> list | None:
    """`huggingface_hub.EvalResult`s for the card's model-index, one per headline metric; None (leave the
    model-index as it is) unless every item of the official split was scored, since the index names that split."""
    from huggingface_hub import EvalResult

    if not official(results):
        return None
    out = []
    for task, key in HEADLINE.items():
        if task not in results.get("results", {}):
            continue
        metric = key.split(",")[0]
        dataset_id, config, split = DATASETS[task]
        out.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=dataset_id,
                dataset_name=task,
                dataset_config=config,
                dataset_split=split,
                metric_type=metric,
                metric_name=metric,
                metric_value=float(results["results"][task][key]),
                source_name="hf_stack (lm-evaluation-harness, zero-shot)",
                source_url="https://github.com/EleutherAI/lm-evaluation-harness",
            )  # fmt: skip
        )
    return out
