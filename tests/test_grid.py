"""Grids: every (scenario, method, seed) cell runs once, the table is mean +- std over seeds of the cells' own
summaries, an interrupted grid reruns only its unfinished cells, a changed recipe for a finished cell is refused,
and tuning keeps each method's candidate with the best validation accuracy."""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import RECIPES

import fedml_pfedseq.grid as grid
import fedml_pfedseq.simulation as simulation
from fedml_pfedseq.config import RecipeError, load_recipe
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.simulation import run_federation


def write_grid(tmp_path, tiny_vit, **changes) -> Path:
    raw = {
        "methods": [str(RECIPES / "omniglot_fedavg.yaml"),
                    {"recipe": str(RECIPES / "omniglot_fedavg_local_head.yaml"), "name": "local_heads"}],
        "scenarios": {"small": ["data_args.samples_per_client=40"], "smaller": ["data_args.samples_per_client=30"]},
        "seeds": [0, 1],
        "overrides": [f"model_args.model={tiny_vit}", "train_args.comm_round=1", "device_args.num_threads=1",
                      "device_args.using_gpu=false"],
        "output_dir": str(tmp_path / "grid"),
        **changes,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_a_grid_runs_every_cell_once_and_resumes_only_the_unfinished_ones(tiny_vit, tmp_path, monkeypatch):
    path = write_grid(tmp_path, tiny_vit)
    ran = []
    real_run = simulation.run_recipe

    def counting(recipe, output_dir, progress=True, resume=False):
        ran.append(output_dir.relative_to(tmp_path / "grid").as_posix() + (" (resumed)" if resume else ""))
        return real_run(recipe, output_dir, progress=progress, resume=resume)

    monkeypatch.setattr(simulation, "run_recipe", counting)
    result = grid.run_grid(path, progress=False)
    cells = [f"{s}/{m}/seed_{k}" for s in ("small", "smaller") for m in ("FedAvg", "local_heads") for k in (0, 1)]
    assert sorted(ran) == sorted(cells)

    # the table from the cells' own summaries, by hand
    for scenario in ("small", "smaller"):
        for method in ("FedAvg", "local_heads"):
            test = [json.loads((tmp_path / "grid" / scenario / method / f"seed_{k}" / "summary.json").read_text())
                    ["final_test_accuracy_mean"] for k in (0, 1)]
            entry = result["table"][method][scenario]
            assert entry["test_mean"] == pytest.approx(statistics.fmean(test))
            assert entry["test_std"] == pytest.approx(statistics.stdev(test))
            assert entry["seeds"] == 2
    seeds = [yaml.safe_load((tmp_path / "grid/small/FedAvg" / f"seed_{k}" / "recipe.yaml").read_text())
             ["common_args"]["random_seed"] for k in (0, 1)]
    assert seeds == [0, 1]
    for name in ("grid_cells.csv", "grid_summary.json", "grid_table.md", "grid_curves_small.png",
                 "grid_curves_smaller.png"):
        assert (tmp_path / "grid" / name).is_file()
    assert "local_heads" in (tmp_path / "grid/grid_table.md").read_text()

    assert not list((tmp_path / "grid").rglob("checkpoint.safetensors"))  # a finished cell keeps its summary only

    # interrupted: one cell lost its summary -> only that cell runs again; the others are reused as they are
    (tmp_path / "grid/smaller/local_heads/seed_1/summary.json").unlink()
    ran.clear()
    again = grid.run_grid(path, progress=False)
    assert ran == ["smaller/local_heads/seed_1"]
    assert again["table"] == result["table"]  # the rerun cell reproduces its numbers (seeded)

    # killed mid-run (its checkpoint is there, its summary is not) -> it resumes from the checkpoint
    cell = tmp_path / "grid/smaller/FedAvg/seed_0"
    (cell / "summary.json").unlink()
    run_federation(build_federation(load_recipe(cell / "recipe.yaml")), progress=False,
                   checkpoint=cell / "checkpoint.safetensors")
    ran.clear()
    assert grid.run_grid(path, progress=False)["table"] == result["table"]
    assert ran == ["smaller/FedAvg/seed_0 (resumed)"] and not (cell / "checkpoint.safetensors").exists()

    # a finished cell is never mixed with a different recipe
    changed = write_grid(tmp_path, tiny_vit, overrides=[f"model_args.model={tiny_vit}", "train_args.comm_round=1",
                                                        "device_args.num_threads=1", "device_args.using_gpu=false",
                                                        "train_args.learning_rate=0.2"])
    ran.clear()
    with pytest.raises(RecipeError, match="different recipe"):
        grid.run_grid(changed, progress=False)
    assert ran == []


@pytest.mark.slow
def test_rows_and_seeds_run_only_those_cells_in_the_whole_grids_folders(tiny_vit, tmp_path, monkeypatch):
    path = write_grid(tmp_path, tiny_vit, scenarios={"small": ["data_args.samples_per_client=40"]}, seeds=[0, 1],
                      tuning={"rounds": 1, "grid": {"train_args.learning_rate": [0.05, 0.5]},
                              "grid_chosen_by": "FedAvg"})
    ran = []
    real_run = simulation.run_recipe
    monkeypatch.setattr(simulation, "run_recipe", lambda recipe, out, progress=True, resume=False: ran.append(
        out.relative_to(tmp_path / "grid/small").as_posix()) or real_run(recipe, out, progress=progress, resume=resume))
    part = grid.run_grid(path, progress=False, rows=["local_heads"], seeds=[1])
    # the chooser's tuning still picks the grid's values; of the seed cells only the row and seed asked for run
    assert sorted(ran) == ["FedAvg/tune/learning_rate=0.05", "FedAvg/tune/learning_rate=0.5", "local_heads/seed_1"]
    assert set(part["table"]) == {"local_heads"}
    ran.clear()
    whole = grid.run_grid(path, progress=False, seeds=[1])
    assert ran == ["FedAvg/seed_1"]  # the row's cell is the whole grid's: kept, not rerun
    assert whole["table"]["local_heads"] == part["table"]["local_heads"]
    with pytest.raises(RecipeError, match=r"\['FedRep'\] are not rows of this grid"):
        grid.run_grid(path, progress=False, rows=["FedRep"])
    with pytest.raises(RecipeError, match=r"\[5\] are not seeds of this grid; its seeds are \[0, 1\]"):
        grid.run_grid(path, progress=False, seeds=[5])
    assert ran == ["FedAvg/seed_1"]  # refused before anything ran


def test_command_overrides_win_over_the_grids_and_the_scenarios_but_not_an_entrys_own(tiny_vit, tmp_path):
    path = write_grid(tmp_path, tiny_vit, methods=[
        str(RECIPES / "omniglot_fedavg.yaml"),
        {"recipe": str(RECIPES / "omniglot_fedavg_local_head.yaml"), "name": "local_heads",
         "set": ["data_args.samples_per_client=25"]}])
    loaded = grid.load_grid(path, ["data_args.samples_per_client=35", "train_args.comm_round=2"])
    sizes = {(c.scenario, c.method): c.recipe.data_args.samples_per_client for c in loaded.seed_cells({})}
    assert sizes == {("small", "FedAvg"): 35, ("smaller", "FedAvg"): 35,  # the scenarios say 40 and 30
                     ("small", "local_heads"): 25, ("smaller", "local_heads"): 25}
    assert {c.recipe.train_args.comm_round for c in loaded.seed_cells({})} == {2}  # the grid's overrides say 1
    assert {c.recipe.data_args.samples_per_client for c in grid.load_grid(path).seed_cells({})} == {40, 30, 25}


# --- parallel cells and several processes on one folder -----------------------------------------------------

def one_scenario_grid(tmp_path, tiny_vit, **changes) -> Path:
    return write_grid(tmp_path, tiny_vit, scenarios={"small": ["data_args.samples_per_client=40"]}, **changes)


def lock(cell: Path, host: str, pid: int | str) -> None:
    cell.mkdir(parents=True, exist_ok=True)
    (cell / grid.LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid}))


