"""Cross-silo deployments with ``comm_args.upload_timeout``: a client that dies mid-run no longer stops the run.

Real processes on 127.0.0.1, FedAvg with 3 clients; client 1 is killed with SIGKILL once round 1 is done. It may
still have uploaded round 2 before dying, so the tests read the first round without it from the server's rows.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from unittest import mock

import grpc
import pytest
from conftest import small_recipe
from fedml.core.distributed.communication.message import Message
from fedml.cross_silo.server.message_define import MyMessage
from test_cross_silo import alive

from fedml_pfedseq import simulation
from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.cross_silo.client_manager import WaitingReportClientManager
from fedml_pfedseq.cross_silo.launcher import DeploymentError, deploy, read_progress
from fedml_pfedseq.cross_silo.server_manager import (
    MSG_ARG_KEY_DEADLINE,
    MSG_ARG_KEY_ROUND,
    MSG_TYPE_WAITING,
    RoundDeadlineServerManager,
)
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.hub import HubLoadError, build_card, load_client_classifier

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
            self.outcome["warnings"] = {log.stem: [line for line in log.read_text().splitlines()
                                                   if " WARNING " in line or " ERROR " in line][-30:]
                                        for log in sorted((self.out / "logs").glob("*.log"))}  # what a failure shows

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

    def drop(server, uploads, t, minimum, lost=None):
        return screen(server, {i: u for i, u in uploads.items() if i != client or t < from_round}, t, minimum, lost)

    with mock.patch.object(simulation, "screen", drop):
        log = simulation.run_federation(build_federation(recipe), progress=False)
    return {"eval": log.rows, "server": log.server_rows}


@pytest.mark.slow
def test_a_client_killed_mid_run_is_left_out_and_the_others_finish(tiny_vit, tmp_path):
    recipe = fault_recipe(tiny_vit, tmp_path)
    out = tmp_path / "cross_silo"
    outcome, pids = kill_a_client_after_round_1(recipe, out)
    assert "error" not in outcome, outcome
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

    # the run folder's manifest names the dead client instead of pointing at a folder it never wrote
    manifest = json.loads((out / "adapters" / "manifest.json").read_text())
    survivors = sorted(set(range(CLIENTS)) - {DEAD})
    assert [c["client"] for c in manifest["clients"]] == survivors and "party" not in manifest
    assert [m["client"] for m in manifest["missing_clients"]] == [DEAD]
    with pytest.raises(HubLoadError, match=f"no adapter for client {DEAD}: .*did not finish the deployment"):
        load_client_classifier(out, DEAD)
    assert load_client_classifier(out, survivors[0], base_model=tiny_vit).info["test_accuracy"] == next(
        r["test_accuracy"] for r in metrics["eval"] if r["client"] == survivors[0] and r["round"] == ROUNDS)
    card = build_card(out, "local-user/dead-client", backbone_pushed=True)
    assert f"Client(s) {DEAD} did not finish the run" in card.text and f"{CLIENTS} clients tuned" in card.text


@pytest.mark.slow
def test_too_few_uploads_within_the_deadline_stop_the_run_naming_the_round_and_the_minimum(tiny_vit, tmp_path):
    recipe = fault_recipe(tiny_vit, tmp_path, min_uploads_per_round=CLIENTS)
    outcome, pids = kill_a_client_after_round_1(recipe, tmp_path / "cross_silo")
    error = outcome.get("error")
    assert isinstance(error, DeploymentError) and "server (rank 0) exited" in str(error), error
    assert "2 upload(s) arrived, fewer than train_args.min_uploads_per_round = 3" in str(error)
    assert "round 2:" in str(error) or "round 3:" in str(error)
    assert not any(alive(pid) for pid in pids.values())


@pytest.mark.slow
def test_a_frozen_client_is_left_out_and_gets_payloads_again_once_it_resumes(tiny_vit, tmp_path):
    """Frozen mid-training, its upload comes late and is discarded; frozen while idle, its payload cannot be sent and
    its waiting report brings it back. Where SIGSTOP lands decides which, and whether it is back before the run
    ends or gets its final payload after it: every outcome must end with every party done."""
    rounds = 12
    recipe = fault_recipe(tiny_vit, tmp_path, comm_round=rounds)
    out = tmp_path / "cross_silo"
    deployment = Deployment(recipe, out)
    pids = deployment.wait_for_round(1)
    os.kill(pids[f"client_{DEAD}"], signal.SIGSTOP)  # frozen: it misses a deadline, its payloads cannot be sent
    deployment.wait_for_round(3)
    os.kill(pids[f"client_{DEAD}"], signal.SIGCONT)
    outcome = deployment.finish()
    assert "error" not in outcome, outcome
    assert outcome["summary"]["dead_parties"] == []

    server_log = (out / "logs" / "server.log").read_text()
    assert re.search(rf"client {DEAD} (uploaded late|waits for a payload since its round \d+ upload) "
                     r"\(left out: .+\); it gets payloads again", server_log)
    server = json.loads((out / "metrics.json").read_text())["server"]
    missed = [row["round"] for row in server if f"client {DEAD}:" in row["left_out"]]
    assert missed and 3 in missed  # left out while frozen
    assert all(row["aggregated"] == CLIENTS - (row["round"] in missed) for row in server)
    rows = json.loads((out / "metrics.json").read_text())
    trained = {r["round"] for r in rows["train"] if r["client"] == DEAD}
    assert set(range(1, rounds + 1)) - set(missed) <= trained  # each round it was counted in, it trained in
    assert any(r["client"] == DEAD and r["round"] == rounds for r in rows["eval"])  # and it got the final payload


@pytest.mark.slow
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
    assert "error" not in outcome, outcome

    server = json.loads((out / "metrics.json").read_text())["server"]
    assert [row["aggregated"] for row in server] == [3, 2, 3, 3, 3]
    assert "client 1: restarted during the round" in server[1]["left_out"]
    rows = json.loads(own.read_text())  # the restarted party's: from round 3 on
    assert {r["round"] for r in rows["train"]} == {3, 4, 5} and {r["round"] for r in rows["eval"]} == {2, 3, 4, 5}


# --- readmission, the managers' logic in process: every path, without depending on where a signal lands ---------

class Unreachable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.DEADLINE_EXCEEDED


def bare_server_manager(round_idx: int, round_num: int = 4, clients: int = 3) -> RoundDeadlineServerManager:
    """The server manager's state as FedML leaves it at ``round_idx`` (no gRPC): its sends and deadlines recorded."""
    manager = RoundDeadlineServerManager.__new__(RoundDeadlineServerManager)
    manager.args = argparse.Namespace(round_idx=round_idx)
    manager.round_num, manager.upload_timeout = round_num, 10
    manager.client_real_ids = list(range(1, clients + 1))
    manager.client_id_list_in_this_round = list(manager.client_real_ids)
    manager.uploads, manager.absent, manager.rejoining, manager.deadline = {}, {}, set(), 0
    manager.client_finished_mapping = {}
    manager.strategy = mock.Mock(payloads=[f"final payload {i}" for i in range(clients)])
    manager.aggregator = mock.Mock(aggregator=None)  # FedML's wrapper, asked whether it is the main process
    manager.strategy.aggregate_round.side_effect = lambda uploads, missing, participants: [
        f"payload {i}" for i in range(clients)]
    manager.sent, manager.unreachable = [], set()

    def send(client_id, payload, index):
        if client_id in manager.unreachable:
            raise Unreachable()
        manager.sent.append((client_id, payload))

    manager.send_message_diff_sync_model_to_client = manager.send_message_init_config = send
    manager.start_deadline = lambda: setattr(manager, "deadline", manager.deadline + 1)
    manager.finish = mock.Mock()
    return manager


