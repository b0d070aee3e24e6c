"""The data path: each client's images are transformed once (``data_args.preprocess``) into exactly the tensors the
lazy transform gives on every access, so a run is the same either way; the tensors are cached by datasets under a
fingerprint of the rows and the transform, so a second build reads them back instead of transforming again."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import small_recipe

from fedml_pfedseq.config import RecipeError
from fedml_pfedseq.federation import build_data
from fedml_pfedseq.simulation import run_recipe
from fedml_pfedseq.training import loader_workers


def recipe_with(tiny_vit, tmp_path, preprocess: bool, **data_args):
    return small_recipe("FedAvgLocalHead", tiny_vit, tmp_path,
                        data_args={"samples_per_client": 30, "preprocess": preprocess,
                                   "cluster_transforms": ["identity", "rot90"], **data_args},
                        train_args={"comm_round": 2, "learning_rate": 0.5},
                        device_args={"num_threads": 1, "using_gpu": False})


@pytest.mark.slow
def test_preprocessed_tensors_equal_the_lazy_transforms(tiny_vit, tmp_path):
    once, lazy = (build_data(recipe_with(tiny_vit, tmp_path, p)) for p in (True, False))
    assert len(once.clients) == len(lazy.clients) > 2
    for a, b in zip(once.clients, lazy.clients):
        assert (a.rows, a.shift) == (b.rows, b.shift)
        for split in ("train", "validation", "test"):
            x, y = getattr(a, split), getattr(b, split)
            assert len(x) == len(y) > 0
            for i in range(len(x)):
                assert torch.equal(x[i]["pixel_values"], y[i]["pixel_values"])
                assert int(x[i]["labels"]) == int(y[i]["labels"])
    assert once.clients[1].shift == "rot90"  # the shift is part of what was kept


@pytest.mark.slow
def test_a_run_is_the_same_with_and_without_preprocessing(tiny_vit, tmp_path):
    logs = []
    for preprocess in (True, False):
        out = tmp_path / f"preprocess_{preprocess}"
        run_recipe(recipe_with(tiny_vit, tmp_path, preprocess), out, progress=False)
        logs.append(json.loads((out / "metrics.json").read_text())["eval"])
    assert logs[0] == logs[1]


@pytest.mark.slow
def test_loader_worker_processes_give_the_same_run(tiny_vit, tmp_path):
    """Shuffling happens in the main process, so worker processes (lazy transforms, where they pay) change nothing."""
    logs = []
    for workers in (0, 2):
        recipe = recipe_with(tiny_vit, tmp_path, False)
        recipe.device_args.loader_workers = workers
        run_recipe(recipe, tmp_path / f"workers_{workers}", progress=False)
        logs.append(json.loads((tmp_path / f"workers_{workers}" / "metrics.json").read_text())["eval"])
    assert logs[0] == logs[1]


def test_loader_workers_default_to_four_on_a_cuda_device_and_none_on_the_cpu(tiny_vit, tmp_path, monkeypatch):
    args = recipe_with(tiny_vit, tmp_path, True).device_args
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loader_workers(args) == 0  # the recipe says CPU
    args.using_gpu = True
    assert loader_workers(args) == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert loader_workers(args) == 2
    args.loader_workers = 1
    assert loader_workers(args) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args.loader_workers = None
    assert loader_workers(args) == 0


def test_negative_loader_workers_are_refused(tiny_vit, tmp_path):
    with pytest.raises(RecipeError, match="device_args.loader_workers"):
        small_recipe("FedAvg", tiny_vit, tmp_path, device_args={"loader_workers": -1})


def test_a_second_build_reads_the_cached_tensors(tiny_vit, tmp_path):
    def build():
        recipe = recipe_with(tiny_vit, tmp_path, True, dataset="cifar10", dataset_split="test",
                             partition_method="dirichlet", partition_alpha=1.0)
        recipe.train_args.client_num_in_total = 3
        return build_data(recipe)

    first = build()
    files = [f["filename"] for f in first.clients[0].train.cache_files]
    assert files and all(Path(f).name.startswith("cache-") for f in files)  # on disk, in datasets' cache
    written = {f: Path(f).stat().st_mtime_ns for f in files}
    again = build()
    assert [f["filename"] for f in again.clients[0].train.cache_files] == files
    assert {f: Path(f).stat().st_mtime_ns for f in files} == written  # read back, not transformed and written again
    assert torch.equal(again.clients[0].train[0]["pixel_values"], first.clients[0].train[0]["pixel_values"])


def test_a_hub_style_dataset_with_its_own_column_names_runs(tiny_vit, tmp_path, monkeypatch, capsys):
    """CIFAR-10 on the Hub names its image column "img": data_args.image_column maps it. The folder is laid out as
    a Hub dataset repo (data/<split>-*.parquet), so datasets.load_dataset reads it as it would read the Hub's."""
    import datasets
    import numpy as np
    from PIL import Image

    from fedml_pfedseq.cli import main

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(60)]
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    repo = tmp_path / "hub_cifar"
    (repo / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"img": images, "label": [i % 3 for i in range(60)]}, features=features).to_parquet(
        str(repo / "data" / "test-00000-of-00001.parquet"))
    recipe = recipe_with(tiny_vit, tmp_path, True, dataset="cifar10", hub_id=str(repo), image_column="img",
                         dataset_split="test", partition_method="dirichlet", partition_alpha=1.0, partition_min_size=5)
    recipe.train_args.client_num_in_total = 2
    summary = run_recipe(recipe, tmp_path / "run", progress=False)
    assert summary["clients"] == 2 and 0 <= summary["final_test_accuracy_mean"] <= 1
    (tmp_path / "recipe.yaml").write_text((tmp_path / "run" / "recipe.yaml").read_text())
    monkeypatch.setenv("PFEDSEQ_DATA_DIR", str(tmp_path / "empty"))  # no parquet files: the Hub folder is the data
    assert main(["check", str(tmp_path / "recipe.yaml")]) == 0
    assert "dataset" not in capsys.readouterr().err  # a local folder: nothing to download
    recipe.data_args.image_column = None
    with pytest.raises(RecipeError, match=r"has no column 'image' \(data_args.image_column"):
        run_recipe(recipe, tmp_path / "run2", progress=False)