@pytest.mark.slow
def test_two_workers_give_the_one_worker_table_and_leave_no_lock(tiny_vit, tmp_path):
    path = one_scenario_grid(tmp_path, tiny_vit, seeds=[0])
    parallel = grid.run_grid(path, progress=False, workers=2)  # 2 cells, one process each
    serial = grid.run_grid(path, progress=False, output_dir=tmp_path / "serial")
    assert parallel["table"] == serial["table"] and set(parallel["table"]) == {"FedAvg", "local_heads"}
    assert not list((tmp_path / "grid").rglob(grid.LOCK_FILE))
    with pytest.raises(RecipeError, match="workers must be >= 1"):
        grid.run_grid(path, progress=False, workers=0)


def test_cells_running_at_once_get_gpus_round_robin(tiny_vit, tmp_path, monkeypatch):
    path = write_grid(tmp_path, tiny_vit, scenarios={"small": ["data_args.samples_per_client=40"]}, seeds=[0, 1, 2])
    started = []

    def fake_start(pool, cell, threads, gpu=None):  # finishes at once, as a cell that ran
        started.append((cell.method, cell.seed, gpu))
        cell.output_dir.mkdir(parents=True, exist_ok=True)
        (cell.output_dir / "summary.json").write_text(json.dumps({
            "final_test_accuracy_mean": 0.5, "final_validation_accuracy_mean": 0.5, "mean_round_seconds": 1.0}))
        future = grid.Future()
        future.set_result(None)
        return future

    monkeypatch.setattr(grid, "start", fake_start)
    monkeypatch.setattr(grid, "gpu_ids", lambda: ["0", "1"])
    monkeypatch.setattr(grid, "summarize", lambda cells, root, candidates=None: {})
    grid.run_grid(path, progress=False, workers=3)
    assert len(started) == 6 and {gpu for _, _, gpu in started} == {0, 1}
    # three slots on two GPUs: the first three cells start together on GPUs 0, 1, 0
    assert [gpu for _, _, gpu in started[:3]] == [0, 1, 0]
    monkeypatch.setattr(grid, "gpu_ids", lambda: [])
    started.clear()
    grid.run_grid(path, progress=False, workers=2, output_dir=tmp_path / "cpu")
    assert {gpu for _, _, gpu in started} == {None}