def message(sender: int, **params) -> Message:
    msg = Message(MSG_TYPE_WAITING, sender, 0)
    for key, value in params.items():
        msg.add_params(key, value)
    return msg


def test_a_client_whose_payload_was_lost_is_readmitted_by_its_waiting_report():
    manager = bare_server_manager(round_idx=1)
    manager.unreachable, manager.uploads = {2}, {0: "u0", 1: "u1", 2: "u2"}
    manager.close_round()  # round 2's payloads: client 1 (id 2) cannot be reached
    assert manager.absent == {1: "its payload could not be sent (DEADLINE_EXCEEDED)"}
    assert manager.client_id_list_in_this_round == [1, 3] and [c for c, _ in manager.sent] == [1, 3]

    manager.unreachable, manager.sent = set(), []
    manager.handle_waiting(message(2, **{MSG_ARG_KEY_ROUND: 1}))
    assert manager.absent == {} and manager.sent == []  # back from the next round, nothing sent mid-round
    manager.uploads = {0: "u0", 2: "u2"}
    manager.close_round()
    assert [c for c, _ in manager.sent] == [1, 2, 3] and manager.client_id_list_in_this_round == [1, 2, 3]
    missing = manager.strategy.aggregate_round.call_args.args[1]
    assert list(missing) == [1]  # round 3 closed without it, as it was left out when it began


def test_a_client_whose_first_payload_was_lost_reports_after_its_online_answer_and_is_readmitted():
    client = bare_client_manager(payload_round=0)
    with mock.patch("fedml.cross_silo.client.fedml_client_master_manager.ClientMasterManager."
                    "handle_message_check_status") as online:
        client.handle_message_check_status(None)  # FedML's handshake: it answers ONLINE...
    online.assert_called_once()
    assert client.checks == [0]  # ...and checks in upload_timeout seconds whether its first payload came
    client.handle_wait_check(message(2, **{MSG_ARG_KEY_ROUND: 0}))
    assert client.reports == [(MSG_TYPE_WAITING, 0)] and client.checks == [0, 0]

    server = bare_server_manager(round_idx=0)  # round 1's payload to client 1 (id 2) could not be sent
    server.absent = {1: "its payload could not be sent (DEADLINE_EXCEEDED)"}
    server.handle_waiting(message(2, **{MSG_ARG_KEY_ROUND: 0}))
    assert server.absent == {}  # back from the next round
    server.handle_waiting(message(2, **{MSG_ARG_KEY_ROUND: 0}))  # a report during the handshake: nothing to do
    assert server.sent == [] and server.absent == {}


