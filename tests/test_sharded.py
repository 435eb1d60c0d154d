"""Growth inside a sharded run: FSDP2 (`fully_shard`) on two CPU processes over gloo, as `make test` runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import build_checkpoint, distributed_env

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


@pytest.mark.parametrize("tied", [False, True], ids=["own head", "tied head"])
def test_fsdp2_growth_gathers_grows_and_reshards(tmp_path, tied):
    """Two growths of a `fully_shard`ed Llama on 2 processes: after each, every parameter is a DTensor again, the
    gathered state is bit for bit what `grow_model` makes of the same unsharded model, and a fresh optimizer
    trains the shards (both ranks see the same loss, the unsharded grown model's). A head tied to the embeddings
    (Llama 3.2's) is saved once and loaded under both names."""
    small2 = tmp_path / "small"
    build_checkpoint(small2, "llama", num_layers=2, tie_word_embeddings=tied)
    (tmp_path / "run.py").write_text(SCRIPT)
    torchrun(tmp_path / "run.py", small2, tmp_path, shim=False)
    zero, one = (json.loads((tmp_path / f"rank-{k}.json").read_text()) for k in (0, 1))
    assert zero["sharded"] == one["sharded"] == [True, True]
    assert zero["layers"] == one["layers"] == [4, 8]
    assert zero["equal_to_unsharded"] == [True, True]
    # the sharded forward is the unsharded grown model's (RoPE's buffers included, which no state dict carries);
    # float32 sums gathered in another order differ by rounding only
    assert zero["losses"] == one["losses"] and zero["losses"] == pytest.approx(zero["unsharded_losses"], rel=1e-5)


# ------------------------------------------------------------------ StackingTrainer under FSDP2 and DDP on 2 CPUs


WORKER = """
import hashlib, json, sys
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from hf_stack import StackedConfig, StackingTrainer, StackingTrainingArguments
from hf_stack.data import build_dataset
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.tensor import DTensor
from hf_stack.training.sharded import full_state_dict

def is_sharded(model):
    return all(isinstance(p, DTensor) for p in model.parameters())

small, data, out, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
crash_at, resume = settings.pop("crash_at", None), settings.pop("resume", False)

class Record(TrainerCallback):
    # at each phase's start and every step: whether every parameter is sharded; at each phase's start, a digest of
    # the weights this rank trains from (gathered on rank 0 under FSDP, its own replica under DDP)
    def __init__(self):
        self.phases = []
    def on_train_begin(self, args, state, control, model=None, **kw):
        weights = full_state_dict(model) if is_sharded(model) else model.state_dict()
        digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
        self.phases.append({"layers": model.config.num_hidden_layers, "digest": digest, "sharded": [is_sharded(model)]})
    def on_step_end(self, args, state, control, model=None, **kw):
        self.phases[-1]["sharded"].append(is_sharded(model))
        self.phases[-1]["checkpointed"] = any(isinstance(m, CheckpointWrapper) for m in model.modules())
        if crash_at is not None and model.config.num_hidden_layers == 4 and state.global_step == crash_at:
            raise RuntimeError("simulated crash")

tok = AutoTokenizer.from_pretrained(small)
train, _ = build_dataset([data], tok, 16, seed=0)
args = StackingTrainingArguments(out, **{**dict(per_device_train_batch_size=2, learning_rate=1e-3, warmup_steps=2,
    logging_steps=1, save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, data_seed=0,
    grow_at_tokens=64 * 3, max_tokens=64 * 8, stacked_config=StackedConfig(factor=2)), **settings})
record = Record()
trainer = StackingTrainer(model=AutoModelForCausalLM.from_pretrained(small), args=args, train_dataset=train,
                          processing_class=tok, callbacks=[record])
try:
    trainer.train(resume_from_checkpoint=resume or None)
finally:
    with open(f"{out}-rank-{dist.get_rank() if dist.is_initialized() else 0}.json", "w") as f:
        json.dump(record.phases, f)
"""


def torchrun(*cmd, shim=True, check=True, timeout=600):
    """`cmd` on 2 CPU processes under torchrun, by default with the test-only shim that lets accelerate shard on
    CPUs."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run(list(map(str, [*launch, *cmd])), capture_output=True, text=True, env=distributed_env(shim),
                       timeout=timeout)  # fmt: skip
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def final_weights(run):
    return load_file(Path(run) / "final" / "model.safetensors")


def assert_same_weights(a, b):
    """Two runs of the same data, seed and global batch, one sharded over 2 processes and one in a single process:
    the same float32 arithmetic but for the order in which gradients are summed (a reduce-scatter over two halves of
    the batch against one backward over all of it), a rounding difference of about 1e-7 per step that a few dozen
    steps at lr 1e-3 cannot grow past 1e-6."""
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


CLI_RUN = [
    "--block-size",
    16,
    "--logging-steps",
    1,
    "--disable-tqdm",
    "true",
    "--use-cpu",
    "true",
    "--max-tokens",
    512,
]
FSDP2 = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", '{"version": 2}']


@pytest.mark.parametrize(
    "growth, depths, launcher",
    [
        (["--grow-at-tokens", 192, "--factor", 2], [2, 4], "torchrun"),
        (["--grow-schedule", "128:factor=2;320:factor=2"], [2, 4, 8], "torchrun"),
        (["--grow-at-tokens", 192, "--factor", 2], [2, 4], "accelerate"),
        (["--grow-at-tokens", 192, "--factor", 2, "--cooldown-budgets", "320,512"], [2, 4], "torchrun"),
    ],
    ids=["one growth", "two growths", "accelerate config", "cooldown ladder"],
)
def test_fsdp2_run_grows_inside_the_sharded_run_as_one_process_would(
    small2, data_file, tmp_path, growth, depths, launcher
):
    """`hf-stack train --fsdp ... --fsdp_config '{"version": 2}'` under torchrun, or the plain command under
    `accelerate launch --use_fsdp --fsdp_version 2`, with in-run growth: every phase trains sharded parameters (the
    records say so, read from the model), `grown-init/` and `final/` are plain checkpoints, and the final weights are
    those of the same run in one process (same data, seed and global batch)."""
    common = ["--model", small2, "--data", data_file, *CLI_RUN, *growth]
    train = ["-m", "hf_stack.cli", "train", *common, "--per-device-train-batch-size", 2, "-o", tmp_path / "fsdp"]
    if launcher == "torchrun":
        torchrun(*train, *FSDP2)
    else:
        import socket

        with socket.socket() as sock:  # a free port for the main process
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = distributed_env(shim=True)
        cmd = [Path(sys.executable).with_name("accelerate"), "launch", "--use_fsdp", "--fsdp_version", 2,
               "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--num_processes", 2, "--num_machines", 1,
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port, *train]  # fmt: skip
        r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
    r = subprocess.run([sys.executable, "-m", "hf_stack.cli", "train", *map(str, common),
                        "--per-device-train-batch-size", "4", "-o", str(tmp_path / "one")], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "one"))
    if "--cooldown-budgets" in growth:  # the shorter budget's branch, resumed from its decay start's checkpoint
        branch = Path("cooldown-320")
        assert_same_weights(final_weights(tmp_path / "fsdp" / branch), final_weights(tmp_path / "one" / branch))
    record = json.loads((tmp_path / "fsdp" / "final" / "growth_config.json").read_text())
    phases = record["training"]["phases"]
    sharded = {"strategy": "fsdp2", "sharded": True, "world_size": 2}
    assert [p["parallelism"] for p in phases] == [sharded] * len(depths)
    assert [p["num_layers"] for p in phases] == depths
    log = json.loads((tmp_path / "fsdp" / "training_log.json").read_text())
    assert log["parallelism"] == sharded and log["training"]["total_tokens"] == 512
    one = json.loads((tmp_path / "one" / "final" / "growth_config.json").read_text())["training"]["phases"]
    # the same accounting: a sharded parameter counts whole (its numel is the full tensor's), tied weights once
    for key in ("tokens", "num_parameters", "flops", "non_embedding_flops"):
        assert [p[key] for p in phases] == [p[key] for p in one], key
    assert [p["parallelism"] for p in one] == [{"strategy": "single process", "world_size": 1}] * len(one)
    # the grown model as grown (before phase 2 trained it) is the one-process run's grown model too
    init = "grown-init" if len(phases) == 2 else "grown-init-1"
    a, b = (load_file(tmp_path / run / init / "model.safetensors") for run in ("fsdp", "one"))
    assert_same_weights(a, b)


@pytest.mark.parametrize(
    "state_dict_type, crash_at",
    [("FULL_STATE_DICT", 3), ("SHARDED_STATE_DICT", 3), ("FULL_STATE_DICT", 1)],
    ids=["full checkpoint", "sharded checkpoint", "before the grown phase's first checkpoint"],
)
def test_fsdp2_run_killed_after_growth_resumes_where_it_stopped(
    small2, data_file, tmp_path, state_dict_type, crash_at
):
    """Killed in the grown phase, resumed from its last checkpoint in the FSDP format the run chose (or, killed
    before the grown phase's first checkpoint, from `grown-init/`): the resumed run ends with the weights of an
    uninterrupted run (in one process, same global batch), sharded in every phase."""
    (tmp_path / "worker.py").write_text(WORKER)
    # with FSDP's activation checkpointing in one case: the grown model, sharded by hf_stack, has it too
    checkpointing = state_dict_type == "SHARDED_STATE_DICT"
    fsdp_config = {"version": 2, "state_dict_type": state_dict_type, "activation_checkpointing": checkpointing}
    fsdp = {"fsdp": "full_shard auto_wrap", "fsdp_config": fsdp_config}
    run = tmp_path / "fsdp"
    r = torchrun(tmp_path / "worker.py", small2, data_file, run, json.dumps({**fsdp, "crash_at": crash_at}),
                 check=False)  # fmt: skip
    assert r.returncode != 0 and "simulated crash" in r.stderr
    phases = json.loads(Path(f"{run}-rank-0.json").read_text())
    assert [(p["layers"], p["checkpointed"]) for p in phases] == [(2, checkpointing), (4, checkpointing)]
    assert (run / "grown-init").is_dir() and not (run / "final").exists()
    assert (run / "checkpoint-2").is_dir() == (crash_at == 3)
    if state_dict_type == "SHARDED_STATE_DICT":  # each rank's shards, not one full copy
        assert not list((run / "checkpoint-2").glob("*.safetensors"))
        assert list((run / "checkpoint-2").rglob("*.distcp"))
    torchrun(tmp_path / "worker.py", small2, data_file, run, json.dumps({**fsdp, "resume": True}))
    phases = json.loads(Path(f"{run}-rank-0.json").read_text())
    assert [p["layers"] for p in phases] == [4] and all(phases[0]["sharded"])  # the resumed phase only
    one = [
        sys.executable,
        tmp_path / "worker.py",
        small2,
        data_file,
        tmp_path / "one",
        '{"per_device_train_batch_size": 4}',
    ]
    r = subprocess.run(list(map(str, one)), capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(final_weights(run), final_weights(tmp_path / "one"))


def test_ddp_processes_grow_the_same_weights(small2, data_file, tmp_path):
    """README's DDP claim, checked on the ranks themselves: after growth, before the grown phase's first step, both
    processes hold bit-identical grown weights (each grew its own replica), and nothing was sharded."""
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun(tmp_path / "worker.py", small2, data_file, tmp_path / "ddp", "{}", shim=False)
    zero, one = (json.loads(Path(f"{tmp_path / 'ddp'}-rank-{k}.json").read_text()) for k in (0, 1))
    assert [p["layers"] for p in zero] == [2, 4]
    assert [p["digest"] for p in zero] == [p["digest"] for p in one]
    assert not any(s for p in zero + one for s in p["sharded"])


def test_the_readmes_offline_path_grow_between_runs_then_fsdp(small2, data_file, tmp_path):
    """README "Many GPUs", as written: train the small model, `hf-stack grow` it, train the grown model with --fsdp
    (FSDP2), whose parameters are sharded and whose final checkpoint is a plain one."""
    cli = [sys.executable, "-m", "hf_stack.cli"]
    r = subprocess.run([*cli, "train", "--model", str(small2), "--data", str(data_file), *map(str, CLI_RUN),
                        "-o", str(tmp_path / "run")], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([*cli, "grow", str(tmp_path / "run" / "final"), "--factor", "4", "-o", str(tmp_path / "grown")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    torchrun("-m", "hf_stack.cli", "train", "--model", tmp_path / "grown", "--data", data_file, *CLI_RUN, *FSDP2,
             "--per-device-train-batch-size", 2, "-o", tmp_path / "big")  # fmt: skip
    log = json.loads((tmp_path / "big" / "training_log.json").read_text())
    assert log["parallelism"] == {"strategy": "fsdp2", "sharded": True, "world_size": 2}
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "big" / "final")
    assert final.config.num_hidden_layers == 8
    assert not torch.equal(final.model.layers[0].self_attn.q_proj.weight,
                           AutoModelForCausalLM.from_pretrained(tmp_path / "grown").model.layers[0].self_attn.q_proj.weight)  # fmt: skip


def test_fsdp_where_accelerate_does_not_shard_is_refused(small2, data_file, tmp_path):
    """Two CPU processes without the shim: accelerate would drop the FSDP plugin and train full replicas under DDP.
    Each process stops with the error line instead, and no run folder is written."""
    r = torchrun("-m", "hf_stack.cli", "train", "--model", small2, "--data", data_file, *CLI_RUN, *FSDP2,
                 "--grow-at-tokens", 192, "-o", tmp_path / "run", shim=False, check=False)  # fmt: skip
    message = "error: --fsdp was asked for, but accelerate does not shard on this machine (multi_cpu, no GPUs"
    assert r.returncode != 0 and r.stderr.count(message) == 2, r.stderr[-3000:]
    assert "hf_stack/training" not in r.stderr  # no traceback from the processes (torchrun reports their exit)
    assert not (tmp_path / "run").exists()


def test_fsdp2_growth_the_sharded_model_cannot_do_is_refused_before_training(data_file, tmp_path):
    """A sharded mixture of experts is held as transformers holds it (experts fused into 3-D tensors), which width
    growth cannot split: the run stops with the reason and the way out before anything is trained or written."""
    from tests.families import build_family

    folder = tmp_path / "small"
    build_family("mixtral", folder)
    r = torchrun("-m", "hf_stack.cli", "train", "--model", folder, "--data", data_file, *CLI_RUN, *FSDP2,
                 "--grow-at-tokens", 192, "--operator", "direct", "--width-factor", 2, "-o", tmp_path / "run",
                 check=False)  # fmt: skip
    message = "error: the growth cannot run inside this --fsdp run: width growth does not know how to grow tensor"
    assert r.returncode != 0 and r.stderr.count(message) == 2, r.stderr[-3000:]
    assert not (tmp_path / "run").exists()  # nothing trained or written


FAILING_GROWTH = """
import sys
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
from hf_stack import StackedConfig
from hf_stack.checkpoints import tensors
from hf_stack.training.sharded import grow_sharded

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))

def shard(m):
    for layer in m.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
shard(model)
if dist.get_rank() == 0:  # the growth itself fails where it runs, on rank 0 (e.g. out of host memory)
    def fail(*args, **kwargs):
        raise MemoryError("out of host memory")
    tensors.grown_tensors = fail
try:
    grow_sharded(model, StackedConfig(factor=2), shard)
except Exception as e:
    print(f"rank {dist.get_rank()}: {type(e).__name__}: {e}", flush=True)
"""


def test_a_growth_that_fails_on_rank_0_stops_every_rank(small2, tmp_path):
    """Rank 0 grows the full state alone: when that fails, every rank raises with rank 0's reason, instead of the
    others failing on a closed connection once rank 0 is gone (gloo; measured before the fix) or waiting in the
    broadcast until the process group's timeout (NCCL)."""
    (tmp_path / "run.py").write_text(FAILING_GROWTH)
    r = torchrun(tmp_path / "run.py", small2, shim=False, timeout=120)
    assert "rank 0: MemoryError: out of host memory" in r.stdout
    assert "rank 1: HfStackError: growth failed on rank 0, which grows the full state: MemoryError" in r.stdout
