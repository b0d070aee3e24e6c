"""A refused command changes nothing and says why in one line: every check that can refuse `pfedseq run` (output
folder, data files and columns, checkpoint and its recipe) happens before anything under the output folder is
written, so a previous run there stays byte-identical, and the command exits 2 with `pfedseq: error: ...`."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import three_clients

from fedml_pfedseq.cli import main
from fedml_pfedseq.config import RecipeWarning
from fedml_pfedseq.data.loading import EMBEDDED_DATA_DIR, KNOWN_DATASETS
from fedml_pfedseq.simulation import CHECKPOINT_FILE, run_recipe


def three_drawers(method: str, tiny_vit: str, tmp_path: Path, **train_args):
    """``three_clients`` with 30 drawings per drawer, one round at learning rate 0.05 (``train_args`` override)."""
    return three_clients(method, tiny_vit, tmp_path, data_args={"samples_per_client": 30},
                         train_args={"comm_round": 1, "learning_rate": 0.05, **train_args}, algorithm_args={})


def write_recipe(recipe, path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    return path


def column_subset_of_omniglot(tmp_path: Path, drop: str) -> Path:
    """A data folder whose omniglot parquet lacks column ``drop`` (three drawers' drawings)."""
    folder = tmp_path / f"without_{drop}"
    folder.mkdir()
    table = pq.read_table(EMBEDDED_DATA_DIR / KNOWN_DATASETS["omniglot"].files["train"])
    table = table.filter(pq.read_table(EMBEDDED_DATA_DIR / KNOWN_DATASETS["omniglot"].files["train"],
                                       columns=["drawer"]).column("drawer").to_numpy() <= 3)
    pq.write_table(table.drop_columns([drop]), folder / KNOWN_DATASETS["omniglot"].files["train"])
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by its content hash (and the folder's file list)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_vit, tmp_path_factory):
    """A finished 1-round pFedSeq run with its checkpoint, adapters and recipe file."""
    tmp_path = tmp_path_factory.mktemp("finished")
    recipe = three_drawers("pFedSeq", tiny_vit, tmp_path)
    run_recipe(recipe, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "adapters" / "manifest.json").is_file()
    return recipe, tmp_path / "run"


@pytest.fixture()
def run_copy(finished_run, tmp_path):
    """A copy of the finished run to refuse things on, and its snapshot."""
    recipe, run = finished_run
    copy = tmp_path / "run"
    os.system(f"cp -r {run} {copy}")
    return recipe, copy, snapshot(copy)


def refused(argv: list[str], capsys) -> str:
    """Run the command; it must exit 2 with one `pfedseq: error:` line; return that line."""
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("pfedseq: error: "), err
    return err[0]


def test_a_truncated_checkpoint_is_refused_and_the_run_kept(run_copy, tmp_path, capsys):
    recipe, run, before = run_copy
    with open(run / CHECKPOINT_FILE, "r+b") as f:
        f.truncate((run / CHECKPOINT_FILE).stat().st_size // 2)
    before = snapshot(run)
    line = refused(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output-dir", str(run), "--resume",
                    "--no-progress", "--set", "train_args.comm_round=2"], capsys)
    assert "checkpoint.safetensors" in line
    assert snapshot(run) == before


def test_resume_with_another_method_names_the_keys_and_keeps_the_run(run_copy, tiny_vit, tmp_path, capsys):
    _, run, before = run_copy
    other = write_recipe(three_drawers("FedAvg", tiny_vit, tmp_path, comm_round=2), tmp_path / "fedavg.yaml")
    line = refused(["run", str(other), "--output-dir", str(run), "--resume", "--no-progress"], capsys)
    assert "train_args.federated_optimizer: 'pFedSeq' -> 'FedAvg'" in line
    assert snapshot(run) == before


def test_resume_with_a_changed_learning_rate_keeps_the_run(run_copy, tmp_path, capsys):
    recipe, run, before = run_copy
    line = refused(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output-dir", str(run), "--resume",
                    "--no-progress", "--set", "train_args.learning_rate=0.1", "--set", "train_args.comm_round=2"],
                   capsys)
    assert "train_args.learning_rate: 0.05 -> 0.1" in line
    assert snapshot(run) == before


def test_resume_from_another_runs_checkpoint_keeps_the_run(run_copy, finished_run, tiny_vit, tmp_path, capsys):
    """--resume-from copies the checkpoint in only once it is accepted."""
    _, run, before = run_copy
    other = write_recipe(three_drawers("FedAvg", tiny_vit, tmp_path, comm_round=2), tmp_path / "fedavg.yaml")
    fedavg_run = tmp_path / "fedavg_run"
    assert main(["run", str(other), "--output-dir", str(fedavg_run), "--no-progress"]) == 0
    capsys.readouterr()
    refused(["run", str(write_recipe(finished_run[0], tmp_path / "r.yaml")), "--output-dir", str(run),
             "--resume-from", str(fedavg_run), "--no-progress", "--set", "train_args.comm_round=2"], capsys)
    assert snapshot(run) == before


def test_data_without_the_image_column_is_refused_before_anything_is_written(run_copy, tmp_path, capsys):
    recipe, run, before = run_copy
    data = column_subset_of_omniglot(tmp_path, drop="image")
    line = refused(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output-dir", str(run), "--no-progress",
                    "--set", f"data_args.data_dir={data}"], capsys)
    assert str(data / "omniglot28.parquet") in line and "'image'" in line
    assert snapshot(run) == before


