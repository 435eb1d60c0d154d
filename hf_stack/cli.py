"""The `hf-stack` command line: one thin function per command over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import os
import sys
from pathlib import Path

from .data import VALIDATION_TOKENS
from .errors import HfStackError, error_reason
from .plans.config import StackedConfig, setting_type

GROW_EXAMPLES = """examples:
  hf-stack grow org/small --factor 4 -o grown                      # G_stack, g = 4 (the paper's default)
  hf-stack grow ./small --layers 30 --order interpolate --dry-run  # print the plan, write nothing
  hf-stack grow ./small --layer-map 0-5,0-5,2-3 -o grown --verify  # explicit map, check the result
  hf-stack grow ./small --factor 2 --operator zero -o grown        # function-preserving identity copies
  hf-stack grow ./small --operator direct --width-factor 2 --dry-run   # function-preserving split, 2x wider
  hf-stack grow ./small --operator zero --factor 2 --width-factor 2    # deeper and wider in one call
  hf-stack grow ./small --operator learn --factor 2 --learn-data 'text/*.txt' --learn-steps 100  # LiGO
  hf-stack grow org/small --factor 4 --push                        # to <your namespace>/small-stack-x4
"""
TRIAL_EXAMPLES = """examples:
  hf-stack trial ./small --data ./corpus/*.txt --candidates "factor=4" "factor=2" "operator=zero,factor=4" --steps 200 -o trial/
  hf-stack trial ./small --data ./corpus/*.txt --candidates order=stack order=interpolate order=middle
  hf-stack trial ./small --data ./corpus/*.txt --candidates factor=2 "operator=direct,width_factor=2" operator=learn,factor=2

Each candidate's run is trial/<candidate>/ (final/ and training_log.json); the best one continues as a normal run:
  hf-stack train --model trial/factor-4/final --data ./corpus/*.txt --max-tokens 8e6 -o run/
trial.json holds every row's raw numbers and total_flops, the trial's whole compute (add it to a speed-up's cost).
A learn candidate without learn_data trains its maps on --data.
"""
# The heavy libraries a command imports anyway, imported first with the collector off and then frozen: millions of
# objects that live until exit, which the collections during their import and at exit would only rescan (README
# "Evaluation": with lm-eval's environment thread, 6.5-6.8 s -> 4.3-4.8 s for a five-task `--limit 5` call).
HEAVY_IMPORTS = {"eval": ("torch", "transformers.modeling_utils", "lm_eval.evaluator", "lm_eval.tasks")}
# CLI spellings that differ from the dataclass field names.
FLAG_NAMES = {"num_layers": "--layers"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def add_dataclass_options(parser: argparse.ArgumentParser, cls) -> None:
    """Expose a dataclass's fields as options; the help text comes from the field metadata (documented once)."""
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag = FLAG_NAMES.get(f.name, "--" + f.name.replace("_", "-"))
        parser.add_argument(
            flag,
            dest=f.name,
            type=setting_type(f),
            default=None,
            choices=f.metadata.get("choices"),
            help=f.metadata.get("help"),
        )


def _dataclass_from_args(cls, args):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def add_hub_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", help="Hub branch, tag or commit of the source.")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login).")
    parser.add_argument("--cache-dir", help="Hub cache folder.")
    parser.add_argument(
        "--allow-pickle", action="store_true", help="Accept .bin weights (loaded with torch.load(weights_only=True))."
    )


def _default_output(source: str, stacked: StackedConfig) -> Path:
    name = Path(source.rstrip("/")).name or "model"
    parts = []
    if "depth" in stacked.directions:
        custom = stacked.layer_map is not None or stacked.num_layers is not None
        parts.append("grown" if custom else f"x{stacked.factor}")
    if "width" in stacked.directions:
        parts.append(f"w{stacked.width_factor:g}")
    return Path(f"{name}-{stacked.operator}-{'-'.join(parts)}")


def cmd_grow(args) -> int:
    stacked = _dataclass_from_args(StackedConfig, args)
    if args.dry_run:
        from .checkpoints.source import resolve_source_metadata
        from .plans.plan import build_plan

        source = resolve_source_metadata(
            args.source, revision=args.revision, token=args.token, cache_dir=args.cache_dir
        )
        plan = build_plan(source.config, source.tensor_infos, stacked)
        print(plan.describe())
        changed = {k: v for k, v in plan.target_config.items() if source.config.get(k) != v}
        print("config changes: " + ", ".join(f"{k}: {source.config.get(k)!r} -> {v!r}" for k, v in changed.items()))
        print("dry run: nothing written")
        return 0
    from .checkpoints.streaming import grow

    out = Path(args.output) if args.output else _default_output(args.source, stacked)
    plan = grow(
        args.source,
        out,
        stacked,
        revision=args.revision,
        token=args.token,
        cache_dir=args.cache_dir,
        allow_pickle=args.allow_pickle,
        allow_nonfinite=args.allow_nonfinite,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        verify=args.verify,
    )
    verified = ", verified" if args.verify else ""
    src_note = out_note = ""
    if plan.width:
        hidden = plan.width["hidden_out"]
        src_note, out_note = f", hidden {hidden.source_size}", f", hidden {hidden.target_size}"
    print(
        f"grew {args.source} ({plan.source_num_layers} layers{src_note}) -> {out} "
        f"({plan.num_layers} layers{out_note}{verified})"
    )
    if args.push is not None:
        from .hub import push

        _quiet_hub()
        url = push(out, None if args.push is True else args.push, private=args.private or None,
                   revision=args.push_revision, token=args.token)  # fmt: skip
        print(f"pushed to {url}")
    return 0


def _quiet_hub() -> None:
    # huggingface_hub logs each retry as a warning; the CLI reports the outcome in one line instead.
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()


def cmd_push(args) -> int:
    from .hub import push

    _quiet_hub()
    url = push(args.folder, args.repo_id, private=args.private or None, revision=args.revision, token=args.token)
    print(f"pushed {args.folder} to {url}")
    return 0


def add_push_options(parser: argparse.ArgumentParser, revision_flag: str) -> None:
    parser.add_argument("--private", action="store_true", help="Create the Hub repo private.")
    parser.add_argument(revision_flag, help="Hub branch to push to (created from main if missing).")


def cmd_when(args) -> int:
    from .plans.timing import when_to_grow

    timing = when_to_grow(args.params, args.tokens, args.factor)
    print(timing.describe())
    return 0


@dataclasses.dataclass
class TrainCommandArguments:
    """What `hf-stack train` adds to the trainer's own arguments: the model, the data and how to pack it."""

    data: list[str] = dataclasses.field(
        metadata={"help": "Training text: files, globs (.txt/.jsonl/.parquet) or a Hub dataset id."}
    )
    model: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Model to train: the small model (grown during the run with --grow-at-tokens) or a grown one."
        },
    )
    from_scratch_like: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "Train a randomly initialised model with this checkpoint's config and tokenizer (the scratch baseline)."
        },
    )
    tokenizer: str | None = dataclasses.field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    block_size: int = dataclasses.field(default=256, metadata={"help": "Tokens per packed training block."})
    text_column: str = dataclasses.field(default="text", metadata={"help": "Text column of jsonl/parquet/Hub data."})
    validation_fraction: float = dataclasses.field(
        default=0.0,
        metadata={"help": "Hold out every (1/f)-th block of the token stream for eval_loss (0: no validation set)."},
    )
    validation_tokens: int = dataclasses.field(
        default=VALIDATION_TOKENS,
        metadata={"help": "Size of the validation set (the same whatever --max-tokens says, so runs compare)."},
    )
    resume: bool = dataclasses.field(
        default=False, metadata={"help": "Resume the run in --output_dir from its last checkpoint."}
    )
    lora_r: int | None = dataclasses.field(
        default=None, metadata={"help": "Train LoRA adapters of this rank (peft) instead of all weights."}
    )
    revision: str | None = dataclasses.field(default=None, metadata={"help": "Hub revision of --model."})


def _train_parser():
    from transformers import HfArgumentParser

    from .training.arguments import StackingTrainingArguments

    class Parser(HfArgumentParser):
        def error(self, message):
            self.exit(2, f"error: {message} (see 'hf-stack train --help')\n")

    return Parser((TrainCommandArguments, StackedConfig, StackingTrainingArguments), prog="hf-stack train")


def cmd_train(argv: list[str]) -> int:
    # `-o DIR` is the short spelling used by every hf-stack command; `--grow-schedule` the one the README uses.
    aliases = {"-o": "--output_dir", "--grow-schedule": "--growth_schedule"}
    spelled = []
    for arg in argv:  # also in the --flag=value form
        flag, eq, value = arg.partition("=")
        spelled.append(aliases.get(flag, flag) + eq + value if arg.startswith("-") else arg)
    argv = spelled
    namespace = vars(_train_parser().parse_args(argv))
    cli, stacked = (cls(**{f.name: namespace[f.name] for f in dataclasses.fields(cls) if f.init})
                    for cls in (TrainCommandArguments, StackedConfig))  # fmt: skip
    if namespace["growth_schedule"] is not None and stacked != StackedConfig():
        raise HfStackError(
            "the growth flags (--factor, --operator, ...) describe --grow-at-tokens' one growth; with --grow-schedule "
            "give each growth's settings in the schedule, e.g. '1e6:factor=2,operator=zero'"
        )
    from .training.arguments import StackingTrainingArguments

    settings = {f.name: namespace[f.name] for f in dataclasses.fields(StackingTrainingArguments) if f.init}
    if settings["stacked_config"] is None:  # the growth flags (--factor, --operator, ...), checked with the rest
        settings["stacked_config"] = stacked
    try:
        targs = StackingTrainingArguments(**settings)
    except HfStackError:
        raise
    except (ValueError, TypeError, ImportError) as e:  # transformers' own checks (an unknown --fsdp option, ...)
        raise HfStackError(f"invalid training arguments: {error_reason(e)}") from None
    if (cli.model is None) == (cli.from_scratch_like is None):
        raise HfStackError(
            "give exactly one of --model (a checkpoint to train) or --from-scratch-like (a config to initialise)"
        )
    from .training.run import run_training

    result = run_training(cli, targs)
    if targs.process_index == 0:
        print(
            f"trained {result['total_tokens']:,} tokens ({result['total_flops']:.3g} FLOPs); final model: {result['final']}"
        )
    return 0


def cmd_compare(args) -> int:
    from .analysis.compare import compare, describe_endpoints, describe_health, describe_speedup

    r = compare(args.grown, args.scratch if len(args.scratch) > 1 else args.scratch[0], args.output)
    print(describe_endpoints(r["currencies"]) if "currencies" in r else describe_speedup(r))
    print(describe_health(r["health"]))
    for note in r["notes"]:
        print(f"note: {note}")
    print(f"plot: {r['plot']}")
    return 0


def cmd_trial(args) -> int:
    from .analysis.trial import print_trial, trial

    result = trial(
        args.source, args.data, args.candidates, args.output, steps=args.steps, batch_size=args.batch_size,
        block_size=args.block_size, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler_type, seed=args.seed, validation_fraction=args.validation_fraction,
        text_column=args.text_column, revision=args.revision, overwrite=args.overwrite, report=print,
    )  # fmt: skip
    print_trial(result)
    return 0


def cmd_eval(args) -> int:
    from .evaluation.benchmarks import results_table
    from .evaluation.harness import evaluate_model, print_table

    if args.push and Path(args.model).exists():
        raise HfStackError("--push sends results to a Hub model; push the folder first with `hf-stack push`")
    results = evaluate_model(
        args.model, tasks=args.tasks, data_dir=args.data_dir, limit=args.limit, batch_size=args.batch_size,
        backend=args.backend, output=args.output, revision=args.revision, add_bos_token=args.add_bos_token,
    )  # fmt: skip
    print_table(results)
    if args.output:
        print(f"results: {args.output} (plot: {Path(args.output).with_suffix('.png')})")
    if Path(args.model).is_dir() and (Path(args.model) / "config.json").is_file():
        from .checkpoints.card import update_card
        from .evaluation.benchmarks import eval_results

        update_card(args.model, sections={"evaluation": results_table(results)}, eval_results=eval_results(results))
    if args.push:
        from .hub import push_eval

        _quiet_hub()
        push_eval(args.model, results, token=args.token, revision=args.revision)
        print(f"results written to the model card of {args.model}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hf-stack",
        description="Grow small transformers checkpoints into deeper or wider ones (G_stack and the other operators).",
    )
    parser.add_argument("--version", action="version", version=f"hf-stack {__import__('hf_stack').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    grow = sub.add_parser(
        "grow",
        help="grow a checkpoint (streaming)",
        description="Grow a small checkpoint into a deeper and / or wider one and write a plain transformers checkpoint.",
        epilog=GROW_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grow.add_argument("source", help="Small model: a local folder or a Hub repo id.")
    grow.add_argument(
        "-o", "--output", help="Output folder (default: <source>-<operator>-x<factor>[-w<width factor>])."
    )
    add_dataclass_options(grow, StackedConfig)
    add_hub_options(grow)
    grow.add_argument(
        "--dry-run", action="store_true", help="Print the plan (every target tensor's source); write nothing."
    )
    grow.add_argument(
        "--verify",
        action="store_true",
        help="Reload the result with transformers and check it against the source: copies, copied units, and the logits when the growth is function preserving.",
    )
    grow.add_argument("--overwrite", action="store_true", help="Replace an existing output folder.")
    grow.add_argument("--allow-nonfinite", action="store_true", help="Grow even if source weights hold NaN or Inf.")
    grow.add_argument("--max-shard-size", default="5GB", help="Largest output shard (default 5GB).")
    grow.add_argument(
        "--push", nargs="?", const=True, metavar="REPO_ID",
        help="Push the result to the Hub (default repo: <your namespace>/<output folder name>).",
    )  # fmt: skip
    add_push_options(grow, "--push-revision")
    grow.set_defaults(func=cmd_grow)

    push = sub.add_parser(
        "push",
        help="push a folder hf_stack wrote to the Hub",
        epilog="examples:\n  hf-stack push ./run/final me/small-x4-trained --private\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    push.add_argument("folder", help="A model folder written by hf-stack grow/train/eval.")
    push.add_argument("repo_id", nargs="?", help="Target repo (default: <your namespace>/<folder name>).")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login).")
    add_push_options(push, "--revision")
    push.set_defaults(func=cmd_push)

    plan = sub.add_parser(
        "when",
        aliases=["plan"],  # the command's first name; "plan" is the tensor plan everywhere else
        help="when to grow (the paper's formula); also 'hf-stack plan'",
        description="Growth timing from the paper's fit: log10(d) = 0.88 log10(N) + 163.27/log10(6ND) - 5.74.",
        epilog="examples:\n  hf-stack when --params 7e9 --tokens 300e9\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("--params", type=float, required=True, help="Target model parameters N (e.g. 7e9).")
    plan.add_argument("--tokens", type=float, required=True, help="Total training tokens D (e.g. 300e9).")
    plan.add_argument("--factor", type=int, default=4, help="Growth factor g (default 4, the paper's choice).")
    plan.set_defaults(func=cmd_when)

    # `train` is parsed by HfArgumentParser (all TrainingArguments flags); listed here for --help.
    sub.add_parser(
        "train",
        help="continued pre-training, optionally growing mid-run (see 'hf-stack train --help')",
        add_help=False,
    )

    compare = sub.add_parser(
        "compare",
        help="loss vs compute of a grown run against scratch baselines, the speed-up, a health check",
        epilog=(
            "examples:\n  hf-stack compare run/ baseline/ -o compare.png\n"
            "  hf-stack compare run/ scratch-1x/ scratch-1.5x/ scratch-2x/   # annealed end points, the paper's "
            "definition\n\nWith several scratch runs (each a complete schedule at its own budget) the compute "
            "scratch needs to\nreach the grown run's final loss is interpolated between their end points, in "
            "FLOPs, non-embedding\nFLOPs and wall-clock seconds. A warning is printed when the small model was no "
            "better than unigram\nfrequencies at growth.\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("grown", help="Run folder of the grown run.")
    compare.add_argument(
        "scratch", nargs="+", help="Run folder(s) of the from-scratch baseline; several: one per compute budget."
    )
    compare.add_argument("-o", "--output", help="PNG to write (default: <grown>/compare.png).")
    compare.set_defaults(func=cmd_compare)

    tr = sub.add_parser(
        "trial",
        help="grow with each candidate setting, train each briefly on the same blocks, pick the best",
        description=(
            "Landscape-Aware Growing (arXiv 2406.02469): the loss right after growth is a poor guide, a short run "
            "after growth picks the best growth. Each candidate is grown, evaluated on held-out blocks, trained "
            "--steps steps on the same blocks with the same settings, and evaluated again; the table, trial.json "
            "and one run folder per candidate go to the output folder, which appears only when the trial is done."
        ),
        epilog=TRIAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tr.add_argument("source", help="Small model: a local folder or a Hub repo id.")
    tr.add_argument("--data", nargs="+", required=True, help="Training text: files, globs or a Hub dataset id.")
    tr.add_argument(
        "--candidates", nargs="+", required=True, metavar="SETTINGS",
        help="Growth settings, one per candidate: key=value,key=value with the growth flags' names "
        "(factor, num_layers, operator, order, layer_map, width_factor, ...), e.g. operator=zero,factor=4.",
    )  # fmt: skip
    tr.add_argument("--steps", type=int, default=200, help="Optimizer steps per candidate (default 200).")
    tr.add_argument("--batch-size", type=int, default=8, help="Blocks per step (default 8).")
    tr.add_argument("--block-size", type=int, default=256, help="Tokens per block (default 256).")
    tr.add_argument("--learning-rate", type=float, default=3e-4, help="Peak learning rate (default 3e-4).")
    tr.add_argument(
        "--warmup-steps", type=float, default=0.1, help="Warmup steps, or below 1 a fraction of --steps (default 0.1)."
    )
    tr.add_argument(
        "--lr-scheduler-type", default="constant_with_warmup",
        help="transformers schedule (default constant_with_warmup: the start of a longer run, not an annealed one).",
    )  # fmt: skip
    tr.add_argument("--seed", type=int, default=0, help="Seed of the block order and of training (default 0).")
    tr.add_argument(
        "--validation-fraction", type=float, default=0.1,
        help=f"Share of the stream's blocks held out (every 1/f-th from its start, up to {VALIDATION_TOKENS:,} tokens) "
        "for the losses after growth and after the trial (default 0.1).",
    )  # fmt: skip
    tr.add_argument("--text-column", default="text", help="Text column of jsonl/parquet/Hub data.")
    tr.add_argument("--revision", help="Hub revision of the source.")
    tr.add_argument("-o", "--output", default="trial", help="Trial folder (default: trial).")
    tr.add_argument("--overwrite", action="store_true", help="Replace an existing trial folder.")
    tr.set_defaults(func=cmd_trial)

    ev = sub.add_parser(
        "eval",
        help="score the paper's eight benchmarks (lm-evaluation-harness, zero-shot)",
        epilog=(
            "examples:\n  hf-stack eval ./grown\n"
            "  hf-stack eval ./grown --data-dir ./bench-data --limit 200 --batch-size 16 -o results.json\n"
            "  hf-stack eval ./grown --tasks arc_easy,piqa --backend lm-eval\n  hf-stack eval me/small-x4 --push\n"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("model", help="Model folder or Hub id.")
    ev.add_argument("--tasks", default="hf_stack_8", help="hf_stack_8 (default) or comma-separated task names.")
    ev.add_argument("--data-dir", help="Read DIR/<task>.jsonl|json|parquet instead of the Hub datasets.")
    ev.add_argument("--limit", type=int, help="Score only the first N documents of each task.")
    ev.add_argument("--batch-size", type=int, default=16, help="Rows per forward pass (default 16).")
    ev.add_argument(
        "--backend", default="hf-stack", choices=("hf-stack", "lm-eval"), help="Scorer (default hf-stack)."
    )
    ev.add_argument(
        "--add-bos-token", action="store_true",
        help="Prepend BOS to every request (plain lm_eval >= 0.4.9.2 does for tokenizers that add it); default off, "
        "as the paper-era harness. Recorded in the results.",
    )  # fmt: skip
    ev.add_argument("-o", "--output", help="Write lm-eval's results JSON here (and a bar chart PNG beside it).")
    ev.add_argument("--revision", help="Hub revision of the model.")
    ev.add_argument("--token", help="Hub token for --push (default: HF_TOKEN or the saved login).")
    ev.add_argument("--push", action="store_true", help="Write the results into the Hub model's card (model-index).")
    ev.set_defaults(func=cmd_eval)
    return parser


def _import_heavy(modules: tuple[str, ...]) -> None:
    if not modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        gc.freeze()  # module-level objects live until exit anyway: later collections skip them
        if enabled:
            gc.enable()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["train"]:
            return cmd_train(argv[1:])
        args = build_parser().parse_args(argv)
        _import_heavy(HEAVY_IMPORTS.get(args.command, ()))
        return args.func(args)
    except HfStackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `hf-stack grow ... --dry-run | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
