"""benchmarks/cluster_structure.py: the within/across-cluster cosines against hand-computed values, and a rerun of a
saved cell that reports one row per round, calibrations only where pFedSeq sent them, and per-cluster accuracies
equal to the run's own final rows."""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_recipe

from fedml_pfedseq.simulation import run_recipe

_spec = importlib.util.spec_from_file_location(
    "cluster_structure", Path(__file__).resolve().parents[1] / "benchmarks" / "cluster_structure.py")
cluster_structure = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cluster_structure)


def test_cosines_within_and_across_clusters_by_hand():
    vectors = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 2.0]])
    clusters = torch.tensor([0, 0, 1, 1])
    within, across = cluster_structure.cluster_cosines(vectors, clusters)
    # same cluster: (0,1) cos 45 deg, (2,3) cos 0 deg; across: (0,2) 0, (0,3) 0, (1,2) cos 45, (1,3) cos 45
    assert within == pytest.approx((math.sqrt(0.5) + 1.0) / 2)
    assert across == pytest.approx(2 * math.sqrt(0.5) / 4)
    rows = cluster_structure.structure(vectors, clusters, "v")
    centred = vectors - vectors.mean(0)
    assert rows["v_centred_within"] == pytest.approx(cluster_structure.cluster_cosines(centred, clusters)[0])


def test_a_rerun_cell_reports_every_round_and_its_own_accuracies(tiny_vit, tmp_path):
    recipe = small_recipe("pFedSeq", tiny_vit, tmp_path,
                          data_args={"partition_method": "dirichlet", "partition_alpha": 0.5,
                                     "samples_per_client": 30, "cluster_transforms": ["identity", "rot180"]},
                          train_args={"client_num_in_total": 4, "comm_round": 3, "learning_rate": 0.5},
                          algorithm_args={"warmup_rounds": 1}, device_args={"num_threads": 1, "using_gpu": False})
    cell = tmp_path / "cell"
    run_recipe(recipe, cell, progress=False)
    before = sorted(p.name for p in cell.iterdir())
    result = cluster_structure.main([str(cell), "--out", str(tmp_path / "out")])
    assert sorted(p.name for p in cell.iterdir()) == before  # nothing written into the cell
    rounds = result["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert "calibration_within" not in rounds[0]  # warm-up: nothing sent beyond theta_g
    assert all("calibration_within" in r and -1 <= r["calibration_across"] <= 1 for r in rounds[1:])
    final = [r for r in json.loads((cell / "metrics.json").read_text())["eval"] if r["round"] == 3]
    assert result["test_accuracy_per_cluster"] == {
        name: pytest.approx(statistics.fmean(r["test_accuracy"] for r in final if r["client"] % 2 == c))
        for c, name in enumerate(["identity", "rot180"])}
    assert (tmp_path / "out" / "rounds.csv").read_text().count("\n") == 4
    assert yaml.safe_load((cell / "recipe.yaml").read_text())["data_args"]["cluster_transforms"] == ["identity",
                                                                                                     "rot180"]


def test_mixing_weights_by_cluster_by_hand():
    from types import SimpleNamespace

    # 4 clients in 2 clusters (0, 2 and 1, 3); client i's weights p_i over clients 0..3
    p = [[0.5, 0.1, 0.3, 0.1], [0.2, 0.4, 0.2, 0.2], [0.3, 0.1, 0.6, 0.0], [0.1, 0.3, 0.1, 0.5]]
    clients = [SimpleNamespace(p=torch.tensor(row)) for row in p]
    weights = cluster_structure.mixing_weights(clients, ["identity", "rot90"])["mixing_weight_per_peer"]
    assert weights["same_cluster"] == pytest.approx((0.3 + 0.2 + 0.3 + 0.3) / 4)  # p_02, p_13, p_20, p_31
    assert weights["other_cluster"] == pytest.approx((0.1 + 0.1 + 0.2 + 0.2 + 0.1 + 0.0 + 0.1 + 0.1) / 8)
    assert weights["self"] == pytest.approx((0.5 + 0.4 + 0.6 + 0.5) / 4)
    assert cluster_structure.mixing_weights([SimpleNamespace(), SimpleNamespace()], ["identity", "rot90"]) == {}
