"""Hub behaviour over real HTTP: the real `huggingface_hub` client against the Hub-compatible server in tests/."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hf_stack.checkpoints.card import update_card
from tests.conftest import build_checkpoint
from tests.hub_server import HubServer

TOKEN = "hf_TOPSECRETtoken0123456789"


@pytest.fixture(scope="module")
def hub():
    server = HubServer(tokens={TOKEN}).start()
    yield server
    server.stop()


@pytest.fixture
def env(hub, tmp_path):
    return {**os.environ, **hub.client_env(), "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN": TOKEN,
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip


def host(hub, repo_id, folder, private=False):
    """Publish a local folder as a Hub repo on the test server (weights in LFS, as a push would put them)."""
    hub.publish(repo_id, {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}, private)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_error_line(r, start="error: "):
    """The CLI failed as it should: exit 2 and a single `error:` line on stderr, no traceback."""
    assert r.returncode == 2 and r.stderr.startswith(start) and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "hf_stack.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def py(env, code):
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def hosted_small(hub, tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "small"
    build_checkpoint(folder, "llama", num_layers=2)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# small\n")
    host(hub, "org/small", folder)
    return folder


def test_grow_from_the_hub_push_and_load_back(hub, env, hosted_small, tmp_path):
    r = cli(env, "grow", "org/small", "--factor", 2, "-o", tmp_path / "small-stack-x2", "--push")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pushed to" in r.stdout and "me/small-stack-x2" in r.stdout
    files = hub.files("me/small-stack-x2")
    assert {"config.json", "model.safetensors", "growth_config.json", "README.md", "tokenizer.json"} <= set(files)
    # the weights and the figure went the LFS way of every real push: batch API, one PUT to the storage whose sha256
    # and size it checked, then an `lfsFile` in the commit; the JSON files and the card travelled in the commit
    lfs = hub.lfs_files("me/small-stack-x2")
    assert {"model.safetensors", "layer_map.png"} <= lfs
    assert not lfs & {"config.json", "growth_config.json", "README.md", "tokenizer.json", ".gitattributes"}
    weights = sha256(tmp_path / "small-stack-x2" / "model.safetensors")
    assert ("me/small-stack-x2", weights, None, 200) in hub.uploads
    assert hub.objects[weights] == files["model.safetensors"]
    # the growth recorded the source's Hub commit
    record = json.loads(files["growth_config.json"])
    assert (
        record["source"]["name_or_path"] == "org/small"
        and record["source"]["commit"] == hub.repos["org/small"].branches["main"]
    )
    out = py(
        env,
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        from huggingface_hub import ModelCard
        remote = AutoModelForCausalLM.from_pretrained("me/small-stack-x2")
        local = AutoModelForCausalLM.from_pretrained("{tmp_path / "small-stack-x2"}")
        a, b = remote.state_dict(), local.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        card = ModelCard.load("me/small-stack-x2")
        print(card.data.base_model, card.data.license, *sorted(card.data.tags), card.data.library_name,
              card.data.pipeline_tag, remote.config.num_hidden_layers)
    """,
    )
    assert out.split() == [
        "org/small",
        "mit",
        "hf-stack",
        "model-growth",
        "stack",
        "transformers",
        "text-generation",
        "4",
    ]
    # the reload took the weights from the storage the Hub redirects LFS files to, without the token
    assert ("GET", f"/lfs/me/small-stack-x2/{weights}") in [(m, p) for m, p, _ in hub.storage_requests]


def test_in_memory_growth_from_a_hub_id(hub, env, hosted_small):
    out = py(
        env,
        """
        from hf_stack import StackedConfig, StackedModelForCausalLM
        m = StackedModelForCausalLM.from_small_pretrained("org/small", StackedConfig(factor=3), revision="main")
        print(type(m).__name__, m.config.num_hidden_layers, m.growth_record["source"]["commit"] is not None)
    """,
    )
    assert out.split() == ["LlamaForCausalLM", "6", "True"]


def test_push_command_private_branch_and_idempotent_card(hub, env, llama_small, tmp_path):
    folder = tmp_path / "grown"
    assert cli(env, "grow", llama_small, "--factor", 2, "-o", folder).returncode == 0
    for _ in range(2):  # a second push updates, never duplicates
        r = cli(env, "push", folder, "me/grown-x2", "--private", "--revision", "dev")
        assert r.returncode == 0, r.stderr[-3000:]
    repo = hub.repos["me/grown-x2"]
    assert repo.private and "dev" in repo.branches
    card = hub.files("me/grown-x2", "dev")["README.md"].decode()
    for marker in ("growth", "training", "evaluation", "usage"):
        assert card.count(f"<!-- hf_stack:{marker} -->") == 1
    assert 'from_pretrained("me/grown-x2")' in card and "| 3-5 | 0-2 |" in card
    # private: invisible without a token
    no_token = {k: v for k, v in env.items() if k != "HF_TOKEN"}
    r = py(
        no_token,
        """
        from huggingface_hub import hf_hub_download
        try:
            hf_hub_download("me/grown-x2", "config.json", revision="dev")
        except Exception as e:
            print(type(e).__name__)
    """,
    )
    assert "RepositoryNotFound" in r or "RepoNotFound" in r or "GatedRepo" in r