def test_data_without_the_partition_column_names_the_file_and_the_default_key(run_copy, tmp_path, capsys):
    recipe, run, before = run_copy
    data = column_subset_of_omniglot(tmp_path, drop="drawer")
    line = refused(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output-dir", str(run), "--no-progress",
                    "--set", f"data_args.data_dir={data}", "--set", "data_args.partition_method=column",
                    "--set", "train_args.client_num_in_total=null"], capsys)
    assert str(data / "omniglot28.parquet") in line
    assert "data_args.partition_column (the default)" in line and "'drawer'" in line
    assert snapshot(run) == before


def test_resume_without_a_checkpoint_keeps_the_folder(run_copy, tmp_path, capsys):
    recipe, run, _ = run_copy
    (run / CHECKPOINT_FILE).unlink()
    before = snapshot(run)
    line = refused(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output-dir", str(run), "--resume",
                    "--no-progress"], capsys)
    assert "cannot resume: no checkpoint.safetensors" in line
    assert snapshot(run) == before


def test_an_output_dir_that_is_a_file_is_refused(finished_run, tmp_path, capsys):
    recipe, _ = finished_run
    target = tmp_path / "a_file"
    target.write_text("mine")
    for output in (target, target / "below"):
        line = refused(["run", str(write_recipe(recipe, tmp_path / "r.yaml")), "--output-dir", str(output),
                        "--no-progress"], capsys)
        assert f"{target} is a file, not a folder" in line
    assert target.read_text() == "mine"


def test_a_runs_own_recipe_resumes_in_place(run_copy, capsys):
    """`pfedseq run <run>/recipe.yaml --resume` continues that run, not runs/recipe/."""
    _, run, _ = run_copy
    assert main(["run", str(run / "recipe.yaml"), "--resume", "--no-progress",
                 "--set", "train_args.comm_round=2"]) == 0
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train_args"]["comm_round"] == 2
    assert not Path("runs/recipe").exists()


def test_a_pfedseq_recipe_that_never_calibrates_is_warned_about(finished_run, tmp_path, capsys):
    recipe, _ = finished_run  # comm_round 1 <= warmup_rounds 10
    path = write_recipe(recipe, tmp_path / "never.yaml")
    assert main(["check", str(path)]) == 0
    err = capsys.readouterr().err
    assert "pfedseq: warning:" in err and "no round sends a calibration" in err
    assert main(["check", str(path), "--set", "algorithm_args.warmup_rounds=0"]) == 0
    assert "warning" not in capsys.readouterr().err
    with pytest.warns(RecipeWarning, match="no round sends a calibration"):
        run_recipe(recipe, tmp_path / "never", progress=False)


def test_the_progress_bar_ends_on_the_final_evaluation(tiny_vit, tmp_path, capsys):
    recipe = three_drawers("FedAvg", tiny_vit, tmp_path, comm_round=2)
    summary = run_recipe(recipe, tmp_path / "bar", progress=True)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "evaluated=2" in last and f"test_acc={summary['final_test_accuracy_mean']:.4f}" in last, last
