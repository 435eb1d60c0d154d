"""Stage 4, evaluation: the paper's eight benchmarks scored by lm-evaluation-harness, from the Hub or local files.

The task list is data (`hf_stack/tasks/hf_stack_8.yaml`); lm-eval's own task definitions, metrics and results
JSON are used unchanged. `--data-dir` swaps each task's dataset for `DIR/<task>.jsonl|json|parquet` (rows in the
Hub dataset's schema) through lm-eval's group-level task overrides, so prompts and metrics stay identical.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import yaml

from ..errors import HfStackError, error_reason
from .benchmarks import GROUP, LM_EVAL_TASK_DIRS, REQUIRED_FIELDS, TASKS_DIR, headline, parse_tasks

# The default: no BOS, as the paper-era harness; lm-eval >= 0.4.9.2 follows the tokenizer (`add_bos_token=None`).
ADD_BOS_TOKEN = False
BACKENDS = ("hf-stack", "lm-eval")


_RUN_GROUP = "hf_stack_run"
_MANAGER: dict = {}


def _task_manager():
    """One lm-eval TaskManager per process, indexing only the folders of lm-eval's tasks that define the eight
    (`LM_EVAL_TASK_DIRS`) and a private folder holding the run's group YAML, which each evaluation rewrites (lm-eval
    reads it when the group is built)."""
    if not _MANAGER:
        import atexit
        import shutil

        import lm_eval.tasks
        from lm_eval.tasks import TaskManager

        folder = Path(tempfile.mkdtemp(prefix="hf_stack_tasks-"))
        atexit.register(shutil.rmtree, folder, True)
        (folder / f"{_RUN_GROUP}.yaml").write_text(yaml.safe_dump({"group": _RUN_GROUP, "task": ["arc_easy"]}))
        shipped = Path(lm_eval.tasks.__file__).parent
        paths = [str(folder), *(str(shipped / d) for d in sorted(set(LM_EVAL_TASK_DIRS.values())))]
        _MANAGER.update(manager=TaskManager(include_path=paths, include_defaults=False), folder=folder)
    return _MANAGER["manager"], _MANAGER["folder"]


def _memoize_lm_eval_overheads() -> None:
    """Costs of every lm-eval run that do not depend on the model, paid once per process instead: lm-eval compiles a
    task's Jinja template anew for every document it renders, and collects the results' environment info (`pip
    list`, `git` and friends: 0.3 s) on every `simple_evaluate`; `EvalCallback` calls it repeatedly. The environment
    is collected in a thread started at the first call, before the model loads, so a one-shot `hf-stack eval` does
    not wait for it either (the thread mostly waits on subprocesses). The rendered prompts are the same; the
    environment info is the first call's (a later change of the working directory's git commit is not seen).
    Process-wide: other lm-eval callers in the process share all three, and lm-eval's bootstrap of perplexity's
    standard error vectorised (`_bootstrap_stderr`)."""
    import threading

    import lm_eval.api.metrics
    import lm_eval.evaluator
    import lm_eval.loggers.utils
    import lm_eval.utils

    if getattr(lm_eval.utils.apply_template, "_hf_stack", False):
        return
    compile_template = lru_cache(maxsize=4096)(lm_eval.utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compile_template(template).render(**doc)

    collect_env, git_hash = lm_eval.loggers.utils.add_env_info, lm_eval.evaluator.get_git_commit_hash
    env_info: dict = {}

    def collect() -> None:
        env_info["git_hash"] = git_hash()
        collect_env(env_info)

    collecting = threading.Thread(target=collect, name="hf_stack-env-info", daemon=True)
    collecting.start()

    def add_env_info(storage: dict) -> None:
        collecting.join()
        storage.update({k: v for k, v in env_info.items() if k != "git_hash"})

    def get_git_commit_hash():
        collecting.join()
        return env_info.get("git_hash")  # None, as lm-eval's own, if collecting failed

    apply_template._hf_stack = True
    lm_eval.utils.apply_template = apply_template
    lm_eval.api.metrics.bootstrap_stderr = _bootstrap_stderr(lm_eval.api.metrics.bootstrap_stderr)
    lm_eval.evaluator.add_env_info = add_env_info
    lm_eval.evaluator.get_git_commit_hash = get_git_commit_hash


def _bootstrap_stderr(bootstrap_stderr):
    """lm-eval's `bootstrap_stderr` with perplexity's resamples drawn and reduced in numpy: the same draws (chunk i's
    `random.Random(i).choices`, from the same Mersenne Twister state and the same `floor(random() * n)`), the same
    sequential sums as Python < 3.12's `sum`, so the same standard error bit for bit), without lm-eval's process pool
    over pure-Python loops (lambada at 500 items: 1.7 s -> 0.6 s on 2 cores). Other statistics, and Python >= 3.12
    (whose `sum` of floats is compensated), go to lm-eval's own."""
    import math
    import random
    import sys

    import numpy as np
    from lm_eval.api.metrics import perplexity, sample_stddev

    if sys.version_info >= (3, 12):  # Python's float sum is compensated from 3.12: numpy's cumsum is not it
        return bootstrap_stderr

    def fast(f, xs, iters):
        if f is not perplexity:
            return bootstrap_stderr(f, xs, iters)
        values, chunk, out = np.asarray(xs, dtype=np.float64), min(1000, iters), []
        for i in range(iters // chunk):
            _, state, _ = random.Random(i).getstate()
            draws = np.random.RandomState()
            draws.set_state(("MT19937", np.array(state[:-1], dtype=np.uint32), state[-1]))
            picks = np.floor(draws.random_sample((chunk, len(values))) * float(len(values))).astype(np.intp)
            sums = np.cumsum(values[picks], axis=1)[:, -1]  # left to right, as Python's sum
            out.extend(math.exp(-s / len(values)) for s in sums.tolist())
        return sample_stddev(out)

    fast.__wrapped__ = bootstrap_stderr
    return fast


def _data_file(data_dir: Path, task: str) -> tuple[str, Path]:
    for suffix, builder in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet")):
        path = data_dir / f"{task}{suffix}"
        if path.is_file():
            return builder, path
    raise HfStackError(f"--data-dir {data_dir} has no {task}.jsonl (or .json / .parquet)")


def _check_fields(task: str, builder: str, path: Path) -> None:
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a check: nothing to show, and a refusal must stay one line
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        raise HfStackError(f"cannot read {path}: {error_reason(e)}") from None
    finally:
        if shown:
            datasets.enable_progress_bars()
    missing = [f for f in REQUIRED_FIELDS[task] if f not in ds.column_names]
    if missing or len(ds) == 0:
        raise HfStackError(f"{path} lacks the fields {task} needs: {missing or 'no rows'} (has {ds.column_names})")


def _task_specs(tasks: list[str], data_dir: Path | None) -> list:
    """Group children: the shipped group's entries, with datasets swapped for local files under `data_dir`."""
    shipped = yaml.safe_load((TASKS_DIR / f"{GROUP}.yaml").read_text())
    by_name = {(c if isinstance(c, str) else c["task"]): c for c in shipped["task"]}
    specs = []
    index = _task_manager()[0].task_index if data_dir is not None else None
    for task in tasks:
        spec = by_name[task]
        if data_dir is not None:
            builder, path = _data_file(data_dir, task)
            _check_fields(task, builder, path)
            cfg = index[task].cfg
            split_key = "test_split" if cfg.get("test_split") else "validation_split"
            split = cfg[split_key]
            spec = {"task": task, "dataset_path": builder, "dataset_name": None, "training_split": None,
                    "validation_split": None, "test_split": None, "fewshot_split": None, split_key: split,
                    "dataset_kwargs": {"data_files": {split: str(path.resolve())}}}  # fmt: skip
        specs.append(spec)
    return specs


def load_model(model, tokenizer=None, revision: str | None = None):
    """A loaded (model, tokenizer) from a folder or Hub id, or the given objects."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..checkpoints.source import resolve_source
        from ..plans.plan import check_source_shapes

        source = resolve_source(model, revision=revision)
        check_source_shapes(source.config, source.tensor_infos)  # from the headers, before any weight loads
        try:
            loaded = AutoModelForCausalLM.from_pretrained(source.folder, dtype="auto", trust_remote_code=False)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(source.folder)
        except Exception as e:
            raise HfStackError(f"{model} does not load as a causal LM: {error_reason(e)}") from None
        model = loaded
    elif tokenizer is None:
        raise HfStackError("pass the tokenizer with an in-memory model")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return model.eval(), tokenizer


def make_lm(model, tokenizer, backend: str = "hf-stack", batch_size: int = 16, max_length: int | None = None,
            add_bos_token: bool | None = ADD_BOS_TOKEN):  # fmt: skip
    """The lm-eval LM object: our prefix-sharing backend or lm-eval's own HFLM, same arguments."""
    if backend not in BACKENDS:
        raise HfStackError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    from lm_eval.models.huggingface import HFLM

    from .scorer import PrefixSharingLM

    cls = PrefixSharingLM if backend == "hf-stack" else HFLM
    return cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos_token,
               max_length=max_length)  # fmt: skip