def test_token_never_printed_logged_or_written(hub, env, llama_small, tmp_path):
    folder = tmp_path / "g"
    r1 = cli(env, "grow", llama_small, "--factor", 2, "-o", folder, "--push", "me/secret-check")
    r2 = cli(env, "push", folder, "bad//repo")
    assert r1.returncode == 0 and r2.returncode == 2
    for text in (r1.stdout, r1.stderr, r2.stdout, r2.stderr):
        assert TOKEN not in text
    for repo_id in ("me/secret-check",):
        for name, data in hub.files(repo_id).items():
            assert TOKEN.encode() not in data, name
    for p in folder.rglob("*"):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    # the server did receive it, as an Authorization header only, and the LFS storage never did
    assert any(
        {k.lower(): v for k, v in h.items()}.get("authorization") == f"Bearer {TOKEN}" for _, _, h in hub.requests
    )
    assert hub.storage_requests and not any(TOKEN in json.dumps(h) for _, _, h in hub.storage_requests)


@pytest.mark.parametrize("repo_id", ["me/wrong-token", None], ids=["repo-id", "namespace-from-whoami"])
def test_wrong_token_is_refused_with_one_error_line(hub, env, tmp_path, repo_id):
    folder = tmp_path / "wrong-token"
    build_checkpoint(folder, "llama", num_layers=1)
    wrong = "hf_WRONGtoken9876543210"
    r = cli({**env, "HF_TOKEN": wrong}, "push", folder, *([repo_id] if repo_id else []))
    one_error_line(r)
    assert "the Hub refused the token (401 Unauthorized), nothing was committed" in r.stderr
    assert "HF_TOKEN" in r.stderr and wrong not in r.stdout + r.stderr and TOKEN not in r.stdout + r.stderr
    assert "me/wrong-token" not in hub.repos  # not even created


def test_push_that_fails_halfway_leaves_nothing_and_reruns(hub, env, llama_small, tmp_path):
    folder = tmp_path / "g"
    assert cli(env, "grow", llama_small, "--factor", 2, "-o", folder).returncode == 0
    # The connection drops in the middle of the commit request, as many times as any client path would retry it.
    hub.drop_commits = 6
    r = cli(env, "push", folder, "me/flaky")
    hub.drop_commits = 0
    one_error_line(r, "error: push to me/flaky failed")
    assert "run the same command again" in r.stderr
    assert set(hub.files("me/flaky")) == {".gitattributes"}  # nothing that looks complete
    r = cli(env, "push", folder, "me/flaky")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"config.json", "model.safetensors", "README.md"} <= set(hub.files("me/flaky"))
    # the weights reached the storage before the commit failed: the rerun committed them without a second upload
    weights = sha256(folder / "model.safetensors")
    assert [u[2:] for u in hub.uploads if u[:2] == ("me/flaky", weights)] == [(None, 200)]


