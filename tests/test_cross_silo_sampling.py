"""Cross-silo client sampling: K of N clients per round (``train_args.client_num_per_round``), as in the simulator.

Each round the server sends its payloads only to the clients ``participants`` samples and a notice to every other
live client, which keeps the unsampled clients' watchdogs alive; every client gets the final payload. The metrics
equal the simulator's, in process (every FedML call, K = 2 of 3) and with real parties on 127.0.0.1.
"""
import json
from unittest import mock

import pytest
from conftest import small_recipe
from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager
from test_cross_silo import DEPLOYMENT, drive_like_fedml
from test_cross_silo_faults import Unreachable, bare_client_manager, bare_server_manager, message
from test_cross_silo_restart import resumed_server_manager, upload

from fedml_pfedseq.cross_silo.launcher import deploy
from fedml_pfedseq.cross_silo.server_manager import MSG_ARG_KEY_ROUND, MSG_TYPE_WAITING, RoundDeadlineServerManager
from fedml_pfedseq.federation import participants
from fedml_pfedseq.simulation import run_recipe

CLIENTS, K, ROUNDS = 3, 2, 4
SCHEDULE = {1: [0, 2], 2: [0, 2], 3: [0, 1], 4: [1, 2]}  # participants() for seed 0, 2 of 3, rounds 1-4


def sampled_recipe(method, tiny_vit, tmp_path, **comm_args):
    return small_recipe(method, tiny_vit, tmp_path, data_args=DEPLOYMENT["data_args"],
                        train_args={**DEPLOYMENT["train_args"], "comm_round": ROUNDS, "client_num_per_round": K},
                        device_args={"num_threads": 1}, comm_args=comm_args,
                        algorithm_args=DEPLOYMENT["algorithm_args"] if method == "pFedSeq" else {})


def rows_by_key(rows: list[dict]) -> dict:
    return {(r["round"], r["client"]): r for r in rows}


def test_the_schedule_is_what_participants_draws(tiny_vit, tmp_path):
    recipe = sampled_recipe("FedAvg", tiny_vit, tmp_path)
    assert {t: participants(recipe, CLIENTS, t) for t in SCHEDULE} == SCHEDULE  # client 1 waits two rounds first


@pytest.mark.parametrize("method", ["FedAvg", "pFedSeq"])
def test_fedml_wrappers_sampling_k_of_n_reproduce_the_simulator(method, tiny_vit, tmp_path):
    recipe = sampled_recipe(method, tiny_vit, tmp_path)
    rows = drive_like_fedml(recipe)
    run_recipe(recipe, tmp_path / "simulator", progress=False)
    simulated = sorted(json.loads((tmp_path / "simulator" / "metrics.json").read_text())["eval"],
                       key=lambda r: (r["round"], r["client"]))
    assert [(r["round"], r["client"]) for r in rows] == [(r["round"], r["client"]) for r in simulated]
    assert {(t - 1, i) for t, chosen in SCHEDULE.items() for i in chosen} | {(ROUNDS, i) for i in range(CLIENTS)} \
        == {(r["round"], r["client"]) for r in rows}  # evaluated before each round it trained, and at the end
    for a, b in zip(rows, simulated):
        assert a["test_accuracy"] == b["test_accuracy"] and a["validation_accuracy"] == b["validation_accuracy"]
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6)


# --- the managers, in process -------------------------------------------------------------------------------------

def sampling_server_manager(round_idx: int) -> RoundDeadlineServerManager:
    """A bare server manager (test_cross_silo_faults) sampling ``SCHEDULE``, its notices recorded with its sends."""
    manager = bare_server_manager(round_idx=round_idx)
    manager.sample = lambda n, t: SCHEDULE[t]
    manager.client_id_list_in_this_round = [i + 1 for i in SCHEDULE[round_idx + 1]] if round_idx < ROUNDS else []

    def notify(client_id, t):
        if client_id in manager.unreachable:
            raise Unreachable()
        manager.sent.append((client_id, f"notice {t}"))

    manager.send_message_not_sampled = notify
    return manager


