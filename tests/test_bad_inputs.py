"""The bad-input catalogue: one table of command lines a user can get wrong, each run through the real CLI.

Every case must exit with status 2, print exactly one `error:` line (the one this table names) and no traceback,
and write nothing: the workspace holds the same files, byte for byte, before and after. README's count is this
table's length.
"""

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch

from hf_stack.cli import main
from hf_stack.evaluation.benchmarks import SAMPLES_DIR

from .conftest import build_checkpoint, refusal, snapshot

GROW = ["grow", "{small}", "-o", "{out}"]
TRAIN = ["train", "--model", "{small}", "--data", "{data}", "--block-size", "16", "--use-cpu", "true",
         "--disable-tqdm", "true", "--report-to", "none"]  # fmt: skip
BUDGET = ["--max-tokens", "512", "-o", "{out}"]
EVAL = ["eval", "{small}", "--data-dir", str(SAMPLES_DIR), "--limit", "2", "-o", "{out}/scores.json"]

# (case, command line, the error line's text, environment changes)
CATALOGUE = [
    # grow: settings
    ("factor 0", [*GROW, "--factor", "0"], "factor must be at least 1", {}),
    ("factor not whole", [*GROW, "--factor", "1.5"], "invalid int value", {}),
    ("layer map beyond the source", [*GROW, "--layer-map", "0-1,7"], "source layers [7]", {}),
    ("layer map against --layers", [*GROW, "--layer-map", "0-1", "--layers", "5"],
     "the layer map has 2 layers but --layers asks for 5", {}),
    ("layer map unparsable", [*GROW, "--layer-map", "0-1,x"], "cannot parse layer map part 'x'", {}),
    ("layer map backwards", [*GROW, "--layer-map", "1-0"], "runs backwards", {}),
    ("absurd depth", [*GROW, "--layers", "1000000000"], "more than the supported", {}),
    ("unknown order", [*GROW, "--order", "sideways"], "invalid choice", {}),
    ("middle order on 2 layers", [*GROW, "--order", "middle", "--factor", "2"], "needs at least 3 source layers", {}),
    ("unknown operator", [*GROW, "--operator", "magic"], "unknown operator 'magic'", {}),
    ("unreadable shard size", [*GROW, "--max-shard-size", "lots"], "cannot read size 'lots'", {}),
    ("factor and layers", [*GROW, "--factor", "2", "--layers", "4"], "not both", {}),
    ("width factor splitting heads", [*GROW, "--operator", "direct", "--width-factor", "1.1"], "cannot keep heads whole", {}),
    ("width factor below 1", [*GROW, "--operator", "direct", "--width-factor", "0.5"], "above 1", {}),
    ("stack in width", [*GROW, "--width-factor", "2"], "grows depth only", {}),
    ("depth direction with a width", [*GROW, "--operator", "zero", "--direction", "depth", "--width-factor", "2"],
     "keeps the width", {}),
    ("width direction with a depth", [*GROW, "--operator", "zero", "--direction", "width", "--factor", "2"],
     "keeps the depth", {}),
    ("learn without data", [*GROW, "--operator", "learn", "--factor", "2"], "--learn-data", {}),
    ("learn data missing", [*GROW, "--operator", "learn", "--learn-data", "{workspace}/missing.txt"], "does not exist", {}),
    ("learn steps 0", [*GROW, "--operator", "learn", "--learn-data", "{data}", "--learn-steps", "0"], "learn_steps", {}),
    ("learn data for another operator", [*GROW, "--operator", "zero", "--learn-data", "{data}"],
     "is for operator 'learn'", {}),
    ("width noise of 5", [*GROW, "--operator", "direct", "--width-factor", "2", "--width-noise", "5"], "width_noise", {}),
    ("unknown dtype", [*GROW, "--dtype", "float8"], "unknown dtype 'float8'", {}),
    # grow: sources
    ("truncated shard", ["grow", "{bad:truncated shard}", "-o", "{out}"],
     "model.safetensors is truncated: tensor 'model.norm.weight' ends past the end of the file", {}),
    ("corrupt header", ["grow", "{bad:corrupt header}", "-o", "{out}"], "corrupt or truncated safetensors header", {}),
    ("header not JSON", ["grow", "{bad:header not json}", "-o", "{out}"], "not JSON", {}),
    ("missing shard", ["grow", "{bad:missing shard}", "-o", "{out}"],
     "shard model-00001-of-00002.safetensors is missing from", {}),
    ("index names missing tensors", ["grow", "{bad:index names missing tensors}", "-o", "{out}"], "no shard holds", {}),
    ("index escapes the folder", ["grow", "{bad:index escapes folder}", "-o", "{out}"], "not a plain file name", {}),
    ("auto_map", ["grow", "{bad:auto_map}", "-o", "{out}"], "never runs remote code", {}),
    ("unknown architecture", ["grow", "{bad:unknown architecture}", "-o", "{out}"], "unsupported architecture", {}),
    ("no weights", ["grow", "{bad:no weights}", "-o", "{out}"], "holds no model weights", {}),
    ("config not JSON", ["grow", "{bad:config not json}", "-o", "{out}"], "cannot read config.json", {}),
    ("config missing", ["grow", "{bad:config missing}", "-o", "{out}"], "config.json not found", {}),
    ("layer count mismatch", ["grow", "{bad:layer count mismatch}", "-o", "{out}"], "says 5 layers", {}),
    ("multimodal config", ["grow", "{bad:nested text_config}", "-o", "{out}"], "nested 'text_config'", {}),
    ("per-layer field it cannot grow", ["grow", "{bad:first_k_dense_replace}", "-o", "{out}"], "first_k_dense_replace", {}),
    ("shape against the config", ["grow", "{bad:shape}", "-o", "{out}"], "has shape [3, 3] but the config implies", {}),
    ("NaN weights", ["grow", "{bad:nan}", "-o", "{out}"], "hold NaN or Inf values", {}),
    ("pickle only", ["grow", "{bad:pickle}", "-o", "{out}"], "only pickle (.bin) weights", {}),
    ("a file, not a folder", ["grow", "{data}", "-o", "{out}"], "is a file; pass the model folder", {}),
    ("invalid repo id", ["grow", "not a/valid//repo", "-o", "{out}"], "neither an existing folder nor a valid Hub", {}),
    ("output exists", ["grow", "{small}", "-o", "{existing}"], "already exists; pass --overwrite", {}),
    # train
    ("empty data", [*TRAIN[:4], "{empty}", *TRAIN[5:], *BUDGET], "tokenises to nothing", {}),
    ("data not UTF-8", [*TRAIN[:4], "{binary}", *TRAIN[5:], *BUDGET], "not UTF-8", {}),
    ("data missing", [*TRAIN[:4], "{workspace}/missing.txt", *TRAIN[5:], *BUDGET], "does not exist", {}),
    ("growth beyond the budget", [*TRAIN, *BUDGET, "--grow-at-tokens", "1000"], "beyond the budget", {}),
    ("negative growth point", [*TRAIN, *BUDGET, "--grow-at-tokens", "-5"], "positive number of tokens", {}),
    ("no budget", [*TRAIN, "-o", "{out}"], "set max_tokens", {}),
    ("block beyond the context", [*TRAIN, *BUDGET, "--block-size", "4096"], "larger than the model's context", {}),
    ("masks without random growth", [*TRAIN, *BUDGET, "--grow-at-tokens", "128", "--mask-steps", "2"],
     "needs grow_at_tokens and the random operator", {}),
    ("carry over width growth", [*TRAIN, *BUDGET, "--grow-at-tokens", "128", "--operator", "zero", "--width-factor",
                                 "2", "--carry-optimizer-state", "true"], "carry_optimizer_state moves", {}),
    ("unknown grown schedule", [*TRAIN, *BUDGET, "--grow-at-tokens", "128", "--grown-lr-scheduler-type", "cosnie"],
     "unknown grown_lr_scheduler_type 'cosnie'", {}),
    ("folder of a finished run", [*TRAIN[:-2], "-o", "{run}", "--max-tokens", "256"], "already holds a training run", {}),
    ("resume another run", [*TRAIN[:-2], "-o", "{run}", "--max-tokens", "512", "--resume", "true"],
     "belongs to another run", {}),
    ("nothing to resume", [*TRAIN, *BUDGET, "--resume", "true"], "nothing to resume", {}),
    ("model and scratch both", [*TRAIN, *BUDGET, "--from-scratch-like", "{small}"], "give exactly one of --model", {}),
    # eval
    ("unknown task", [*EVAL, "--tasks", "arc_easy,hellaswag"], "unknown task hellaswag", {}),
    ("data dir missing", [*EVAL[:2], "--data-dir", "{workspace}/nope", *EVAL[4:]], "is not a folder", {}),
    ("task file lacking fields", [*EVAL[:2], "--data-dir", "{evalbad}", *EVAL[4:], "--tasks", "piqa"],
     "lacks the fields piqa needs", {}),
    ("task file missing", [*EVAL[:2], "--data-dir", "{evalbad}", *EVAL[4:], "--tasks", "sciq"], "has no sciq.jsonl", {}),
    ("limit 0", [*EVAL[:4], "--limit", "0", "-o", "{out}/s.json"], "limit must be at least 1", {}),
    ("weights against the config", ["eval", "{bad:broken model}", "--data-dir", str(SAMPLES_DIR), "--tasks", "piqa"],
     "but the config implies", {}),
    ("train weights against the config", [*TRAIN[:2], "{bad:broken model}", *TRAIN[3:], *BUDGET],
     "but the config implies", {}),
    ("push results of a local folder", [*EVAL, "--push"], "push the folder first", {}),
    # compare, when, push
    ("compare a folder without a log", ["compare", "{small}", "{small}"], "has no training_log.json", {}),
    ("negative parameter count", ["when", "--params", "-1", "--tokens", "1e9"], "target_params must be a positive", {}),
    ("no tokens", ["when", "--params", "7e9", "--tokens", "nan"], "tokens must be a positive number", {}),
    ("growth factor 1", ["when", "--params", "7e9", "--tokens", "1e12", "--factor", "1"],
     "growth factor must be a whole number >= 2", {}),
    ("push a folder that is no model", ["push", "{workspace}/notmodel", "me/x"], "not a model folder", {}),
    ("push without a token", ["push", "{small}", "me/x"], "needs a Hub token", {"HF_TOKEN": None}),
    ("push to an invalid repo id", ["push", "{small}", "not a valid/repo//id"], "not a valid Hub repo id",
     {"HF_TOKEN": "hf_catalogue_marker"}),
]  # fmt: skip


