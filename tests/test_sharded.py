"""Growth inside a sharded run: FSDP2 (`fully_shard`) on two CPU processes over gloo, as `make test` runs it."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM
from hf_stack import StackedConfig, grow_model
from hf_stack.training.sharded import grow_sharded

source, out = sys.argv[1:]
dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))

def shard(m):
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)

model = AutoModelForCausalLM.from_pretrained(source).train()
shard(model)
report = {"rank": rank, "sharded": [], "equal_to_unsharded": [], "layers": []}
ids = torch.arange(32).view(2, 16) % model.config.vocab_size
for settings in (StackedConfig(factor=2), StackedConfig(operator="zero", factor=2)):  # two growths, as a schedule
    before = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    config = model.config
    model, plan = grow_sharded(model, settings, shard)
    report["sharded"].append(all(isinstance(p, DTensor) for p in model.parameters()))
    report["layers"].append(model.config.num_hidden_layers)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # the same state grown unsharded, the in-memory path's way
        unsharded = AutoModelForCausalLM.from_config(config).train()
        unsharded.load_state_dict(before)
        grown_unsharded = grow_model(unsharded, settings)[0]
        want = grown_unsharded.state_dict()
        report.setdefault("unsharded_losses", []).append(float(grown_unsharded(input_ids=ids, labels=ids).loss))
        report["equal_to_unsharded"].append(sorted(full) == sorted(want) and all(torch.equal(full[k], want[k]) for k in want))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # a fresh optimizer trains the grown shards
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    report.setdefault("losses", []).append(float(loss))
with open(f"{out}/rank-{rank}.json", "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
"""


def test_fsdp2_growth_gathers_grows_and_reshards(small2, tmp_path):
    """Two growths of a `fully_shard`ed Llama on 2 processes: after each, every parameter is a DTensor again, the
    gathered state is bit for bit what `grow_model` makes of the same unsharded model, and a fresh optimizer
    trains the shards (both ranks see the same loss, the unsharded grown model's)."""
    (tmp_path / "run.py").write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           tmp_path / "run.py", small2, tmp_path]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    zero, one = (json.loads((tmp_path / f"rank-{k}.json").read_text()) for k in (0, 1))
    assert zero["sharded"] == one["sharded"] == [True, True]
    assert zero["layers"] == one["layers"] == [4, 8]
    assert zero["equal_to_unsharded"] == [True, True]
    # the sharded forward is the unsharded grown model's (RoPE's buffers included, which no state dict carries);
    # float32 sums gathered in another order differ by rounding only
    assert zero["losses"] == one["losses"] and zero["losses"] == pytest.approx(zero["unsharded_losses"], rel=1e-5)