def test_round_one_goes_to_the_sampled_clients_and_a_notice_to_the_others():
    manager = sampling_server_manager(round_idx=0)
    manager.client_id_list_in_this_round = [1, 2, 3]  # FedML's handshake waits for every client
    first = []
    with mock.patch.object(FedMLServerManager, "send_init_msg",
                           lambda self: first.append((self.client_id_list_in_this_round, self.data_silo_index_list))):
        manager.send_init_msg()
    assert first == [([1, 3], [0, 2])] and manager.sent == [(2, "notice 1")] and manager.deadline == 1


def test_each_round_sends_payloads_to_the_sampled_clients_notices_to_the_others_and_the_final_payload_to_all():
    manager = sampling_server_manager(round_idx=1)
    for t in (2, 3, 4):
        manager.sent = []
        manager.uploads = {i: f"u{i}" for i in SCHEDULE[t]}
        manager.close_round()
        uploads, missing = manager.strategy.aggregate_round.call_args.args
        assert sorted(uploads) == SCHEDULE[t] and missing == {}  # an unsampled client is not left out
        assert manager.strategy.aggregate_round.call_args.kwargs == {"participants": K}
        chosen = SCHEDULE.get(t + 1, range(CLIENTS))  # after the last round: the final payload to every client
        assert manager.sent == [(i + 1, f"payload {i}") for i in chosen] + [
            (i + 1, f"notice {t + 1}") for i in range(CLIENTS) if i not in chosen]
        assert manager.client_id_list_in_this_round == [i + 1 for i in chosen] and manager.absent == {}


def test_a_sampled_client_that_missed_the_deadline_is_left_out_and_sent_nothing_until_it_reports():
    manager = sampling_server_manager(round_idx=2)  # round 3: clients 0 and 1
    manager.uploads = {0: "u0"}
    manager.close_round()  # at the deadline, without client 1
    assert manager.strategy.aggregate_round.call_args.args[1] == {
        1: "no upload within comm_args.upload_timeout (10 s)"}
    assert manager.sent == [(3, "payload 2"), (1, "notice 4")]  # round 4: client 1 (absent) and 2; client 0 waits
    manager.handle_waiting(message(2, **{MSG_ARG_KEY_ROUND: 3}))
    assert manager.absent == {}  # back from the next round


def test_a_client_whose_notice_could_not_be_sent_is_left_out_until_its_waiting_report():
    manager = sampling_server_manager(round_idx=0)
    manager.unreachable = {2}  # client 1, not sampled for rounds 1 and 2
    manager.uploads = {0: "u0", 2: "u2"}
    manager.close_round()
    assert manager.absent == {1: "its round 2 notice could not be sent (DEADLINE_EXCEEDED)"}
    with mock.patch("logging.warning") as warning:
        manager.handle_waiting(message(2, **{MSG_ARG_KEY_ROUND: 1}))  # nothing since its round 1 notice
    assert "waits for a payload since its round 1 notice" in warning.call_args.args[2] and manager.absent == {}
    manager.unreachable, manager.sent, manager.uploads = set(), [], {0: "u0", 2: "u2"}
    manager.close_round()
    assert manager.sent == [(1, "payload 0"), (2, "payload 1"), (3, "notice 3")]  # it is sampled for round 3


def test_a_waiting_report_from_an_unsampled_client_changes_nothing():
    manager = sampling_server_manager(round_idx=2)  # round 3 is open; client 2 is not in it
    manager.handle_waiting(message(3, **{MSG_ARG_KEY_ROUND: 3}))
    assert manager.sent == [] and manager.absent == {} and manager.client_id_list_in_this_round == [1, 2]


def test_a_restarted_server_sends_a_client_not_sampled_for_the_round_in_progress_its_notice():
    with mock.patch.object(RoundDeadlineServerManager, "sample", staticmethod(lambda n, t: SCHEDULE[t])):
        manager = resumed_server_manager(round_idx=2)  # round 3: clients 0 and 1
        manager.send_message_not_sampled = lambda client_id, t: manager.sent.append((client_id, f"notice {t}"))
        assert manager.client_id_list_in_this_round == [1, 2] and manager.data_silo_index_list == [0, 1]
        for sender in (3, 1, 2):
            manager.handle_waiting(message(sender, **{MSG_ARG_KEY_ROUND: 2}))
        assert manager.sent == [(3, "notice 3"), (1, {"round": 3, "payload": "p0"}),
                                (2, {"round": 3, "payload": "p1"})]
        manager.handle_message_receive_model_from_client(upload(1, 3))
        manager.handle_message_receive_model_from_client(upload(2, 3))  # the sampled two: the round closes
        assert manager.strategy.aggregate_round.call_args.args[1] == {} and manager.args.round_idx == 3


