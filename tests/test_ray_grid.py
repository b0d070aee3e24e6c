"""pfedseq grid --engine ray: each cell a Ray task; a rerun skips finished cells, a cell whose process is killed is
retried from its checkpoint, and cells whose clients run on Ray workers do not deadlock on a 2-CPU Ray."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import yaml
from conftest import RECIPES, own_ray_processes

from fedml_pfedseq.cli import main
from fedml_pfedseq.config import RayArgs
from fedml_pfedseq.grid import load_grid, run_grid
from fedml_pfedseq.ray_engine import RaySession
from fedml_pfedseq.ray_grid import cell_resources
from fedml_pfedseq.simulation import run_recipe

TINY = ["device_args.num_threads=1", "device_args.using_gpu=false"]


@pytest.fixture(scope="module")
def local_ray():
    with RaySession(RayArgs(object_store_mib=200), cpus=2) as session:
        yield session


def summaries(root) -> dict[str, float]:
    return {p.parent.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("summary.json")}


@pytest.mark.slow
def test_the_smoke_grid_on_ray_runs_its_cells_and_a_rerun_skips_them(tiny_vit, tmp_path, local_ray, capsys):
    """Two of the smoke grid's rows (the first and pFedSeq) as Ray tasks: every method's run on Ray is the Ray
    engine's matrix (test_ray_engine.py), the whole smoke grid runs locally in test_grid.py."""
    rows = ["Local", "pFedSeq"]
    command = ["grid", str(RECIPES / "grids" / "smoke.yaml"), "--engine", "ray", "--no-progress", "--output-dir",
               str(tmp_path / "smoke"), "--rows", *rows, "--set", f"model_args.model={tiny_vit}",
               *[a for s in TINY for a in ("--set", s)]]
    assert main(command) == 0
    table = capsys.readouterr().out
    done = summaries(tmp_path / "smoke")
    assert sorted(done) == [f"omniglot/{row}/seed_0" for row in sorted(rows)]
    assert all(f"| {row} " in table for row in rows)
    assert main(command) == 0
    assert summaries(tmp_path / "smoke") == done  # nothing ran again...
    assert capsys.readouterr().out == table  # ...and the table is the same


def small_grid(tmp_path, tiny_vit, **changes):
    raw = {"methods": [str(RECIPES / "omniglot_fedavg.yaml")], "scenarios": {"small": []}, "seeds": [0],
           "overrides": [f"model_args.model={tiny_vit}", "data_args.samples_per_client=40", "train_args.comm_round=3",
                         *TINY], "output_dir": str(tmp_path / "grid"), **changes}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def final_rows(folder) -> list[dict]:
    return json.loads((folder / "metrics.json").read_text())["eval"]


@pytest.mark.slow
def test_a_cell_whose_process_is_killed_is_retried_from_its_checkpoint(tiny_vit, tmp_path, local_ray):
    path = small_grid(tmp_path, tiny_vit)
    cell = tmp_path / "grid" / "small" / "FedAvg" / "seed_0"
    killed = []

    def kill_after_the_first_checkpoint():
        while not (cell / "checkpoint.safetensors").is_file():
            time.sleep(0.02)
        for process in own_ray_processes("ray::run_cell"):
            os.kill(process.pid, signal.SIGKILL)
            killed.append(process.pid)

    killer = threading.Thread(target=kill_after_the_first_checkpoint, daemon=True)
    killer.start()
    run_grid(path, progress=False, engine="ray")
    killer.join(timeout=5)
    assert len(killed) == 1
    recipe = load_grid(path).seed_cells({})[0].recipe
    run_recipe(recipe, tmp_path / "uninterrupted", progress=False)
    assert final_rows(cell) == final_rows(tmp_path / "uninterrupted")


@pytest.mark.slow
def test_cells_that_run_their_clients_on_ray_hold_no_cpu_and_do_not_deadlock(tiny_vit, tmp_path, local_ray):
    """Two cells at once, each wanting 2 one-CPU workers, on a 2-CPU Ray: the cells hold no CPU, each cell's workers
    come as one placement group, so one cell waits for the other instead of both holding one CPU for ever."""
    on_ray = ["common_args.engine=ray", "ray_args.num_workers=2", "train_args.comm_round=1"]
    path = small_grid(tmp_path, tiny_vit, seeds=[0, 1])
    cells = load_grid(path, on_ray).seed_cells({})
    assert [cell_resources(cell, gpus=0) for cell in cells] == [{"num_cpus": 0}] * 2
    assert cell_resources(load_grid(path).seed_cells({})[0], gpus=0) == {"num_cpus": 1, "num_gpus": 0}
    run_grid(path, on_ray, progress=False, engine="ray")
    run_grid(path, ["train_args.comm_round=1"], output_dir=tmp_path / "local", progress=False)
    for seed in (0, 1):
        rows = [final_rows(root / "small" / "FedAvg" / f"seed_{seed}") for root in (tmp_path / "grid",
                                                                                    tmp_path / "local")]
        assert [r["test_loss"] for r in rows[0]] == pytest.approx([r["test_loss"] for r in rows[1]], rel=1e-6)
        assert yaml.safe_load((tmp_path / "grid" / "small" / "FedAvg" / f"seed_{seed}" / "recipe.yaml").read_text()
                              )["common_args"]["engine"] == "ray"