def evaluate_model(
    model,
    tokenizer=None,
    *,
    tasks: str | list[str] | None = GROUP,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    backend: str = "hf-stack",
    output: str | os.PathLike | None = None,
    revision: str | None = None,
    bootstrap_iters: int = 100000,
    add_bos_token: bool | None = ADD_BOS_TOKEN,
) -> dict:
    """Score a model on the paper's eight benchmarks (or a subset) with lm-evaluation-harness, zero-shot.

    Args:
        model: a folder, a Hub id, or a loaded causal LM (then pass `tokenizer`).
        tokenizer: tokenizer (object or path) for an in-memory model.
        tasks: `"hf_stack_8"` (default), or task names / a comma-separated string.
        data_dir: read each task's evaluated split from `DIR/<task>.jsonl` (or .json / .parquet) instead of the Hub.
        limit: score only the first N documents of each task.
        batch_size: requests (HFLM) or packed rows (hf-stack) per forward pass.
        backend: `"hf-stack"` (prefix sharing, default) or `"lm-eval"` (lm-eval's HFLM, for cross-checks).
        output: write lm-eval's results JSON here, with a bar chart PNG beside it.
        revision: Hub revision when `model` is a Hub id.
        bootstrap_iters: lm-eval's bootstrap iterations for standard errors (0 skips them).
        add_bos_token: prepend BOS to every request: `False` (default) as the paper-era harness, `True`, or `None`
            for the tokenizer's own choice (plain `lm_eval` >= 0.4.9.2). Recorded in the results.

    Returns:
        lm-eval's results dict (`results`, `groups`, `configs`, ...), plus `hf_stack` settings (BOS, backend).

    Example:

    ```python
    >>> from hf_stack import evaluate_model
    >>> results = evaluate_model("./grown", tasks="hf_stack_8")  # doctest: +SKIP
    >>> results["results"]["piqa"]["acc,none"]  # doctest: +SKIP
    ```
    """
    names = parse_tasks(tasks)
    data_dir = Path(data_dir) if data_dir is not None else None
    if data_dir is not None and not data_dir.is_dir():
        raise HfStackError(f"--data-dir {data_dir} is not a folder")
    if limit is not None and limit < 1:
        raise HfStackError(f"limit must be at least 1, got {limit}")
    specs = _task_specs(names, data_dir)  # validates data before the model loads
    _memoize_lm_eval_overheads()  # starts collecting the environment info while the model loads
    model, tokenizer = load_model(model, tokenizer, revision)
    lm = make_lm(model, tokenizer, backend, batch_size, add_bos_token=add_bos_token)

    import lm_eval

    manager = _write_run_group(specs)
    results = _named(lm_eval.simple_evaluate(
        model=lm, tasks=[_RUN_GROUP], task_manager=manager, limit=limit, num_fewshot=0, log_samples=False,
        batch_size=batch_size, bootstrap_iters=bootstrap_iters,
    ))  # fmt: skip
    results["hf_stack"] = {"backend": backend, "add_bos_token": add_bos_token, "lm_eval_version": version("lm_eval"),
                           "data_dir": str(data_dir) if data_dir else None, "limit": limit, "batch_size": batch_size}  # fmt: skip
    if output is not None:
        write_results(results, output)
    return results