def test_parties_get_one_gpu_each_round_robin():
    from fedml_pfedseq.cross_silo.launcher import party_env

    env = {"PATH": "/bin"}
    assert [party_env(env, rank, ["2", "3"])["CUDA_VISIBLE_DEVICES"] for rank in range(4)] == ["2", "3", "2", "3"]
    assert party_env(env, 1, ["0"]) is env and party_env(env, 1, []) is env  # one GPU or none: as it is


@pytest.mark.slow
def test_a_cell_another_live_process_holds_is_left_to_it_and_waited_for(tiny_vit, tmp_path, monkeypatch):
    path = one_scenario_grid(tmp_path, tiny_vit, seeds=[0])
    held = tmp_path / "grid/small/FedAvg/seed_0"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    lock(held, socket.gethostname(), holder.pid)
    ran, waits = [], []
    real_run_cell = grid.run_cell
    monkeypatch.setattr(grid, "run_cell", lambda recipe, out, threads=None: ran.append(out) or
                        real_run_cell(recipe, out, threads))

    def other_process_finishes(seconds):  # what the holder does while this process waits: run the cell, exit
        waits.append(seconds)
        recipe = grid.load_grid(path).seed_cells({})[0].recipe
        assert recipe.label == "small_FedAvg_seed0"
        real_run_cell(recipe, held)
        holder.kill()
        holder.wait()
        (held / grid.LOCK_FILE).unlink()

    monkeypatch.setattr(grid, "wait_for_others", other_process_finishes)
    try:
        result = grid.run_grid(path, progress=False)
    finally:
        holder.kill()
    assert ran == [tmp_path / "grid/small/local_heads/seed_0"] and len(waits) == 1
    assert result["table"]["FedAvg"]["small"]["seeds"] == 1  # the holder's cell is in the table


@pytest.mark.slow
def test_the_cell_of_a_process_that_died_on_this_host_is_taken_over(tiny_vit, tmp_path):
    path = one_scenario_grid(tmp_path, tiny_vit, seeds=[0])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock(tmp_path / "grid/small/FedAvg/seed_0", socket.gethostname(), dead.pid)
    (tmp_path / "grid/small/local_heads/seed_0").mkdir(parents=True)
    (tmp_path / "grid/small/local_heads/seed_0" / grid.LOCK_FILE).write_text('{"host": ')  # died writing it
    result = grid.run_grid(path, progress=False)
    assert result["table"]["FedAvg"]["small"]["seeds"] == result["table"]["local_heads"]["small"]["seeds"] == 1
    assert not list((tmp_path / "grid").rglob(grid.LOCK_FILE))


def test_a_lock_from_another_host_is_never_taken_over(tiny_vit, tmp_path):
    cell = grid.load_grid(one_scenario_grid(tmp_path, tiny_vit, seeds=[0])).seed_cells({})[0]
    lock(cell.output_dir, "another-host", 1)
    assert not grid.claim(cell)
    (cell.output_dir / grid.LOCK_FILE).unlink()
    assert grid.claim(cell) and json.loads((cell.output_dir / grid.LOCK_FILE).read_text()) == {
        "host": socket.gethostname(), "pid": os.getpid()}
    assert not grid.claim(cell)  # this process holds it now
    grid.release(cell)
    assert not (cell.output_dir / grid.LOCK_FILE).exists()


