"""Benchmark `hf-stack grow` against mergekit's passthrough, a naive transformers copy and the read/write floor.

Usage (from the repository root, after `make install` and the bench environment below):

    python3 -m venv bench/.venv && bench/.venv/bin/pip install torch==2.13.0 mergekit==0.1.5
    .venv/bin/python bench/grow.py --reps 5
    .venv/bin/python bench/grow.py --reps 3 --width   # width x2 (direct split) against the floor only

mergekit has no width growth, so `--width` compares `--operator direct --width-factor 2` (which decodes, splits
and adds zero-sum noise to every tensor in torch, one tensor at a time) with the read/write floor alone.

A synthetic bf16 checkpoint (6 layers, hidden 2048, FFN 5632, vocabulary 32000, untied head: 0.88 GB) is grown
x4 (24 layers, 2.7 GB) by each contender in turn, interleaved, `sync` before every run; the table reports the
median wall time and peak RSS of each and the ratios. Every output is checked to hold the same layer bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work"
HF_STACK = ROOT / ".venv" / "bin" / "hf-stack"
MAIN_PY = ROOT / ".venv" / "bin" / "python"
FLOOR_ROW = "read-once/write-once floor"
MERGEKIT = ROOT / "bench" / ".venv" / "bin" / "mergekit-yaml"

MAKE_SOURCE = textwrap.dedent(
    """
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=6,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    state = {k: (torch.randn(v.shape) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    from safetensors.torch import save_file
    import pathlib; out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    cfg.dtype = "bfloat16"; cfg.architectures = ["LlamaForCausalLM"]; cfg.save_pretrained(out)
    """
)

NAIVE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    small = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    cfg = small.config; L = cfg.num_hidden_layers; cfg.num_hidden_layers = 4 * L
    big = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    sd = small.state_dict()
    new = {}
    for k, v in sd.items():
        if k.startswith("model.layers."):
            i, rest = k.split(".", 3)[2:]
            for r in range(4):
                new[f"model.layers.{int(i) + r * L}.{rest}"] = v.clone()
        else:
            new[k] = v
    big.load_state_dict(new)
    big.save_pretrained(sys.argv[2])
    """
)

FLOOR = textwrap.dedent(
    """
    # The physical floor: read every source byte once, write the output's byte count once.
    import os, sys
    src, out, n_out = sys.argv[1], sys.argv[2], int(sys.argv[3])
    CH = 64 << 20
    with open(src, "rb") as f:
        while f.read(CH):
            pass
    os.makedirs(out)
    buf = bytes(CH)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        left = n_out
        while left:
            f.write(buf[: min(left, CH)]); left -= min(left, CH)
    """
)


def tensor_bytes(folder: Path, name: str) -> bytes:
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as h:
            (n,) = struct.unpack("<Q", h.read(8))
            header = json.loads(h.read(n))
            if name in header:
                a, b = header[name]["data_offsets"]
                h.seek(8 + n + a)
                return h.read(b - a)
    raise KeyError(name)


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--width", action="store_true", help="Width x2 with the direct split, against the floor.")
    args = parser.parse_args()
    if args.width:
        return width_bench(args.reps)

    src = ensure_source()
    src_bytes = (src / "model.safetensors").stat().st_size
    out_bytes = src_bytes + 3 * sum(
        b - a for name, (a, b) in _offsets(src / "model.safetensors").items() if name.startswith("model.layers.")
    )
    (WORK / "mergekit.yml").write_text(
        "merge_method: passthrough\ndtype: bfloat16\nslices:\n"
        + "".join(f"  - sources:\n      - model: {src}\n        layer_range: [0, 6]\n" for _ in range(4))
    )
    rows = {
        "hf-stack grow": lambda out: [str(HF_STACK), "grow", str(src), "--factor", "4", "-o", str(out)],
        "mergekit-yaml --clone-tensors": lambda out: [str(MERGEKIT), str(WORK / "mergekit.yml"), str(out), "--clone-tensors"],
        FLOOR_ROW: lambda out: [sys.executable, "-c", FLOOR, str(src / "model.safetensors"), str(out), str(out_bytes)],
    }  # fmt: skip
    if not args.skip_naive:
        rows["naive transformers load/copy/save"] = lambda out: [str(MAIN_PY), "-c", NAIVE, str(src), str(out)]

    def same_work(name: str, out: Path) -> None:
        # Same work: target layer 13 holds source layer 1's bytes in every real output.
        key = "model.layers.13.mlp.down_proj.weight"
        assert tensor_bytes(out, key) == tensor_bytes(src, "model.layers.1.mlp.down_proj.weight"), name

    results, med = measure(rows, args.reps, same_work)
    ours, mk, floor = (
        med["hf-stack grow"][0],
        med["mergekit-yaml --clone-tensors"][0],
        med[FLOOR_ROW][0],
    )
    print(
        f"\nsource {src_bytes / 1e9:.2f} GB -> output {out_bytes / 1e9:.2f} GB, medians of {args.reps}, {os.cpu_count()} cores\n"
    )
    print("| tool | wall s (median) | peak RSS MB (median) | wall vs hf-stack |")
    print("|---|---|---|---|")
    for k, (w, m) in med.items():
        print(f"| {k} | {w:.2f} | {m:.0f} | {w / ours:.2f}x |")
    print(f"\nhf-stack / mergekit wall: {ours / mk:.2f}x; hf-stack / floor: {ours / floor:.2f}x")
    save("grow", results, med)


def ensure_source() -> Path:
    src = WORK / "small"
    if not src.exists():
        subprocess.run([str(MAIN_PY), "-c", MAKE_SOURCE, str(src)], check=True)
    return src


def measure(rows: dict, reps: int, check) -> tuple[dict, dict]:
    """Run every row `reps` times, interleaved; `check(name, out)` the first output of each real tool."""
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    for rep in range(reps):
        for name, cmd in rows.items():
            out = WORK / "out"
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(run(cmd(out)))
            if rep == 0 and name != FLOOR_ROW:
                check(name, out)
            print(
                f"rep {rep + 1}/{reps} {name}: {results[name][-1][0]:.2f} s, {results[name][-1][1]:.0f} MB", flush=True
            )
        shutil.rmtree(WORK / "out", ignore_errors=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}
    return results, med


def save(name: str, results: dict, med: dict) -> None:
    (WORK.parent / "results").mkdir(exist_ok=True)
    (WORK.parent / "results" / f"{name}.json").write_text(json.dumps({"runs": results, "medians": med}, indent=2))


def width_bench(reps: int) -> None:
    sys.path.insert(0, str(ROOT))
    from hf_stack import StackedConfig
    from hf_stack.checkpoints.source import resolve_source_metadata
    from hf_stack.plans.plan import build_plan

    src = ensure_source()
    meta = resolve_source_metadata(str(src))
    plan = build_plan(meta.config, meta.tensor_infos, StackedConfig(operator="direct", width_factor=2))
    out_bytes = sum(2 * math.prod(t.shape) for t in plan.tensors)  # bf16
    rows = {
        "hf-stack grow --operator direct --width-factor 2": lambda out: [str(HF_STACK), "grow", str(src), "--operator", "direct", "--width-factor", "2", "-o", str(out)],
        FLOOR_ROW: lambda out: [sys.executable, "-c", FLOOR, str(src / "model.safetensors"), str(out), str(out_bytes)],
    }  # fmt: skip

    def same_size(name: str, out: Path) -> None:
        written = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        assert abs(written - out_bytes) < 1 << 20, (written, out_bytes)

    results, med = measure(rows, reps, same_size)
    ours, floor = (w for w, _ in med.values())
    print(f"\nsource {(src / 'model.safetensors').stat().st_size / 1e9:.2f} GB -> output {out_bytes / 1e9:.2f} GB, "
          f"medians of {reps}, {os.cpu_count()} cores\n")  # fmt: skip
    print("| tool | wall s (median) | peak RSS MB (median) |\n|---|---|---|")
    for k, (w, m) in med.items():
        print(f"| {k} | {w:.2f} | {m:.0f} |")
    print(f"\nhf-stack width / floor: {ours / floor:.2f}x")
    save("grow_width", results, med)


def _offsets(path: Path) -> dict[str, tuple[int, int]]:
    with open(path, "rb") as h:
        (n,) = struct.unpack("<Q", h.read(8))
        header = json.loads(h.read(n))
    return {k: tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__"}


if __name__ == "__main__":
    main()