def _write_run_group(specs: list):
    """The run's group YAML (the tasks' specs and the paper's average) in the task manager's private folder."""
    _memoize_lm_eval_overheads()
    manager, folder = _task_manager()
    group = {"group": _RUN_GROUP, "task": specs, "metadata": {"version": 1.0},
             "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}]}  # fmt: skip
    (folder / f"{_RUN_GROUP}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return manager


def _named(results: dict) -> dict:
    """The run's group is the paper's average of the accuracies: named as the shipped group."""
    if _RUN_GROUP in results.get("groups", {}):
        results["groups"][GROUP] = {**results["groups"].pop(_RUN_GROUP), "alias": GROUP, "name": GROUP}
        results["results"].pop(_RUN_GROUP, None)
    return results


def load_tasks(tasks: str | list[str] | None = GROUP, data_dir: str | os.PathLike | None = None) -> dict:
    """lm-eval's task objects (documents loaded, zero-shot) for [`score_tasks`]: built once, scored many times.

    Args:
        tasks, data_dir: as for [`evaluate_model`].
    """
    data_dir = Path(data_dir) if data_dir is not None else None
    loaded = _write_run_group(_task_specs(parse_tasks(tasks), data_dir)).load([_RUN_GROUP])
    for task in loaded["tasks"].values():  # what simple_evaluate sets for num_fewshot=0
        task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
    return loaded


def score_tasks(lm, loaded: dict, limit: int | None = None, bootstrap_iters: int = 0) -> dict:
    """lm-eval's `evaluate` of `lm` (from [`make_lm`]) on tasks from [`load_tasks`]: the results (`results`,
    `groups`, ...) without `simple_evaluate`'s task loading and environment record."""
    from lm_eval.evaluator import evaluate

    return _named(evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False))


def write_results(results: dict, output: str | os.PathLike) -> Path:
    """lm-eval's JSON as it is, written atomically, and a bar chart PNG beside it."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    plot_results(results, output.with_suffix(".png"))
    os.replace(tmp, output)
    return output


def plot_results(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = {k: v for k, v in headline(results).items() if k != "wikitext"}
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(list(scores), [100 * v for v in scores.values()], color="#4c72b0")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    title = "zero-shot accuracy"
    if "wikitext" in results["results"]:
        title += f"; wikitext word perplexity {results['results']['wikitext']['word_perplexity,none']:.1f}"
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="hf_stack evaluation (zero-shot)")
    for col in ("task", "metric", "value"):
        table.add_column(col)
    for task, value in headline(results).items():
        table.add_row(task, "word perplexity" if task == "wikitext" else "accuracy", f"{value:.4f}")
    Console().print(table)
