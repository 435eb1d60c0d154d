"""The notebooks run top to bottom (the third one pushes to the local test Hub)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.hub_server import HubServer

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert len(NOTEBOOKS) == 3
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    hub = HubServer(tokens={"hf_notebook_token"}).start()
    # the kernel inherits this environment: the real huggingface_hub client, pointed at the local server
    for key, value in {**hub.client_env(), "HF_TOKEN": "hf_notebook_token", "HF_HOME": str(tmp_path / "hf-home"),
                       "MPLBACKEND": "Agg"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    try:
        nb = nbformat.read(path, as_version=4)
        NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        hub.stop()
    if path.stem.startswith("03"):
        assert "me/nb-grown-x2" in hub.repos and "README.md" in hub.files("me/nb-grown-x2")
        assert "model.safetensors" in hub.lfs_files("me/nb-grown-x2")  # through LFS, as from a real notebook
    assert os.environ["HF_HUB_OFFLINE"] == "0"
