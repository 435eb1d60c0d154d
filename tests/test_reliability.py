"""Faults survived: processes really killed, disks really full (a file-size limit), bad plans refused before writing."""

import json
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM

from hf_stack import HfStackError, StackedConfig, grow
from hf_stack.cli import main
from tests.conftest import accounting, build_checkpoint

HF_STACK = [sys.executable, "-m", "hf_stack.cli"]


def synth_source(folder, hidden=2048, layers=4, nan=False):
    folder.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers,
           "hidden_size": hidden, "tie_word_embeddings": True}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((256, hidden)).astype(np.float16)}
    for i in range(layers):
        for name in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):
            tensors[f"model.layers.{i}.{name}.weight"] = rng.standard_normal((hidden, hidden)).astype(np.float16)
    tensors["model.norm.weight"] = np.ones(hidden, np.float16)
    if nan:
        tensors["model.layers.1.mlp.up_proj.weight"][3, 7] = np.nan
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return tensors


def read_all(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def check_complete(out, src_tensors, layers=4, factor=4):
    """A grown folder is complete: every target tensor present, each with its source tensor's bytes."""
    header, data = read_all(out / "model.safetensors")
    assert (out / "config.json").is_file() and (out / "growth_config.json").is_file()
    expected = {k: v for k, v in src_tensors.items() if not k.startswith("model.layers.")}
    for i in range(layers * factor):
        for k, v in src_tensors.items():
            if k.startswith(f"model.layers.{i % layers}."):
                expected[k.replace(f"layers.{i % layers}.", f"layers.{i}.", 1)] = v
    assert set(header) - {"__metadata__"} == set(expected)
    for name, tensor in expected.items():
        a, b = header[name]["data_offsets"]
        assert data[a:b] == tensor.tobytes(), name


def test_grow_killed_mid_write_never_leaves_a_half_checkpoint(tmp_path):
    src = tmp_path / "src"
    tensors = synth_source(src)  # 100 MB of fp16, 400 MB grown
    total = sum(t.nbytes for k, t in tensors.items() if k.startswith("model.layers.")) * 4
    out = tmp_path / "out"
    left = []
    for fraction in (0.1, 0.4, 0.7, 0.9):
        proc = subprocess.Popen([*HF_STACK, "grow", str(src), "--factor", "4", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        written, deadline = 0, time.time() + 120
        while time.time() < deadline and proc.poll() is None:  # kill once this run's shard holds that much
            for shard in tmp_path.glob(".out.tmp-*/model.safetensors"):
                if shard.parent.name not in left:  # not the previous kill's leftover (swept as this run starts)
                    try:
                        written = shard.stat().st_size
                    except FileNotFoundError:
                        pass
            if written >= fraction * total:
                break
            time.sleep(0.002)  # a poll without a pause would take a core from the process it times
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the growth finished before it could be killed"
        assert fraction * total <= written < total  # the kill landed mid-write
        assert not out.exists()  # the output appears whole or not at all
        temporary = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        assert len(temporary) == 1  # what this kill left (the previous kill's leftover was swept by this run)
        left.append(temporary[0].name)
    assert len(set(left)) == len(left)
    # the same command again completes, and sweeps what the last kill left
    r = subprocess.run([*HF_STACK, "grow", str(src), "--factor", "4", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    check_complete(out, tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_nonfinite_weights_are_refused_unless_forced(tmp_path, capsys):
    src = tmp_path / "src"
    synth_source(src, hidden=64, nan=True)
    assert main(["grow", str(src), "--factor", "2", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and "model.layers.1.mlp.up_proj.weight" in err and not (tmp_path / "out").exists()
    assert main(["grow", str(src), "--factor", "2", "-o", str(tmp_path / "out"), "--allow-nonfinite"]) == 0


def train_cmd(small, data, out, *extra):
    return [*HF_STACK, "train", "--model", str(small), "--data", str(data), "--block-size", "16",
            "--per-device-train-batch-size", "4", "--grow-at-tokens", str(64 * 10), "--max-tokens", str(64 * 80),
            "--factor", "2", "--save-steps", "10", "--logging-steps", "5", "--disable-tqdm", "true",
            "--use-cpu", "true", "-o", str(out), *extra]  # fmt: skip


@pytest.fixture
def training_setup(tmp_path):
    build_checkpoint(tmp_path / "small", "llama", num_layers=2)
    text = " ".join(f"the {w} sat on the mat and looked at the {v}" for w in ("cat", "dog", "cow") for v in range(400))
    (tmp_path / "d.txt").write_text(text)
    return tmp_path / "small", tmp_path / "d.txt"


def test_training_killed_after_growth_resumes_exactly(training_setup, tmp_path):
    small, data = training_setup
    r = subprocess.run(train_cmd(small, data, tmp_path / "a"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(
        train_cmd(small, data, tmp_path / "b"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = tmp_path / "b" / "checkpoint-20"  # phase 2, after growth
    deadline = time.time() + 300
    while not (ckpt / "trainer_state.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "final").exists(), "the run finished before it could be killed"
    assert (ckpt / "trainer_state.json").is_file(), "killed before the phase's first checkpoint"
    # what a kill mid-write leaves in a later checkpoint: a cut trainer_state.json (transformers writes it in place),
    # or a state beside cut weights; neither counts (the resumed run writes its own checkpoints 30 and 40)
    for step, cut in ((30, "trainer_state.json"), (40, "model.safetensors")):
        partial = shutil.copytree(ckpt, tmp_path / "b" / f"checkpoint-{step}")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        (partial / "trainer_state.json").write_text(json.dumps({**state, "global_step": step}))
        (partial / cut).write_bytes((partial / cut).read_bytes()[: (partial / cut).stat().st_size // 2])
    r = subprocess.run(train_cmd(small, data, tmp_path / "b", "--resume", "true"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final")
    assert b.config.num_hidden_layers == 4
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)
    la = json.loads((tmp_path / "a" / "training_log.json").read_text())
    lb = json.loads((tmp_path / "b" / "training_log.json").read_text())
    assert accounting(la["training"]) == accounting(lb["training"])
    final_a = [e["loss"] for e in la["log_history"] if "loss" in e][-1]
    final_b = [e["loss"] for e in lb["log_history"] if "loss" in e][-1]
    assert final_a == pytest.approx(final_b, rel=1e-4)


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_grow_hitting_a_real_file_size_limit_leaves_nothing(tmp_path):
    """A real write limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk) at the first bytes, mid
    shard and at the shard's last bytes (the failure then surfaces when the file is flushed and closed): one
    `error:` line, exit 2, no output and no temporary folder; without the limit the same command completes."""
    build_checkpoint(tmp_path / "src", "llama", num_layers=2)
    r = subprocess.run([*HF_STACK, "grow", str(tmp_path / "src"), "--factor", "4", "-o", str(tmp_path / "ok")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    size = (tmp_path / "ok" / "model.safetensors").stat().st_size
    for limit in (100, size // 2, size - 1):
        out = tmp_path / f"out-{limit}"
        r = subprocess.run([*HF_STACK, "grow", str(tmp_path / "src"), "--factor", "4", "-o", str(out)],
                           capture_output=True, text=True, preexec_fn=_limit_file_size(limit))  # fmt: skip
        assert r.returncode == 2, r.stderr[-2000:]
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: no space left on the device"), r.stderr[-2000:]
        assert "file-size limit" in lines[0] and not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporary folder


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_checkpoint(training_setup, tmp_path):
    small, data = training_setup
    out = tmp_path / "run"
    # The small model's checkpoints fit; the grown model's optimizer state (twice its weights) does not.
    r = subprocess.run(
        train_cmd(small, data, out), capture_output=True, text=True, preexec_fn=_limit_file_size(300_000)
    )
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the disk is full")
    # what --resume really continues from: the grown model, saved at growth beside the small side's checkpoint
    assert last.endswith(
        f"continues from the grown model in {out / 'grown-init'} (grown from {out / 'small' / 'checkpoint-10'})"
    )
    assert not (out / "checkpoint-10").exists()  # the partial folder is gone
    assert (out / "small" / "checkpoint-10" / "trainer_state.json").is_file()
    AutoModelForCausalLM.from_pretrained(out / "grown-init")  # the state on the other side of growth is usable
    # space freed: the run resumes and completes
    r = subprocess.run(train_cmd(small, data, out, "--resume", "true"), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.num_hidden_layers == 4


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer_map=st.lists(st.integers(0, 4), min_size=1, max_size=9))
def test_every_valid_plan_loads_and_every_invalid_one_writes_nothing(llama_small, tmp_path_factory, layer_map):
    out = tmp_path_factory.mktemp("prop") / "out"
    stacked = StackedConfig(layer_map=layer_map)
    if max(layer_map) >= 3:  # the source has 3 layers
        with pytest.raises(HfStackError, match="only 3 layers"):
            grow(llama_small, out, stacked)
        assert not out.exists() and list(out.parent.iterdir()) == []
        return
    grow(llama_small, out, stacked)
    model = AutoModelForCausalLM.from_pretrained(out)
    source = AutoModelForCausalLM.from_pretrained(llama_small)
    assert model.config.num_hidden_layers == len(layer_map)
    for i, j in enumerate(layer_map):
        assert torch.equal(
            model.model.layers[i].self_attn.q_proj.weight, source.model.layers[j].self_attn.q_proj.weight
        )
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