def test_a_waiting_report_from_a_client_in_the_round_changes_nothing():
    manager = bare_server_manager(round_idx=2)
    manager.handle_waiting(message(2, **{MSG_ARG_KEY_ROUND: 2}))  # its payload is on the way: the round is open
    assert manager.sent == [] and manager.absent == {} and manager.client_id_list_in_this_round == [1, 2, 3]


@pytest.mark.parametrize("how", ["waiting report", "late upload"])
def test_a_client_back_after_the_last_round_gets_its_final_payload_and_is_waited_for(how):
    manager = bare_server_manager(round_idx=4)  # the final payloads went out without client 1
    manager.absent = {1: "no upload within comm_args.upload_timeout (10 s)"}
    manager.client_id_list_in_this_round = [1, 3]
    manager.deadline = 7  # the deadline for the others' FINISHED reports
    if how == "waiting report":
        manager.handle_waiting(message(2, **{MSG_ARG_KEY_ROUND: 3}))
    else:
        late = {"round": 3, "upload": "late"}
        manager.handle_message_receive_model_from_client(message(2, **{MyMessage.MSG_ARG_KEY_MODEL_PARAMS: late}))
    assert manager.sent == [(2, "final payload 1")] and manager.client_id_list_in_this_round == [1, 3, 2]
    assert manager.deadline == 8 and manager.uploads == {}  # a new deadline: time for its FINISHED report
    manager.handle_deadline(message(0, **{MSG_ARG_KEY_DEADLINE: 7}))
    manager.finish.assert_not_called()  # the replaced deadline is ignored
    manager.handle_deadline(message(0, **{MSG_ARG_KEY_DEADLINE: 8}))
    manager.finish.assert_called_once()


def finished(sender: int) -> Message:
    msg = Message(MyMessage.MSG_TYPE_C2S_CLIENT_STATUS, sender, 0)
    msg.add_params(MyMessage.MSG_ARG_KEY_CLIENT_STATUS, "FINISHED")
    return msg


def test_the_run_waits_for_the_final_deadline_while_a_client_is_left_out():
    """The others' FINISHED reports do not end the run while client 1 is left out: its waiting report, which comes
    within upload_timeout, still brings it its final payload; the run ends at its FINISHED report."""
    manager = bare_server_manager(round_idx=4)  # the final payloads went out without client 1 (id 2)
    manager.absent = {1: "its payload could not be sent (DEADLINE_EXCEEDED)"}
    manager.client_id_list_in_this_round, manager.deadline = [1, 3], 7
    with mock.patch("time.sleep"):  # FedML sleeps 5 s before it finishes
        for sender in (1, 3):
            manager.handle_message_client_status_update(finished(sender))
        manager.finish.assert_not_called()
        manager.handle_waiting(message(2, **{MSG_ARG_KEY_ROUND: 2}))
        assert manager.sent == [(2, "final payload 1")] and manager.deadline == 8
        manager.handle_message_client_status_update(finished(2))
    manager.finish.assert_called_once()


def test_the_final_deadline_ends_the_run_without_a_client_that_stays_away():
    manager = bare_server_manager(round_idx=4)
    manager.absent = {1: "no upload within comm_args.upload_timeout (10 s)"}
    manager.client_id_list_in_this_round, manager.deadline = [1, 3], 7
    for sender in (1, 3):
        manager.handle_message_client_status_update(finished(sender))
    manager.finish.assert_not_called()
    manager.handle_deadline(message(0, **{MSG_ARG_KEY_DEADLINE: 7}))
    manager.finish.assert_called_once()


def bare_client_manager(payload_round: int, server_reachable: bool = True) -> WaitingReportClientManager:
    """The client manager's state after a payload of ``payload_round`` (no gRPC): its reports and checks recorded."""
    manager = WaitingReportClientManager.__new__(WaitingReportClientManager)
    manager.client_real_id, manager.upload_timeout, manager.payload_round = 2, 10, payload_round
    manager.reports, manager.checks = [], []

    def send(msg):
        if not server_reachable:
            raise Unreachable()
        manager.reports.append((msg.get_type(), msg.get(MSG_ARG_KEY_ROUND)))

    manager.send_message = send
    manager.check_later = manager.checks.append
    return manager


@pytest.mark.parametrize("reachable", [True, False])
def test_a_client_without_a_payload_after_its_upload_reports_and_checks_again(reachable):
    manager = bare_client_manager(payload_round=3, server_reachable=reachable)  # uploaded round 3, nothing since
    manager.handle_wait_check(message(2, **{MSG_ARG_KEY_ROUND: 3}))
    assert manager.reports == ([(MSG_TYPE_WAITING, 3)] if reachable else [])
    assert manager.checks == [3]  # and again in upload_timeout seconds, reachable or not

    manager = bare_client_manager(payload_round=4)  # round 4's payload came
    manager.handle_wait_check(message(2, **{MSG_ARG_KEY_ROUND: 3}))
    assert manager.reports == [] and manager.checks == []
