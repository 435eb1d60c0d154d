"""`hf-stack grow` from the shell: plans, outputs, one-line errors with exit 2 and nothing left on disk."""

import json
import shutil
import subprocess
import sys

from hf_stack.cli import main


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "hf_stack.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_cli_grow_end_to_end(llama_small, tmp_path):
    r = run("grow", llama_small, "--factor", "4", "-o", tmp_path / "grown", "--verify")
    assert r.returncode == 0, r.stderr
    assert "(3 layers)" in r.stdout and "(12 layers, verified)" in r.stdout
    assert json.loads((tmp_path / "grown" / "config.json").read_text())["num_hidden_layers"] == 12
    # no temporary folders left beside the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grown"]


def test_cli_default_output_name(llama_small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["grow", str(llama_small), "--factor", "2"]) == 0
    assert (tmp_path / "small-stack-x2" / "model.safetensors").is_file()


def test_dry_run_prints_every_tensor_and_writes_nothing(llama_small, tmp_path):
    r = run("grow", llama_small, "--layers", "7", "--order", "interpolate", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "layers: 3 -> 7" in r.stdout and "num_hidden_layers: 3 -> 7" in r.stdout
    assert "model.layers.6.mlp.up_proj.weight" in r.stdout and "<- model.layers.2.mlp.up_proj.weight" in r.stdout
    tensor_lines = [line for line in r.stdout.splitlines() if line.startswith("  ") and " <- " in line]
    assert len(tensor_lines) == 1 + 7 * 9 + 2  # embeddings, 7 layers x 9 tensors, final norm, untied lm_head
    assert list(tmp_path.iterdir()) == []


def test_width_dry_run_prints_axes_and_every_tensor(llama_small, tmp_path):
    r = run(
        "grow", llama_small, "--operator", "zero", "--factor", "2", "--width-factor", "2", "--dry-run", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert "operator: zero, depth + width" in r.stdout and "function preserving: yes" in r.stdout
    assert "hidden_size: 32 -> 64" in r.stdout and "num_key_value_heads: 2 -> 4" in r.stdout
    assert (
        "v_out: 16 -> 32; 16 new units (zero)" in r.stdout and "ffn_in: 64 -> 128; 64 new units (random)" in r.stdout
    )
    lines = [line for line in r.stdout.splitlines() if line.startswith("  ") and " <- " in line]
    assert len(lines) == 1 + 6 * 9 + 2
    assert all("grown along" in line for line in lines)
    assert any("model.layers.4.mlp.down_proj.weight" in line and "[zero]" in line for line in lines)
    assert list(tmp_path.iterdir()) == []


def test_help_is_instant_and_has_examples():
    r = run("grow", "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--layer-map" in r.stdout


def test_existing_output_needs_overwrite(llama_small, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["grow", str(llama_small), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["grow", str(llama_small), "-o", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_no_disk_space_is_reported_before_writing(llama_small, tmp_path, monkeypatch, capsys):
    import hf_stack.checkpoints.folders

    monkeypatch.setattr(
        hf_stack.checkpoints.folders.shutil,
        "disk_usage",
        lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000),
    )
    assert main(["grow", str(llama_small), "-o", str(tmp_path / "out")]) == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_disk_filling_up_mid_write_leaves_nothing(llama_small, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing a shard (a real OSError from the write) cleans up the temporary folder."""
    import errno

    import hf_stack.checkpoints.streaming

    calls = {"n": 0}
    real = hf_stack.checkpoints.streaming._copy_bytes

    def failing(*a):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a)

    monkeypatch.setattr(hf_stack.checkpoints.streaming, "_copy_bytes", failing)
    assert main(["grow", str(llama_small), "-o", str(tmp_path / "out")]) == 2
    assert "no space left" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_streaming_memory_is_flat_and_needs_no_torch(tmp_path):
    """Peak RSS of `hf-stack grow` does not grow with the checkpoint, and torch is never imported."""
    import numpy as np
    from safetensors.numpy import save_file

    def synth(folder, hidden):
        folder.mkdir()
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2,
               "hidden_size": hidden, "tie_word_embeddings": True}  # fmt: skip
        (folder / "config.json").write_text(json.dumps(cfg))
        tensors = {
            "model.embed_tokens.weight": np.ones((64, hidden), np.float16),
            "model.norm.weight": np.ones(hidden, np.float16),
        }
        for i in range(2):
            tensors[f"model.layers.{i}.mlp.up_proj.weight"] = np.full((hidden, hidden), i, np.float16)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    code = (
        "import sys; from hf_stack.cli import main; rc = main(sys.argv[1:]); assert 'torch' not in sys.modules;"
        # VmHWM (peak RSS of this exec'd image; ru_maxrss would include the forked pytest parent)
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    peaks = {}
    for hidden in (1024, 3072):  # 4 MB and 36 MB of weights, x4 out
        synth(tmp_path / f"s{hidden}", hidden)
        r = subprocess.run(
            [sys.executable, "-c", code, "grow", str(tmp_path / f"s{hidden}"), "-o", str(tmp_path / f"o{hidden}")],
            capture_output=True, text=True,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        peaks[hidden] = int(r.stdout.split()[-1])  # KiB
        assert (tmp_path / f"o{hidden}" / "model.safetensors").stat().st_size > 4 * 2 * hidden * hidden * 2
    assert peaks[3072] - peaks[1024] < 8 * 1024, peaks  # 9x the weights, < 8 MB more memory


def test_depth_growth_of_tensors_that_contradict_the_config_writes_nothing(llama_small, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "bad"
    shutil.copytree(llama_small, src)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:3, :3].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    r = run("grow", src, "--factor", "2", "-o", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: tensor 'model.layers.0.mlp.down_proj.weight' has shape [3, 3] but the config implies [32, 64]"
    ]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
