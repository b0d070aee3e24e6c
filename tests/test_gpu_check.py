"""The GPU check's CPU rehearsal (issue 30): benchmarks/gpu_check.sh runs every step with the packages the GPU image
lacks (datasets, evaluate, FedML, mamba-ssm, cryptography, Ray) unimportable, at small shapes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_without_the_packages_the_gpu_image_lacks(tmp_path):
    env = {**os.environ, "REHEARSE": "1", "PYTHON": sys.executable, "KIT": str(tmp_path / "empty_kit")}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for step in ("== 1. environment", "== 2. mamba-ssm", "== 3. kernel vs loop", "== 4. learner round",
                 "== 5. a ViT-B/16-shaped pFedSeq round in bf16"):
        assert step in out
    assert "mamba_ssm is not installed on the GPU image" in out  # the blocker was active
    assert "not built: no source in" in out
    assert "client epoch, second" in out and "server round 4 (full history, calibrations sent)" in out
    assert out.count("| custom | 512 | 20 | 15 |") == 2  # the scan that runs, then the loop


def test_the_rehearsal_blocks_what_it_says():
    code = ("import importlib\n"
            "for name in ('datasets', 'fedml', 'evaluate'):\n"
            "    try:\n"
            "        importlib.import_module(name)\n"
            "    except ImportError:\n"
            "        print('blocked', name)\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'benchmarks' / 'gpu_rehearsal'}:{REPO}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["blocked datasets", "blocked fedml", "blocked evaluate"]
