"""Cross-silo deployments with ``comm_args.upload_timeout``: a client that dies mid-run no longer stops the run.

Real processes on 127.0.0.1, FedAvg with 3 clients; client 1 is killed with SIGKILL once round 1 is done. It may
still have uploaded round 2 before dying, so the tests read the first round without it from the server's rows.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest

from fedml_pfedseq import simulation
from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.cross_silo.aggregator import StrategyAggregator
from fedml_pfedseq.cross_silo.launcher import DeploymentError, deploy, read_progress
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.round_close import RoundError

from conftest import small_recipe
from test_cross_silo import alive

CLIENTS, ROUNDS, DEAD = 3, 4, 1


def fault_recipe(tiny_vit, tmp_path, method="FedAvg", **train_args):
    return small_recipe(method, tiny_vit, tmp_path,
                        data_args={"partition_method": "dirichlet", "partition_alpha": 0.5, "samples_per_client": 40},
                        train_args={"client_num_in_total": CLIENTS, "comm_round": ROUNDS, "learning_rate": 0.5,
                                    **train_args},
                        device_args={"num_threads": 1}, comm_args={"upload_timeout": 10, "round_timeout": 120})


def test_upload_timeout_is_null_or_a_positive_time_below_the_round_timeout():
    assert parse_recipe({"comm_args": {"upload_timeout": 5}}).comm_args.upload_timeout == 5
    for bad in (0, -1, 900):  # 900: the default round_timeout, after which a waiting party stops
        with pytest.raises(RecipeError, match="comm_args.upload_timeout"):
            parse_recipe({"comm_args": {"upload_timeout": bad}})


def test_a_method_that_needs_every_client_stops_naming_the_missing_one(tiny_vit, tmp_path):
    recipe = fault_recipe(tiny_vit, tmp_path, "PeFLL")
    fed = build_federation(recipe)
    aggregator = StrategyAggregator(fed.server, argparse.Namespace())
    fed.clients[0].receive(aggregator.get_model_params()[0]["payload"])
    upload = fed.clients[0].train(1)
    with pytest.raises(RoundError, match=r"round 1: PeFLL needs every client's update .*1: 'no upload"):
        aggregator.aggregate_round({0: upload}, {1: "no upload within comm_args.upload_timeout"}, participants=2)


class Deployment(threading.Thread):
    """``deploy`` in a thread, so a test can signal a party mid-run; ``outcome`` holds the summary or the error."""

    def __init__(self, recipe, out):
        super().__init__()
        self.recipe, self.out, self.outcome = recipe, out, {}
        self.start()

    def run(self):
        try:
            self.outcome["summary"] = deploy(self.recipe, self.out, progress=False)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            self.outcome["error"] = err

    def wait_for_round(self, t: int) -> dict:
        """Wait until the server has completed round ``t``; every party's pid."""
        deadline = time.monotonic() + 300
        while (read_progress(self.out) or 0) < t:
            assert time.monotonic() < deadline and self.is_alive(), f"round {t} was not reached: {self.outcome}"
            time.sleep(0.1)
        return json.loads((self.out / "logs" / "pids.json").read_text())

    def finish(self) -> dict:
        self.join(timeout=400)
        assert not self.is_alive()
        return self.outcome


def kill_a_client_after_round_1(recipe, out) -> tuple[dict, dict]:
    """SIGKILL client ``DEAD`` once round 1 is done, wait for the end: (outcome, pids)."""
    deployment = Deployment(recipe, out)
    pids = deployment.wait_for_round(1)
    os.kill(pids[f"client_{DEAD}"], signal.SIGKILL)
    return deployment.finish(), pids


def simulate_without(recipe, client: int, from_round: int) -> dict:
    """The simulator on ``recipe`` with ``client``'s uploads absent from ``from_round`` on: its rows."""
    screen = simulation.screen

    def drop(server, uploads, t, minimum):
        return screen(server, {i: u for i, u in uploads.items() if i != client or t < from_round}, t, minimum)

    with mock.patch.object(simulation, "screen", drop):
        log = simulation.run_federation(build_federation(recipe), progress=False)
    return {"eval": log.rows, "server": log.server_rows}