def test_a_notice_restarts_the_watchdog_and_nothing_after_it_brings_a_waiting_report():
    manager = bare_client_manager(payload_round=0)
    manager.kick_watchdog = mock.Mock()
    manager.handle_not_sampled(message(2, **{MSG_ARG_KEY_ROUND: 1}))
    manager.kick_watchdog.assert_called_once()  # an unsampled client knows the federation is alive
    assert manager.notice_round == 1 and manager.checks == [1]
    manager.handle_wait_check(message(2, **{MSG_ARG_KEY_ROUND: 1}))  # nothing since: it may have been left out
    assert manager.reports == [(MSG_TYPE_WAITING, 1)] and manager.checks == [1, 1]
    manager.handle_not_sampled(message(2, **{MSG_ARG_KEY_ROUND: 2}))
    manager.handle_wait_check(message(2, **{MSG_ARG_KEY_ROUND: 1}))  # round 2's notice came: no report
    assert manager.reports == [(MSG_TYPE_WAITING, 1)] and manager.checks == [1, 1, 2]


def test_a_client_that_only_had_notices_answers_a_restarted_server_with_its_waiting_report():
    manager = bare_client_manager(payload_round=0)
    manager.notice_round = 2
    manager.handle_message_check_status(None)
    assert manager.reports == [(MSG_TYPE_WAITING, 2)]  # not ONLINE, which would read as a restarted party


# --- a real deployment ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_deployment_sampling_two_of_three_trains_the_sampled_clients_and_matches_the_simulator(tiny_vit, tmp_path):
    """With upload_timeout, the fault-tolerant configuration; the notices and waiting reports are checked in process
    above, and the server manager sends notices the same way without it."""
    recipe = sampled_recipe("FedAvg", tiny_vit, tmp_path, upload_timeout=10, round_timeout=120)
    summary = deploy(recipe, tmp_path / "cross_silo", progress=False)  # raises if a party fails
    assert summary["dead_parties"] == []
    run_recipe(recipe, tmp_path / "simulator", progress=False)
    cross, sim = (json.loads((tmp_path / engine / "metrics.json").read_text()) for engine in ("cross_silo",
                                                                                             "simulator"))
    assert [(r["round"], r["participants"], r["aggregated"], r["left_out"]) for r in cross["server"]] == [
        (t, K, K, "") for t in SCHEDULE]
    trained = {i: [r["round"] for r in cross["train"] if r["client"] == i] for i in range(CLIENTS)}
    assert trained == {i: [t for t, chosen in SCHEDULE.items() if i in chosen] for i in range(CLIENTS)}
    expected = rows_by_key(sim["eval"])
    assert sorted(rows_by_key(cross["eval"])) == sorted(expected)
    for row in cross["eval"]:
        for key in ["test_accuracy", "validation_accuracy", "test_loss"]:
            assert row[key] == pytest.approx(expected[row["round"], row["client"]][key], rel=1e-5, abs=1e-6), row

    parties = tmp_path / "cross_silo" / "parties"
    sent = json.loads((parties / "server" / "metrics.json").read_text())["sent_fingerprints"]
    for i in range(CLIENTS):  # each client received exactly its payloads of the rounds it was sampled for, and the last
        own = json.loads((parties / f"client_{i}" / "metrics.json").read_text())
        assert own["received_fingerprints"] == [sent[t - 1][i] for t in trained[i]] + [sent[ROUNDS][i]]
        assert [t for t, s in enumerate(own["train_seconds"], start=1) if s > 0] == trained[i]  # its times by round
    assert len(cross["train_seconds"]) == ROUNDS  # each round's slowest client
