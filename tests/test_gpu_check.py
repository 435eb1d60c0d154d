"""bench/gpu_check.py, the script a session lent a GPU runs, kept from rotting: its dry run on CPU at tiny sizes."""

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import CORPUS

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


def test_gpu_check_dry_run(tmp_path):
    (tmp_path / "text.txt").write_text("\n".join(CORPUS * 20))
    cmd = [sys.executable, SCRIPT, "--dry-run", "--data", tmp_path / "text.txt", "--out", tmp_path / "out"]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = (tmp_path / "out").glob("gpu_check-*-dry.json")
    result = json.loads(path.read_text())
    phases = result["training"]["stacking_trainer"]["phases"]
    assert len(phases) == 2 and phases[1]["num_parameters"] > phases[0]["num_parameters"]
    assert (
        all(p["tokens_per_second"] > 0 for p in phases)
        and result["training"]["plain_trainer"]["tokens_per_second"] > 0
    )
    scores = result["scoring"]
    assert scores["hf-stack"]["metrics"].keys() == scores["lm-eval"]["metrics"].keys() and scores["speedup"] > 0
    assert scores["largest_metric_difference"] < 1e-4  # float32 in the dry run: the backends agree
    fsdp = result["fsdp2_growth"]  # 2 CPU processes with the tests' shim
    assert [p["parallelism"] for p in fsdp["phases"]] == [{"strategy": "fsdp2", "sharded": True, "world_size": 2}] * 2
    assert len(fsdp["peak_memory_mb_per_rank"]) == 2 and fsdp["phases"][1]["tokens_per_second"] > 0