def test_push_that_fails_in_the_middle_of_the_lfs_upload(hub, env, tmp_path):
    # Weights above the multipart threshold (10 MiB): uploaded in 5 MiB parts, then completed.
    folder = tmp_path / "big"
    local = build_checkpoint(folder, "llama", num_layers=4, hidden_size=256, intermediate_size=1024)
    weights = folder / "model.safetensors"
    oid, size = sha256(weights), weights.stat().st_size
    parts = -(-size // hub.chunk_size)
    assert size > hub.multipart_threshold and parts >= 3
    # The storage refuses part 2 of the weights once its body arrived, part 1 being stored: 403, as S3 answers a
    # signed URL that expired during a slow upload (not retried by the client).
    hub.fail_upload(oid, part=2)
    r = cli(env, "push", folder, "me/big")
    one_error_line(r, "error: push to me/big failed")
    assert "model.safetensors" in r.stderr and "403" in r.stderr
    assert "nothing was committed, run the same command again" in r.stderr
    assert "X-Amz-Signature" not in r.stderr and TOKEN not in r.stdout + r.stderr
    assert [u[2:] for u in hub.uploads if u[:2] == ("me/big", oid)] == [(1, 200), (2, 403)]
    repo = hub.repos["me/big"]
    assert len(repo.log) == 1 and set(hub.files("me/big")) == {".gitattributes"}  # no commit
    assert oid not in hub.objects and oid not in repo.objects  # no half object either

    r = cli(env, "push", folder, "me/big")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(repo.log) == 2 and "model.safetensors" in hub.lfs_files("me/big")
    uploads = [u[2:] for u in hub.uploads if u[:2] == ("me/big", oid)]
    assert uploads == [(1, 200), (2, 403), *((n, 200) for n in range(1, parts + 1))]
    assert hub.objects[oid] == weights.read_bytes()
    out = py(
        env,
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        remote = AutoModelForCausalLM.from_pretrained("me/big")
        local = AutoModelForCausalLM.from_pretrained("{folder}")
        a, b = remote.state_dict(), local.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(len(a), remote.config.num_hidden_layers)
    """,
    )
    assert out.split() == [str(len(local.state_dict())), "4"]


def test_the_test_hub_refuses_what_the_hub_refuses(hub):
    """The server is only worth pushing to if it refuses what the Hub refuses."""

    def post(path, lines, token=TOKEN):
        body = "\n".join(json.dumps(line) for line in lines).encode()
        request = urllib.request.Request(f"{hub.url}{path}", data=body, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, ""
        except urllib.error.HTTPError as e:
            return e.code, e.headers["X-Error-Message"]

    def commit(key, value):
        return post("/api/models/me/strict/commit/main", [{"key": "header", "value": {"summary": "x"}},
                                                          {"key": key, "value": value}])  # fmt: skip

    hub.publish("me/strict", {"config.json": b"{}"})
    blob = b"\x08\0\0\0\0\0\0\0{}      "  # a safetensors file: binary
    oid = hashlib.sha256(blob).hexdigest()
    # an LFS pointer to an object never uploaded to this repo
    status, message = commit("lfsFile", {"path": "w.safetensors", "algo": "sha256", "oid": oid, "size": len(blob)})
    assert status == 400 and "LFS pointer pointed to a file that does not exist" in message
    # a binary file sent inside the commit instead of through LFS
    status, message = commit(
        "file", {"path": "w.bin", "content": base64.b64encode(blob).decode(), "encoding": "base64"}
    )
    assert status == 400 and "binary files" in message
    # a token the Hub does not know
    assert post("/api/repos/create", [{"name": "refused"}], token="hf_unknown") == (
        401,
        "Invalid credentials in Authorization header",
    )
    assert len(hub.repos["me/strict"].log) == 2 and "me/refused" not in hub.repos  # initial commit, publish


@pytest.mark.parametrize(
    "args, env_change, match",
    [
        (["push", "{folder}", "not a valid/repo//id"], {}, "not a valid Hub repo id"),
        (["push", "{folder}", "me/x"], {"HF_TOKEN": None}, "needs a Hub token"),
        (["push", "{tmp}", "me/x"], {}, "not a model folder"),
        (["grow", "org/remote-code", "--factor", "2", "-o", "{tmp}/o"], {}, "auto_map"),
        (["grow", "org/does-not-exist", "-o", "{tmp}/o"], {}, "cannot download 'org/does-not-exist'"),
    ],
)
def test_hub_bad_inputs(hub, env, llama_small, tmp_path, args, env_change, match):
    folder = tmp_path / "g"
    assert cli(env, "grow", llama_small, "--factor", 2, "-o", folder).returncode == 0
    evil = tmp_path / "evil"
    build_checkpoint(evil, "llama", num_layers=1)
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (evil / "config.json").write_text(json.dumps(config))
    host(hub, "org/remote-code", evil)
    run_env = {k: v for k, v in {**env, **env_change}.items() if v is not None}
    r = cli(run_env, *[a.format(folder=folder, tmp=tmp_path) for a in args])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert match in r.stderr
    assert not (tmp_path / "o").exists()


def test_card_sections_update_without_duplicates(llama_small, tmp_path):
    from hf_stack import StackedConfig, grow

    grow(llama_small, tmp_path / "g", StackedConfig(factor=2))
    update_card(tmp_path / "g", "me/g", sections={"evaluation": "| task | acc |\n|---|---|\n| piqa | 0.5 |"})
    update_card(tmp_path / "g", "me/g", sections={"evaluation": "| task | acc |\n|---|---|\n| piqa | 0.6 |"})
    text = (tmp_path / "g" / "README.md").read_text()
    assert text.count("| piqa |") == 1 and "0.6" in text and text.count("## Growth") == 1
    assert text.count("<!-- hf_stack:growth -->") == 1 and "Grown from" in text


def test_eval_push_writes_the_evaluation_section_once(hub, env, llama_small, tmp_path):
    from hf_stack.evaluation.benchmarks import SAMPLES_DIR

    assert cli(env, "grow", llama_small, "--factor", 2, "-o", tmp_path / "g", "--push", "me/evaluated").returncode == 0
    for _ in range(2):
        r = cli(
            env, "eval", "me/evaluated", "--push", "--data-dir", SAMPLES_DIR, "--tasks", "arc_easy,piqa", "--limit", 3
        )
        assert r.returncode == 0, r.stderr[-3000:]
    card = hub.files("me/evaluated")["README.md"].decode()
    assert card.count("<!-- hf_stack:evaluation -->") == 1 and card.count("| arc_easy |") == 1
    assert card.count("Not the official splits") == 1  # 3 local items per task: labelled, not in the model-index
    out = py(
        env,
        """
        from huggingface_hub import ModelCard
        card = ModelCard.load("me/evaluated")
        print(card.data.eval_results, card.data.base_model is None)
    """,
    )
    assert out.strip() == "None True"
    r = cli(env, "eval", tmp_path / "g", "--push", "--data-dir", SAMPLES_DIR, "--tasks", "piqa")
    assert r.returncode == 2 and "push the folder first" in r.stderr