def run_tuned_grid(tiny_vit, tmp_path, monkeypatch, **tuning) -> tuple[dict, list[Path]]:
    """A one-scenario, one-seed grid tuning lr {0.05, 0.5} x local_heads' epochs {1, 2} (plus ``tuning``) for 1
    round: its result and the output folder of every run, in order."""
    tuning = {"rounds": 1, "seed": 5, "grid": {"train_args.learning_rate": [0.05, 0.5]},
              "methods": {"local_heads": {"train_args.epochs": [1, 2]}}, **tuning}
    path = write_grid(tmp_path, tiny_vit, tuning=tuning, scenarios={"small": ["data_args.samples_per_client=40"]},
                      seeds=[0])
    ran = []
    real_run = simulation.run_recipe
    monkeypatch.setattr(simulation, "run_recipe", lambda recipe, out, progress=True, resume=False: ran.append(out) or
                        real_run(recipe, out, progress=progress, resume=resume))
    return grid.run_grid(path, progress=False), ran


@pytest.mark.slow
def test_tuning_keeps_the_candidate_with_the_best_validation_accuracy_and_seeds_run_with_it(tiny_vit, tmp_path,
                                                                                           monkeypatch):
    result, ran = run_tuned_grid(tiny_vit, tmp_path, monkeypatch)
    tune = tmp_path / "grid/small"
    assert sorted(p.relative_to(tune).as_posix() for p in ran[:6]) == sorted(
        ["FedAvg/tune/learning_rate=0.05", "FedAvg/tune/learning_rate=0.5"]
        + [f"local_heads/tune/learning_rate={lr},epochs={e}" for lr in (0.05, 0.5) for e in (1, 2)])
    assert len(ran) == 8 and len(result["tuning_candidates"]) == 6
    for method in ("FedAvg", "local_heads"):
        folders = sorted((tune / method / "tune").iterdir())
        recipes = [yaml.safe_load((f / "recipe.yaml").read_text()) for f in folders]
        assert {r["train_args"]["comm_round"] for r in recipes} == {1}
        assert {r["common_args"]["random_seed"] for r in recipes} == {5}
        validation = {f: json.loads((f / "summary.json").read_text())["final_validation_accuracy_mean"]
                      for f in folders}
        best = max(validation.values())
        winners = [yaml.safe_load((f / "recipe.yaml").read_text())["train_args"] for f, v in validation.items()
                   if v == best]
        seed_recipe = yaml.safe_load((tune / method / "seed_0" / "recipe.yaml").read_text())
        assert {"learning_rate": seed_recipe["train_args"]["learning_rate"],
                "epochs": seed_recipe["train_args"]["epochs"]} in [
            {"learning_rate": w["learning_rate"], "epochs": w["epochs"]} for w in winners]
        assert seed_recipe["train_args"]["comm_round"] == 1 and seed_recipe["common_args"]["random_seed"] == 0
        assert result["table"][method]["small"]["tuned"]["train_args.learning_rate"] == \
            seed_recipe["train_args"]["learning_rate"]
    ran.clear()
    grid.run_grid(tmp_path / "grid.yaml", progress=False)
    assert ran == []  # tuning and seeds all resume as done


@pytest.mark.parametrize("changes, message", [
    ({"seeds": [0, 0]}, "seeds must be a non-empty list of distinct integers"),
    ({"seeds": []}, "seeds must be"),
    ({"scenarios": {}}, "scenarios must be a non-empty mapping"),
    ({"scenarios": {"small": "data_args.samples_per_client=40"}}, "small must be a list"),
    ({"methods": []}, "methods must be a non-empty list"),
    ({"tables": 1}, "unknown grid key"),
    ({"methods": [str(RECIPES / "omniglot_fedavg.yaml")] * 2}, "share the row name"),
    ({"overrides": ["train_args.comm_rounds=1"]}, "comm_rounds"),
    ({"tuning": {"grid": {"train_args.learning_rate": [0.1]}}}, "tuning must be a mapping with 'rounds'"),
    ({"tuning": {"rounds": 0}}, "tuning.rounds must be an integer >= 1"),
    ({"tuning": {"rounds": 1, "grid": {"train_args.learning_rate": []}}}, "tuning.grid must map"),
    ({"tuning": {"rounds": 1, "methods": {"Ditto": {"algorithm_args.ditto_lambda": [1]}}}}, "not rows of this grid"),
    ({"tuning": {"rounds": 1, "grid": {"train_args.learning_rte": [0.1]}}}, "learning_rte"),
])
def test_bad_grids_are_refused_before_anything_runs(tiny_vit, tmp_path, changes, message):
    with pytest.raises(RecipeError, match=message):
        grid.load_grid(write_grid(tmp_path, tiny_vit, **changes))


