"""End-to-end federations in the in-process simulator, on small slices of the embedded Omniglot."""
import json
from pathlib import Path

import pytest
import torch
from conftest import small_recipe

from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.simulation import run_federation, run_recipe


def run(recipe):
    fed = build_federation(recipe)
    log = run_federation(fed, progress=False)
    return fed, log


def states_equal(clients, part):
    first = clients[0].state[part]
    return [all(torch.equal(c.state[part][k], first[k]) for k in first) for c in clients[1:]]


@pytest.fixture(scope="module")
def runs(tiny_vit, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fed")
    return {m: run(small_recipe(m, tiny_vit, tmp)) for m in ["FedAvg", "FedAvgLocalHead", "Local"]}


@pytest.mark.slow
def test_fedavg_clients_hold_identical_adapters_and_heads_after_aggregation(runs):
    fed, log = runs["FedAvg"]
    assert all(states_equal(fed.clients, "lora")) and all(states_equal(fed.clients, "head"))
    b_norm = sum(v.norm() for k, v in fed.clients[0].state["lora"].items() if "lora_B" in k)
    assert b_norm > 0  # the adapter moved away from PEFT's B = 0 init
    assert log.rounds == [0, 1, 2] and len(log.at(2)) == 20


@pytest.mark.slow
def test_fedavg_local_head_shares_the_adapter_but_not_the_heads(runs):
    fed, _ = runs["FedAvgLocalHead"]
    assert all(states_equal(fed.clients, "lora"))
    assert not any(states_equal(fed.clients, "head"))


@pytest.mark.slow
def test_local_clients_never_share_anything(runs):
    fed, _ = runs["Local"]
    assert not any(states_equal(fed.clients, "lora"))
    assert not any(states_equal(fed.clients, "head"))


@pytest.mark.slow
def test_a_client_refuses_a_payload_addressed_to_another(runs):
    fed, _ = runs["FedAvg"]
    with pytest.raises(ValueError, match="received the payload of client 1"):
        fed.clients[0].receive({"client_id": 1, **fed.server.global_state})
    with pytest.raises(KeyError, match="client 0: payload lacks \\['head'\\]"):
        fed.clients[0].receive({"client_id": 0, "lora": fed.server.global_state["lora"]})


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_other_numbers(tiny_vit, tmp_path):
    a = run(small_recipe("FedAvg", tiny_vit, tmp_path, train_args={"comm_round": 1}))[1].rows
    b = run(small_recipe("FedAvg", tiny_vit, tmp_path, train_args={"comm_round": 1}))[1].rows
    c = run(small_recipe("FedAvg", tiny_vit, tmp_path, train_args={"comm_round": 1},
                         common_args={"random_seed": 1}))[1].rows
    assert a == b
    assert a != c


@pytest.mark.slow
def test_run_recipe_writes_metrics_plot_table_and_summary(tiny_vit, tmp_path):
    recipe = small_recipe("FedAvgLocalHead", tiny_vit, tmp_path, train_args={"comm_round": 1})
    summary = run_recipe(recipe, tmp_path / "out", progress=False)
    for name in ["metrics.csv", "metrics.json", "train_metrics.csv", "learning_curve.png", "final_table.md",
                 "summary.json", "recipe.yaml"]:
        assert (tmp_path / "out" / name).is_file(), name
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved == summary and saved["clients"] == 20 and saved["rounds"] == 1
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rows = metrics["eval"]
    assert len(rows) == 40 and {r["round"] for r in rows} == {0, 1}
    assert all(len(metrics[k]) == 1 and metrics[k][0] > 0 for k in ["round_seconds", "train_seconds", "eval_seconds"])
    assert metrics["train_seconds"][0] + metrics["eval_seconds"][0] <= metrics["round_seconds"][0]


@pytest.mark.slow
def test_fedavg_learns_omniglot_alphabets_above_chance_with_the_pretrained_backbone(tmp_path):
    """The committed backbone, 20 drawers x 200 drawings, 3 rounds at the recipes' lr: well above 1/50 chance.

    Measured when written: mean test accuracy 0.029 at round 0 and 0.126 at round 3.
    """
    recipe = small_recipe("FedAvg", "vit-small-cifar10", tmp_path, data_args={"samples_per_client": 200},
                          train_args={"comm_round": 3, "learning_rate": 0.5})
    fed, log = run(recipe)
    chance = 1 / fed.data.num_labels
    assert log.mean_at(0, "test_accuracy") < 2 * chance  # untrained head: near chance
    assert log.mean_at(3, "test_accuracy") > 3 * chance


@pytest.mark.slow
def test_default_suite_runs_every_recipe_and_writes_the_comparison(tiny_vit, tmp_path):
    from fedml_pfedseq.suite import run_suite

    overrides = [f"model_args.model={tiny_vit}", "data_args.samples_per_client=20", "train_args.comm_round=1"]
    summaries = run_suite(Path(__file__).resolve().parents[1] / "recipes/suites/default.yaml", overrides,
                          output_dir=tmp_path, progress=False)
    assert [s["method"] for s in summaries] == ["Local", "FedAvg", "FedAvgLocalHead", "pFedSeq", "pFedSeq"]
    assert summaries[-1]["recipe"] == "omniglot_pfedseq_proximal"
    for name in ["suite_summary.md", "suite_summary.csv", "suite_learning_curves.png"]:
        assert (tmp_path / name).is_file(), name
    table = (tmp_path / "suite_summary.md").read_text()
    assert all(s["recipe"] in table for s in summaries)


@pytest.mark.slow
def test_pfedseq_learns_and_personalizes_with_the_pretrained_backbone(tmp_path):
    """pFedSeq end to end (W=1, L=2, 3 rounds, 20 drawers x 200 drawings): above chance, personalized adapters
    that differ across clients, calibrations a fraction of a round's update, the learner saved.

    Measured when written: mean test accuracy 0.016 / 0.041 / 0.070 / 0.068 at rounds 0-3 (the heads are local, so
    they learn from 140 drawings each, slower than FedAvg's shared head); ||xi_i|| / ||theta_g|| 0.009-0.014. With
    the magnitude-preserving learner: ||xi_i|| / mean ||Delta_i|| 0.126 at round 2, ||xi_i|| / ||theta_g - theta^0||
    0.07-0.39.
    """
    from fedml_pfedseq.models.seq_learner import SeqLearnerModel

    recipe = small_recipe("pFedSeq", "vit-small-cifar10", tmp_path, data_args={"samples_per_client": 200},
                          train_args={"comm_round": 3, "learning_rate": 0.5},
                          algorithm_args={"warmup_rounds": 1, "seq_len": 2})
    fed = build_federation(recipe)
    log = run_federation(fed, progress=False)
    chance = 1 / fed.data.num_labels
    assert log.mean_at(3, "test_accuracy") > 2.5 * chance
    assert not any(states_equal(fed.clients, "lora"))  # each client holds its own adapter
    for row in log.server_rows[1:]:  # rounds 2 and 3 are past warm-up
        assert 0 < row["calibration_to_drift_ratio_min"] <= row["calibration_to_drift_ratio_max"]
        assert 0.02 < row["calibration_to_update_ratio_mean"] < 1.0  # about output_scale_init (0.1) of an update
    fed.server.save_artifacts(tmp_path)
    loaded = SeqLearnerModel.from_pretrained(tmp_path / "seq_learner")
    assert loaded.config.num_clients == 20 and loaded.config.num_adapter_layers == 6