def test_a_client_killed_mid_run_is_left_out_and_the_others_finish(tiny_vit, tmp_path):
    recipe = fault_recipe(tiny_vit, tmp_path)
    out = tmp_path / "cross_silo"
    outcome, pids = kill_a_client_after_round_1(recipe, out)
    assert "error" not in outcome, outcome.get("error")
    assert [(d["party"], d["exit_code"]) for d in outcome["summary"]["dead_parties"]] == [(f"client_{DEAD}", -9)]
    assert not any(alive(pid) for pid in pids.values())

    metrics = json.loads((out / "metrics.json").read_text())
    server = metrics["server"]
    assert [row["round"] for row in server] == list(range(1, ROUNDS + 1))
    gone = next(row["round"] for row in server if row["aggregated"] < CLIENTS)  # the first round without it
    assert gone in (2, 3)
    for row in server:
        if row["round"] < gone:
            assert row["aggregated"] == CLIENTS and not row["left_out"]
        else:
            assert row["aggregated"] == CLIENTS - 1 and f"client {DEAD}:" in row["left_out"]
    assert "within comm_args.upload_timeout" in server[gone - 1]["left_out"] or \
        "could not be sent" in server[gone - 1]["left_out"]

    rows = {(r["round"], r["client"]) for r in metrics["eval"]}
    for i in set(range(CLIENTS)) - {DEAD}:  # the survivors: every round, and the final evaluation
        assert {t for t, c in rows if c == i} == set(range(ROUNDS + 1))
    assert (0, DEAD) in rows and max(t for t, c in rows if c == DEAD) < gone  # the dead one's rows up to its death
    assert any(r["client"] == DEAD and r["round"] == 1 for r in metrics["train"])

    simulated = simulate_without(recipe, DEAD, gone)
    assert [r["aggregated"] for r in simulated["server"]] == [r["aggregated"] for r in server]
    expected = {(r["round"], r["client"]): r for r in simulated["eval"]}
    for row in metrics["eval"]:  # the survivors trained on the aggregates of the two of them, as simulated
        for key in ["test_accuracy", "validation_accuracy", "test_loss"]:
            assert row[key] == pytest.approx(expected[row["round"], row["client"]][key], rel=1e-5, abs=1e-6), row


def test_too_few_uploads_within_the_deadline_stop_the_run_naming_the_round_and_the_minimum(tiny_vit, tmp_path):
    recipe = fault_recipe(tiny_vit, tmp_path, min_uploads_per_round=CLIENTS)
    outcome, pids = kill_a_client_after_round_1(recipe, tmp_path / "cross_silo")
    error = outcome.get("error")
    assert isinstance(error, DeploymentError) and "server (rank 0) exited" in str(error), error
    assert "2 upload(s) arrived, fewer than train_args.min_uploads_per_round = 3" in str(error)
    assert "round 2:" in str(error) or "round 3:" in str(error)
    assert not any(alive(pid) for pid in pids.values())


def test_a_late_upload_is_discarded_and_its_client_gets_payloads_again(tiny_vit, tmp_path):
    rounds = 12  # rounds without it go fast: leave many after it resumes, so its late upload lands before the end
    recipe = fault_recipe(tiny_vit, tmp_path, comm_round=rounds)
    out = tmp_path / "cross_silo"
    deployment = Deployment(recipe, out)
    pids = deployment.wait_for_round(1)
    os.kill(pids[f"client_{DEAD}"], signal.SIGSTOP)  # frozen: it misses a deadline, its payloads cannot be sent
    deployment.wait_for_round(3)
    os.kill(pids[f"client_{DEAD}"], signal.SIGCONT)  # its upload now comes late
    outcome = deployment.finish()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"]["dead_parties"] == []

    server_log = (out / "logs" / "server.log").read_text()
    assert f"discarded client {DEAD}'s late upload for round" in server_log
    server = json.loads((out / "metrics.json").read_text())["server"]
    missed = [row["round"] for row in server if f"client {DEAD}:" in row["left_out"]]
    assert missed and 3 in missed and missed[-1] < rounds  # left out while frozen, back before the end
    assert all(row["aggregated"] == CLIENTS - (row["round"] in missed) for row in server)
    rows = json.loads((out / "metrics.json").read_text())
    trained = {r["round"] for r in rows["train"] if r["client"] == DEAD}
    assert set(range(1, rounds + 1)) - set(missed) <= trained  # each round it was counted in, it trained in
    assert any(r["client"] == DEAD and r["round"] == rounds for r in rows["eval"])  # and it got the final payload


def test_a_restarted_client_rejoins_from_the_next_round(tiny_vit, tmp_path):
    recipe = fault_recipe(tiny_vit, tmp_path, comm_round=5)
    recipe.comm_args.upload_timeout = 60  # round 2 waits for the dead client while its replacement starts
    recipe.train_args.epochs = 20  # a round's training takes seconds, so the kill lands before its upload
    out = tmp_path / "cross_silo"
    deployment = Deployment(recipe, out)
    pids = deployment.wait_for_round(1)
    own = out / "parties" / f"client_{DEAD}" / "metrics.json"
    while len(json.loads(own.read_text())["received_fingerprints"]) < 2:  # it holds round 2's payload
        time.sleep(0.01)
    os.kill(pids[f"client_{DEAD}"], signal.SIGKILL)
    command = [sys.executable, "-m", "fedml_pfedseq.cli", "party", "--cf", str(out / "recipe.yaml"),
               "--rank", str(DEAD + 1), "--role", "client", "--output-dir", str(out)]  # what its silo runs again
    with (out / "logs" / "client_1_restarted.log").open("w") as log:
        restarted = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
    outcome = deployment.finish()
    assert restarted.wait(timeout=300) == 0
    assert "error" not in outcome, outcome.get("error")

    server = json.loads((out / "metrics.json").read_text())["server"]
    assert [row["aggregated"] for row in server] == [3, 2, 3, 3, 3]
    assert "client 1: restarted during the round" in server[1]["left_out"]
    rows = json.loads(own.read_text())  # the restarted party's: from round 3 on
    assert {r["round"] for r in rows["train"]} == {3, 4, 5} and {r["round"] for r in rows["eval"]} == {2, 3, 4, 5}