@pytest.mark.slow
def test_the_smoke_reproduction_produces_a_complete_table(tiny_vit, tmp_path):
    path = RECIPES / "grids" / "smoke.yaml"
    result = grid.run_grid(path, [f"model_args.model={tiny_vit}", "device_args.num_threads=1",
                                  "device_args.using_gpu=false"], output_dir=tmp_path / "smoke", progress=False)
    methods = yaml.safe_load(path.read_text())["methods"]
    expected = {yaml.safe_load((path.parent / m).read_text())["train_args"]["federated_optimizer"] for m in methods}
    assert set(result["table"]) == expected and len(expected) == 13  # Table 1's 13 methods
    assert all(entry["omniglot"]["seeds"] == 1 and 0 <= entry["omniglot"]["test_mean"] <= 1
               for entry in result["table"].values())
    table = (tmp_path / "smoke" / "grid_table.md").read_text()
    assert all(f"| {name} " in table for name in expected)


@pytest.mark.slow
def test_grid_chosen_by_shares_the_learning_rate_fedavg_picks_and_tunes_only_the_key_values(tiny_vit, tmp_path,
                                                                                           monkeypatch):
    result, ran = run_tuned_grid(tiny_vit, tmp_path, monkeypatch, grid_chosen_by="FedAvg")
    fedavg = {row["candidate"]["train_args.learning_rate"]: row["validation_accuracy"]
              for row in result["tuning_candidates"] if row["method"] == "FedAvg"}
    lr = max(fedavg, key=fedavg.get)  # (max keeps the first of a tie, as choose does)
    tune = tmp_path / "grid/small"
    assert [p.relative_to(tune).as_posix() for p in ran[:4]] == [
        "FedAvg/tune/learning_rate=0.05", "FedAvg/tune/learning_rate=0.5",
        f"local_heads/tune/learning_rate={lr},epochs=1", f"local_heads/tune/learning_rate={lr},epochs=2"]
    assert len(ran) == 6 and len(result["tuning_candidates"]) == 4  # 4 tuning runs, then the 2 seed cells
    assert result["table"]["local_heads"]["small"]["tuned"]["train_args.learning_rate"] == lr


def test_choose_ranks_candidates_by_validation_never_by_test(tmp_path):
    cells = []
    for i, (validation, test) in enumerate([(0.30, 0.90), (0.50, 0.10), (0.50, 0.95), (0.20, 0.99)]):
        out = tmp_path / f"c{i}"
        out.mkdir()
        (out / "summary.json").write_text(json.dumps({"final_validation_accuracy_mean": validation,
                                                      "final_test_accuracy_mean": test}))
        cells.append(grid.Cell("s", "m", 0, None, out, {"train_args.learning_rate": i}))
    chosen, rows = grid.choose(cells)
    assert chosen == {("s", "m"): {"train_args.learning_rate": 1}}  # best validation, the first of the tie
    assert [r["validation_accuracy"] for r in rows] == [0.30, 0.50, 0.50, 0.20]


@pytest.mark.slow
def test_pfedseq_grid_and_check_run_a_grid_from_the_command_line(tiny_vit, tmp_path, capsys):
    from fedml_pfedseq.cli import main

    path = write_grid(tmp_path, tiny_vit, scenarios={"small": ["data_args.samples_per_client=40"]}, seeds=[3])
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: grid of 2 seed cell(s) and 0 tuning run(s)")
    assert main(["grid", str(path), "--no-progress", "--output-dir", str(tmp_path / "cli")]) == 0
    assert "| local_heads" in capsys.readouterr().out
    assert (tmp_path / "cli/small/local_heads/seed_3/summary.json").is_file()


@pytest.mark.parametrize("path", sorted((RECIPES / "grids").rglob("*.yaml")), ids=lambda p: p.stem if
                         p.parent.name == "grids" else f"{p.parent.name}/{p.stem}")
def test_every_shipped_grid_loads_with_every_cell_valid(path):
    """The CPU-budget grids and the paper-scale ones (run elsewhere) validate every cell they would run."""
    loaded = grid.load_grid(path)
    one_seed = {"smoke", "full_data"}  # a CI check; full data at one seed first (half an hour per Omniglot cell)
    assert loaded.seed_cells({}) and set(loaded.seeds) == ({0} if path.stem in one_seed else {0, 1, 2})
    if path.parent.name == "paper_scale":
        recipe = loaded.seed_cells({})[0].recipe
        assert (recipe.model_args.model, recipe.train_args.comm_round) == ("google/vit-base-patch16-224-in21k", 80)
