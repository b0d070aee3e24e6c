"""Cross-silo server restart: every party checkpoints its own state each round, and a killed server restarted with
``pfedseq party ... --role server --resume`` goes on with the round after its checkpoint while the clients keep
running.

The real-process test starts the parties itself with ``pfedseq party``, as silos on several machines do:
``pfedseq deploy`` stops every party once its server dies. The managers' restart logic is also tested in process.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import grpc
import pytest
from fedml.cross_silo.server.message_define import MyMessage
from test_checkpoint import assert_same, decoded
from test_cross_silo import alive
from test_cross_silo_faults import (
    CLIENTS,
    Deployment,
    Unreachable,
    bare_client_manager,
    bare_server_manager,
    fault_recipe,
    message,
)

from fedml_pfedseq.checkpoint import CHECKPOINT_FILE, CheckpointError, read_checkpoint
from fedml_pfedseq.config import RecipeError
from fedml_pfedseq.cross_silo.aggregator import StrategyAggregator
from fedml_pfedseq.cross_silo.launcher import Party, deployment_recipe, read_progress, wait_for_port
from fedml_pfedseq.cross_silo.party import check_party, load_party, party_name, save_party
from fedml_pfedseq.cross_silo.server_manager import MSG_ARG_KEY_DEADLINE, MSG_ARG_KEY_ROUND, NOT_HEARD
from fedml_pfedseq.cross_silo.trainer import StrategyTrainer
from fedml_pfedseq.federation import build_federation

ROUNDS, KILLED_AFTER = 5, 2


def start_party(out, rank: int, log_name: str, *flags: str) -> subprocess.Popen:
    """``pfedseq party`` for ``rank`` on the deployment recipe in ``out``, logging to ``out/logs/<log_name>.log``."""
    command = [sys.executable, "-m", "fedml_pfedseq.cli", "party", "--cf", str(out / "recipe.yaml"), "--rank",
               str(rank), "--role", "server" if rank == 0 else "client", "--output-dir", str(out), *flags]
    with (out / "logs" / f"{log_name}.log").open("w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def party_file(out, rank: int, name: str = "metrics.json"):
    return out / "parties" / party_name(rank) / name


def checkpoint_round(path) -> int:
    skeleton, decode = read_checkpoint(path)
    return decode(skeleton["extra"]["round"])


@pytest.mark.slow
def test_a_killed_server_restarted_from_its_checkpoint_finishes_the_run(tiny_vit, tmp_path):
    recipe = fault_recipe(tiny_vit, tmp_path, comm_round=ROUNDS)
    recipe.train_args.epochs = 5  # longer rounds: the kill lands in round 3 (payloads out, or clients training)
    out = tmp_path / "cross_silo"
    (out / "logs").mkdir(parents=True)
    recipe, _, port = deployment_recipe(recipe, out)
    server = start_party(out, 0, "server")
    processes = [server]
    try:
        wait_for_port(port, Party(0, server, out / "logs" / "server.log"), 120)
        clients = [start_party(out, rank, party_name(rank)) for rank in range(1, CLIENTS + 1)]
        processes += clients
        deadline = time.monotonic() + 300
        while (read_progress(out) or 0) < KILLED_AFTER:
            assert time.monotonic() < deadline and server.poll() is None, "round 2 was not reached"
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait()
        saved = checkpoint_round(party_file(out, 0, CHECKPOINT_FILE))  # 2, or 3 if it closed before the kill
        assert saved >= KILLED_AFTER
        time.sleep(2)  # the clients' uploads and reports to the dead server fail meanwhile
        restarted = start_party(out, 0, "server_restarted", "--resume")
        processes.append(restarted)
        assert [p.wait(timeout=300) for p in clients] == [0] * CLIENTS
        assert restarted.wait(timeout=60) == 0
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not any(alive(p.pid) for p in processes)

    log = (out / "logs" / "server_restarted.log").read_text()
    assert f"resumed after round {saved} of {ROUNDS}; round {saved + 1}'s payloads go to each client" in log
    server_metrics = json.loads(party_file(out, 0).read_text())
    assert [row["round"] for row in server_metrics["server"]] == list(range(1, ROUNDS + 1))  # each round once
    assert [row["aggregated"] for row in server_metrics["server"]] == [CLIENTS] * ROUNDS
    sent = server_metrics["sent_fingerprints"]
    assert len(sent) == ROUNDS + 1  # payloads 1..ROUNDS + 1, the resent round counted once
    for i in range(CLIENTS):
        client = json.loads(party_file(out, i + 1).read_text())
        assert [r["round"] for r in client["eval"]] == list(range(ROUNDS + 1))  # the final payload evaluated too
        assert [r["round"] for r in client["train"]] == list(range(1, ROUNDS + 1))  # a round trained again: once
        assert client["received_fingerprints"] == [fingerprints[i] for fingerprints in sent]
        assert checkpoint_round(party_file(out, i + 1, CHECKPOINT_FILE)) == ROUNDS


@pytest.mark.slow
def test_a_client_party_restarted_with_resume_keeps_its_state_and_rows(tiny_vit, tmp_path):
    """Under ``pfedseq deploy`` (the server lives): client 1 is killed once round 2 is done and restarted with
    ``--resume``; it loads its checkpoint and rejoins as a restarted client does, its rows before the kill kept."""
    recipe = fault_recipe(tiny_vit, tmp_path, comm_round=ROUNDS)
    # the round in progress waits for the dead client until its replacement is online (its ONLINE closes the round),
    # however long a loaded machine takes to start it: the deadlines only bound a failure
    recipe.comm_args.upload_timeout, recipe.comm_args.round_timeout = 240, 300
    recipe.train_args.epochs = 20  # longer rounds: the kill lands in round 3 or 4, rounds remain to rejoin
    out = tmp_path / "cross_silo"
    deployment = Deployment(recipe, out)
    pids = deployment.wait_for_round(KILLED_AFTER)
    os.kill(pids["client_1"], signal.SIGKILL)
    saved = checkpoint_round(party_file(out, 2, CHECKPOINT_FILE))
    restarted = start_party(out, 2, "client_1_restarted", "--resume")
    outcome = deployment.finish()
    restarted_log = out / "logs" / "client_1_restarted.log"
    assert restarted.wait(timeout=300) == 0, restarted_log.read_text()[-3000:]
    assert "error" not in outcome, outcome

    resumed = f"client 1 resumed from {party_file(out, 2, CHECKPOINT_FILE)}, after round {saved}"
    assert resumed in restarted_log.read_text()
    rows = json.loads(party_file(out, 2).read_text())
    trained = [r["round"] for r in rows["train"]]
    assert trained[:saved] == list(range(1, saved + 1))  # kept from before the kill
    assert trained == sorted(set(trained)) and trained[-1] == ROUNDS  # then from its rejoining round on, once each
    evaluated = [r["round"] for r in rows["eval"]]
    assert evaluated == sorted(set(evaluated)) and evaluated[0] == 0 and evaluated[-1] == ROUNDS
    server = json.loads((out / "metrics.json").read_text())["server"]
    assert [row["round"] for row in server] == list(range(1, ROUNDS + 1)) and server[-1]["aggregated"] == CLIENTS


# --- the parties' checkpoints, in process -------------------------------------------------------------------------

def one_round(fed, aggregator: StrategyAggregator) -> None:
    """Every client trains on its payload, the server closes the round."""
    payloads = aggregator.get_model_params()
    uploads = {}
    for i, client in enumerate(fed.clients):
        client.receive(payloads[i]["payload"])
        uploads[i] = client.train(payloads[i]["round"])
    aggregator.aggregate_round(uploads, {}, participants=len(uploads))


def test_the_server_checkpoint_restores_round_payloads_and_metrics_and_refuses_another_recipe(tiny_vit, tmp_path):
    recipe = fault_recipe(tiny_vit, tmp_path)
    fed = build_federation(recipe)
    aggregator = StrategyAggregator(fed.server, argparse.Namespace())
    one_round(fed, aggregator)
    one_round(fed, aggregator)
    path = tmp_path / "server" / CHECKPOINT_FILE
    save_party(path, "server", fed.server, aggregator.state(), recipe)

    content = decoded(path)
    assert set(content["parts"]) == {"server"}
    extra = content["extra"]
    assert extra["round"] == 2 and extra["recipe"] == recipe.to_dict()
    assert sorted(extra["payloads"]) == list(range(CLIENTS)) and {p["round"] for p in extra["payloads"].values()} == {3}
    assert len(extra["sent_fingerprints"]) == 3 and [r["round"] for r in extra["log"]["server_rows"]] == [1, 2]

    fresh = build_federation(recipe)
    resumed = StrategyAggregator(fresh.server, argparse.Namespace())
    resumed.restore(load_party(path, "server", fresh.server, recipe))
    assert resumed.resumed and resumed.round == 2 and resumed.log == aggregator.log
    assert resumed.sent_fingerprints == aggregator.sent_fingerprints
    assert_same(resumed.payloads, aggregator.payloads)
    assert resumed.get_model_params() is resumed.payloads  # the round in progress goes out again, as saved
    resaved = tmp_path / "resaved" / CHECKPOINT_FILE
    save_party(resaved, "server", fresh.server, resumed.state(), recipe)
    assert_same(decoded(resaved)["parts"], content["parts"])

    other = fault_recipe(tiny_vit, tmp_path, learning_rate=0.1)
    with pytest.raises(CheckpointError, match=r"another recipe \(train_args.learning_rate: 0.5 -> 0.1\)"):
        load_party(path, "server", build_federation(other).server, other)


def test_resume_needs_the_upload_timeout(tiny_vit, tmp_path):
    recipe = fault_recipe(tiny_vit, tmp_path)
    recipe.comm_args.upload_timeout = None
    with pytest.raises(RecipeError, match="--resume needs comm_args.upload_timeout"):
        check_party(recipe, 0, "server", resume=True)


def trained_client(recipe, rounds: int) -> StrategyTrainer:
    """Client 0's trainer after ``rounds`` rounds on the server's payloads."""
    fed = build_federation(recipe)
    aggregator = StrategyAggregator(fed.server, argparse.Namespace())
    trainer = StrategyTrainer(fed.clients[0], argparse.Namespace())
    for _ in range(rounds):
        trainer.set_model_params(aggregator.get_model_params()[0])
        trainer.train(None, None, None)
        aggregator.aggregate_round({0: trainer.get_model_params()["upload"]}, {}, participants=1)
    return trainer


def test_a_client_checkpoint_restores_its_strategy_and_trainer_state(tiny_vit, tmp_path):
    recipe = fault_recipe(tiny_vit, tmp_path, "Ditto", comm_round=3)  # a personal model with its own state
    trainer = trained_client(recipe, rounds=2)
    path = tmp_path / "client_0" / CHECKPOINT_FILE
    save_party(path, "client", trainer.client, trainer.state(), recipe)

    fresh = StrategyTrainer(build_federation(recipe).clients[0], argparse.Namespace())
    fresh.restore(load_party(path, "client", fresh.client, recipe))
    assert fresh.round == 2 and fresh.log == trainer.log
    assert fresh.received_fingerprints == trainer.received_fingerprints and len(fresh.received_fingerprints) == 2
    assert trainer.client.personal is not None  # trained: not what a fresh client starts from
    assert_same(fresh.client.personal, trainer.client.personal)
    assert_same(fresh.client.state, trainer.client.state)
    resaved = tmp_path / "resaved" / CHECKPOINT_FILE
    save_party(resaved, "client", fresh.client, fresh.state(), recipe)
    assert_same(decoded(resaved), decoded(path))


def test_a_round_trained_twice_keeps_one_row_and_one_fingerprint_the_latest(tiny_vit, tmp_path):
    recipe = fault_recipe(tiny_vit, tmp_path)
    fed = build_federation(recipe)
    trainer = StrategyTrainer(fed.clients[0], argparse.Namespace())
    payload = StrategyAggregator(fed.server, argparse.Namespace()).get_model_params()[0]
    accuracies = iter([0.1, 0.2])
    evaluate = fed.clients[0].evaluate
    with mock.patch.object(fed.clients[0], "evaluate", lambda: {**evaluate(), "test_accuracy": next(accuracies)}):
        for _ in range(2):  # a restarted server sends round 1 again
            trainer.set_model_params(payload)
            trainer.train(None, None, None)
    assert [(r["round"], r["test_accuracy"]) for r in trainer.log.rows] == [(0, 0.2)]
    assert [r["round"] for r in trainer.log.train_rows] == [1]
    assert len(trainer.received_fingerprints) == 1


# --- the managers after a server restart, in process ---------------------------------------------------------------

def resumed_server_manager(round_idx: int = 2):
    """A bare server manager (test_cross_silo_faults) resumed after ``round_idx``: its status checks recorded."""
    manager = bare_server_manager(round_idx=0)
    manager.strategy.round, manager.strategy.resumed, manager.is_initialized = round_idx, True, False
    manager.strategy.payloads = [{"round": round_idx + 1, "payload": f"p{i}"} for i in range(CLIENTS)]
    manager.checked = []
    manager.send_message_check_client_status = lambda client_id, index: manager.checked.append(client_id)
    manager.rejoining = set()
    manager.handle_message_connection_ready(None)
    return manager


def upload(sender: int, round_idx: int):
    return message(sender, **{MyMessage.MSG_ARG_KEY_MODEL_PARAMS: {"round": round_idx, "upload": f"u{sender}"}})


def test_a_restarted_server_sends_the_round_in_progress_to_each_client_at_its_first_word():
    manager = resumed_server_manager(round_idx=2)
    assert manager.is_initialized and manager.args.round_idx == 2 and manager.deadline == 1  # the round's deadline
    assert manager.checked == [1, 2, 3] and manager.sent == []  # every client asked; nothing sent yet

    manager.handle_waiting(message(1, **{MSG_ARG_KEY_ROUND: 3}))  # its round 3 upload died with the server
    manager.handle_message_receive_model_from_client(upload(2, 2))  # an upload for round 2: discarded
    assert manager.sent == [(1, {"round": 3, "payload": "p0"}), (2, {"round": 3, "payload": "p1"})]
    manager.handle_message_receive_model_from_client(upload(3, 3))  # trained round 3 across the restart: kept
    manager.handle_waiting(message(1, **{MSG_ARG_KEY_ROUND: 3}))  # heard from already: nothing more
    assert len(manager.sent) == 2 and manager.uploads == {2: "u3"} and not manager.unreached

    manager.handle_message_receive_model_from_client(upload(1, 3))
    manager.handle_message_receive_model_from_client(upload(2, 3))  # the round closes with all three
    assert manager.strategy.aggregate_round.call_args.args[:2] == ({2: "u3", 0: "u1", 1: "u2"}, {})
    assert manager.args.round_idx == 3 and [c for c, _ in manager.sent[2:]] == [1, 2, 3]


def test_a_client_not_heard_from_after_the_restart_is_left_out_at_the_deadline_and_online_brings_it_back():
    manager = resumed_server_manager(round_idx=2)
    manager.handle_message_receive_model_from_client(upload(1, 3))
    manager.handle_message_receive_model_from_client(upload(2, 3))
    online = message(3)
    manager.handle_deadline(message(0, **{MSG_ARG_KEY_DEADLINE: manager.deadline}))
    assert manager.strategy.aggregate_round.call_args.args[1] == {2: NOT_HEARD}
    assert manager.absent == {2: NOT_HEARD} and [c for c, _ in manager.sent] == [1, 2]
    manager.process_online_status("ONLINE", online)  # its party restarted: back from the next round
    assert manager.rejoining == {2} and manager.absent == {2: NOT_HEARD}


def test_a_restarted_client_party_online_after_the_server_restart_gets_the_round_in_progress():
    manager = resumed_server_manager(round_idx=4)  # of 4: the final payloads were out
    manager.process_online_status("ONLINE", message(2))
    assert manager.sent == [(2, {"round": 5, "payload": "p1"})] and manager.rejoining == set()


def test_a_running_client_answers_the_restarted_server_with_its_waiting_report():
    manager = bare_client_manager(payload_round=3)
    manager.kick_watchdog = mock.Mock()
    manager.handle_message_check_status(None)
    assert manager.reports == [("pfedseq_waiting", 3)]
    manager.kick_watchdog.assert_called_once()  # the server is back: the round_timeout count starts again


SUPER_SEND = "fedml.cross_silo.client.fedml_client_master_manager.ClientMasterManager.send_model_to_server"


def test_an_upload_the_dead_server_does_not_take_is_logged_and_the_client_waits():
    manager = bare_client_manager(payload_round=3, server_reachable=False)
    manager.kick_watchdog = mock.Mock()
    with mock.patch(SUPER_SEND, side_effect=Unreachable()):
        manager.send_model_to_server(0, {"round": 3, "upload": {}}, 10)
    manager.handle_wait_check(message(2, **{MSG_ARG_KEY_ROUND: 3}))  # its report fails too
    assert manager.checks == [3, 3] and manager.server_lost
    manager.kick_watchdog.assert_called_once()  # only the first failure restarts the count
    manager.upload_timeout = None  # without it, a dead server still ends the client
    with mock.patch(SUPER_SEND, side_effect=Unreachable()), pytest.raises(grpc.RpcError):
        manager.send_model_to_server(0, {"round": 3, "upload": {}}, 10)
