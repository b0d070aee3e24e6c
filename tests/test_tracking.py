"""tracking_args.report_to: each round's figures in TensorBoard event files and an offline W&B run, read back."""
from __future__ import annotations

import json

import pytest
from conftest import run_shipped_recipe

from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.results import MetricsLog
from fedml_pfedseq.tracking import round_scalars


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_history(folder) -> list[dict]:
    """The history records of the one offline W&B run under ``folder``, read from its .wandb file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    store, history = DataStore(), []
    store.open_for_scan(str(path))
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key: json.loads(item.value_json) for item in record.history.item})
    return history


@pytest.mark.slow
def test_every_rounds_figures_reach_tensorboard_and_an_offline_wandb_run(tiny_vit, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: the tracker itself asks for offline
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    _, _, metrics = run_shipped_recipe("pfedseq", tiny_vit, tmp_path, overrides=(
        "train_args.comm_round=3", "algorithm_args.warmup_rounds=1", "tracking_args.report_to=[tensorboard, wandb]"))
    log = MetricsLog(rows=metrics["eval"], train_rows=metrics["train"], server_rows=metrics["server"],
                     round_seconds=metrics["round_seconds"])
    expected = {t: round_scalars(log, t) for t in range(4)}
    assert set(expected[0]) == {f"eval/{k}" for k in ("validation_accuracy", "validation_loss", "test_accuracy",
                                                      "test_loss")}  # round 0: the evaluation before training
    assert {"train/loss", "server/participants", "time/round_seconds"} <= set(expected[1])
    assert "server/calibration_to_drift_ratio_mean" in expected[2]  # pFedSeq's learner statistics, after warm-up
    board = tensorboard_scalars(tmp_path / "out" / "tensorboard")
    for t, scalars in expected.items():
        for tag, value in scalars.items():
            assert board[tag][t] == pytest.approx(value, rel=1e-6), (tag, t)
    assert sorted(board["eval/test_accuracy"]) == [0, 1, 2, 3]
    history = {row["_step"]: row for row in wandb_history(tmp_path / "out")}
    assert sorted(history) == [0, 1, 2, 3]
    for t, scalars in expected.items():
        assert {k: history[t][k] for k in scalars} == pytest.approx(scalars), t


@pytest.mark.slow
def test_report_to_is_checked_and_none_writes_nothing(tiny_vit, tmp_path):
    with pytest.raises(RecipeError, match=r"tracking_args.report_to names \['tensorbord'\]"):
        parse_recipe({"tracking_args": {"report_to": ["tensorbord"]}})
    assert parse_recipe({"tracking_args": {"report_to": ["all"]}}).tracking_args.reporters == ["tensorboard", "wandb"]
    assert parse_recipe({"tracking_args": {"report_to": ["none"]}}).tracking_args.reporters == []
    run_shipped_recipe("fedavg", tiny_vit, tmp_path, overrides=("train_args.comm_round=1",))
    assert not (tmp_path / "out" / "tensorboard").exists() and not (tmp_path / "out" / "wandb").exists()


def test_a_backend_that_is_not_installed_refuses_the_run_before_it_writes(tiny_vit, tmp_path, monkeypatch):
    import importlib.util

    from conftest import small_recipe

    from fedml_pfedseq import simulation

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    recipe = small_recipe("FedAvg", tiny_vit, tmp_path, tracking_args={"report_to": ["tensorboard"]})
    with pytest.raises(RecipeError, match=r"\['tensorboard'\], which is not installed here \(pip install tensorb"):
        simulation.run_recipe(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