def _corrupt(kind: str, folder: Path) -> None:
    """Damage a copy of a good checkpoint in one specific way."""
    cfg_path, st = folder / "config.json", folder / "model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    data = st.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    if kind == "truncated shard":
        st.write_bytes(data[: len(data) - 100])
    elif kind == "corrupt header":
        st.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    elif kind == "header not json":
        st.write_bytes(data[:8] + b"\xff" * n + data[8 + n :])
    elif kind == "missing shard":
        weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        st.unlink()
    elif kind == "index names missing tensors":
        weight_map = {"model.extra.weight": "model.safetensors", "model.embed_tokens.weight": "model.safetensors"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    elif kind == "index escapes folder":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    elif kind == "auto_map":
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    elif kind == "unknown architecture":
        cfg["architectures"] = ["T5ForConditionalGeneration"]
    elif kind == "nested text_config":
        cfg["text_config"] = {"hidden_size": 32}
    elif kind == "first_k_dense_replace":
        cfg["first_k_dense_replace"] = 1
    elif kind == "no weights":
        st.unlink()
    elif kind == "config not json":
        cfg_path.write_text("{not json")
    elif kind == "config missing":
        cfg_path.unlink()
    elif kind == "layer count mismatch":
        cfg["num_hidden_layers"] = 5
    elif kind == "broken model":
        cfg["intermediate_size"] = 48  # the weights hold 64: transformers refuses the sizes
    elif kind in ("shape", "nan"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(st)
        name = "model.layers.0.mlp.down_proj.weight"
        tensors[name] = tensors[name][:3, :3].clone() if kind == "shape" else tensors[name].clone().fill_(torch.nan)
        save_file(tensors, st, metadata={"format": "pt"})
    elif kind == "pickle":
        from safetensors.torch import load_file

        torch.save(load_file(st), folder / "pytorch_model.bin")
        st.unlink()
    else:
        raise ValueError(kind)
    if cfg_path.is_file() and kind not in ("config not json",):
        cfg_path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    build_checkpoint(root / "small", "llama", num_layers=2)
    for kind in sorted(
        {m.group(1) for _, cmd, _, _ in CATALOGUE for a in cmd for m in re.finditer(r"\{bad:(.+)\}", a)}
    ):
        shutil.copytree(root / "small", root / "bad" / kind)
        _corrupt(kind, root / "bad" / kind)
    (root / "data.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (root / "evalbad").mkdir()
    (root / "evalbad" / "piqa.jsonl").write_text(json.dumps({"goal": "x", "sol1": "a"}) + "\n")
    (root / "notmodel").mkdir()
    (root / "existing").mkdir()
    (root / "existing" / "mine.txt").write_text("keep")
    (root / "hf-home").mkdir()
    run = [a.format(small=root / "small", data=root / "data.txt") for a in TRAIN[:-2]]
    assert main([*run, "--max-tokens", "256", "-o", str(root / "run")]) == 0
    return root


def test_readme_counts_this_catalogue():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    count = re.search(r"\*\*Bad input catalogue: (\d+) command lines\*\*", readme)
    assert count and int(count.group(1)) == len(CATALOGUE)
    assert len({case for case, *_ in CATALOGUE}) == len(CATALOGUE)


@pytest.mark.parametrize(("case", "command", "message", "env"), CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(workspace, case, command, message, env, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(workspace / "hf-home"))  # no saved login: tokens come from HF_TOKEN only
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for key, value in env.items():
        if value is not None:
            monkeypatch.setenv(key, value)
    places = dict(small=workspace / "small", out=workspace / "out", data=workspace / "data.txt", run=workspace / "run",
                  empty=workspace / "empty.txt", binary=workspace / "binary.txt", evalbad=workspace / "evalbad",
                  existing=workspace / "existing", workspace=workspace)  # fmt: skip
    argv = [
        re.sub(r"\{bad:(.+)\}", lambda m: str(workspace / "bad" / m.group(1)), a).format(**places) for a in command
    ]
    before = snapshot(workspace)
    line, err = refusal(argv, capsys)
    assert message in line
    assert "hf_catalogue_marker" not in err
    assert snapshot(workspace) == before  # nothing written, nothing left behind


def test_the_snapshot_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path):
    """ "Nothing written" is checked on the bytes: a file rewritten in place with its size and mtime restored (what
    a size-and-mtime check would miss) changes the snapshot."""
    import os

    path = tmp_path / "config.json"
    path.write_text('{"a": 1}')
    before, stat = snapshot(tmp_path), path.stat()
    path.write_text('{"a": 2}')
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert snapshot(tmp_path) != before
