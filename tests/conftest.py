"""Fixtures: tiny real checkpoints and tokenizers for every tested architecture, built locally (no network)."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 on 2 cores: one thread per worker (and its subprocesses); oversubscribed small-op training
    # runs many times slower than the sum of its parts.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. In the beginning God created the heaven and the earth. "
    "To be, or not to be, that is the question. All the world's a stage, and all the men and women merely players."
)

ARCHS = {
    # GQA, untied head
    "llama": dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False),
    # MHA, sliding window attention config
    "mistral": dict(model_type="mistral", num_key_value_heads=4, sliding_window=16, tie_word_embeddings=False),
    # q/k/v biases, tied embeddings, per-layer layer_types with sliding layers above max_window_layers
    "qwen2": dict(
        model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=8, max_window_layers=2,
    ),
    # q_norm / k_norm, tied embeddings
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, tie_word_embeddings=True, head_dim=8),
}  # fmt: skip


def build_tokenizer(folder):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def perturb_vectors(model) -> None:
    """Move every 1-D weight (norms start at exactly 1, biases and sinks at 0) off its init, so a wrong copy of one
    shows up in comparisons."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)


FSDP_CPU_SHIM = Path(__file__).parent / "fsdp_cpu"


def distributed_env(shim: bool = False) -> dict:
    """The environment of the CPU processes a test starts with torchrun or accelerate launch: one thread each, no
    GPUs; with `shim`, the test-only shim that lets accelerate shard on CPUs (see tests/fsdp_cpu/sitecustomize.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if shim:
        env["PYTHONPATH"] = os.pathsep.join([str(FSDP_CPU_SHIM), env.get("PYTHONPATH", "")])
    return env


def build_checkpoint(folder, arch="llama", num_layers=3, dtype="float32", seed=0, max_shard_size=None, **overrides):
    """Save a tiny randomly initialised model of `arch` with a tokenizer to `folder` and return the model."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    tokenizer = build_tokenizer(folder)
    settings = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                    num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)  # fmt: skip
    config = CONFIG_MAPPING[model_type](**{**settings, **spec, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    perturb_vectors(model)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model.eval()


@pytest.fixture(params=sorted(ARCHS))
def arch(request):
    return request.param


@pytest.fixture
def small(tmp_path, arch):
    folder = tmp_path / f"small-{arch}"
    build_checkpoint(folder, arch)
    return folder


@pytest.fixture(scope="session")
def llama_small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama") / "small"
    build_checkpoint(folder, "llama")
    return folder


@pytest.fixture
def token_ids():
    import torch

    return torch.tensor([[1, 5, 17, 42, 9, 77, 3, 120, 64, 11, 8, 33]])


def accounting(training: dict) -> dict:
    """A training summary without its wall-clock fields: what two runs of the same data and steps must share."""
    phases = [{k: v for k, v in p.items() if k != "train_seconds"} for p in training["phases"]]
    return {**{k: v for k, v in training.items() if k != "total_train_seconds"}, "phases": phases}


CORPUS = [TEXT.replace("a", c) for c in "abcdefghijklmnop"]  # 16 distinct documents


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Training text: 16 distinct documents, as jsonl."""
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in CORPUS))
    return path


@pytest.fixture
def small2(tmp_path):
    """A 2-layer Llama checkpoint with its tokenizer."""
    build_checkpoint(tmp_path / "small", "llama", num_layers=2)
    return tmp_path / "small"


def snapshot(root) -> dict:
    """Every path under `root` with a digest of its bytes (files) or None (folders): equal before and after means
    nothing was written, moved or left behind."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(Path(root).rglob("*"))}  # fmt: skip


def refusal(argv: list[str], capsys) -> str:
    """Run the CLI in this process on a command it must refuse: exit status 2, exactly one `error:` line on stderr
    and no traceback. Returns that line and the whole of stderr."""
    from hf_stack.cli import main

    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own refusals
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    return lines[0], err
