"""FedML cross-silo deployment: real server and client processes talking gRPC on 127.0.0.1."""
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_recipe

from fedml_pfedseq.cli import main
from fedml_pfedseq.config import RecipeError
from fedml_pfedseq.cross_silo.aggregator import StrategyAggregator
from fedml_pfedseq.cross_silo.fedml_runtime import patch_fedml
from fedml_pfedseq.cross_silo.grpc_transport import SecureGRPCCommManager
from fedml_pfedseq.cross_silo.launcher import (
    DeploymentError,
    Party,
    deploy,
    deployment_recipe,
    read_progress,
    wait_for_port,
)
from fedml_pfedseq.cross_silo.party import MESSAGE_SLACK, check_party, message_limit
from fedml_pfedseq.cross_silo.trainer import StrategyTrainer
from fedml_pfedseq.federation import build_client, build_data, build_model, build_server, client_depth, participants
from fedml_pfedseq.simulation import run_recipe
from fedml_pfedseq.strategies import METHODS
from fedml_pfedseq.strategies.fedavg import FedAvgServer
from fedml_pfedseq.transport import WireLimits, check_plain, decode, encode, fingerprint

CLIENTS = 3
# three clients from a Dirichlet split of the embedded Omniglot; pFedSeq personalizes from round 2 (W=1)
DEPLOYMENT = {
    "data_args": {"partition_method": "dirichlet", "partition_alpha": 0.5, "samples_per_client": 40},
    "train_args": {"client_num_in_total": CLIENTS, "comm_round": 3, "learning_rate": 0.5},
    "device_args": {"num_threads": 1},
    "algorithm_args": {"warmup_rounds": 1, "seq_len": 2},
}


def silo_recipe(tiny_vit, tmp_path, **comm_args):
    return small_recipe("pFedSeq", tiny_vit, tmp_path, **DEPLOYMENT, comm_args=comm_args)


def parties(output_dir: Path) -> dict:
    return {p.name: json.loads((p / "metrics.json").read_text()) for p in (output_dir / "parties").iterdir()}


# --- FedML's runtime, patched -------------------------------------------------------------------------------------

def test_patched_fedml_starts_the_checking_transport_instead_of_its_pickling_one():
    patch_fedml()
    from fedml.core.distributed.communication.grpc import grpc_comm_manager

    assert grpc_comm_manager.GRPCCommManager is SecureGRPCCommManager  # FedML's factory imports it from there


OFFLINE_PROBE = """
import json, os, sys
from pathlib import Path
attempts = []
network = ("socket.connect", "socket.getaddrinfo")
sys.addaudithook(lambda event, args: attempts.append(event) if event in network else None)
from fedml_pfedseq.config import parse_recipe
from fedml_pfedseq.cross_silo import fedml_runtime
fedml_home = Path(sys.argv[1])
recipe = parse_recipe({"train_args": {"client_num_in_total": 2}, "comm_args": {"grpc_ipconfig_path": "x.csv"}})
if sys.argv[2] == "patched":
    fedml_runtime.isolate_fedml_files(fedml_home)
    fedml_runtime.init_fedml(fedml_runtime.fedml_args(recipe, 0, "server", "0"), "WARNING")
else:
    import fedml
    fedml.init(fedml_runtime.fedml_args(recipe, 0, "server", "0"), check_env=False, should_init_logs=False)
from fedml import FedMLRunner
FedMLRunner.log_runner_result()  # one of FedML's writes under ~/.fedml
print(json.dumps(attempts), flush=True)
os._exit(0)  # as a killed party ends: no clean-up of temporary folders
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["patched", "unpatched"])
def test_fedml_init_makes_no_network_attempt_and_writes_under_the_run(tmp_path, mode):
    """The unpatched run is the control: it shows the probe does see FedML's config fetch, and that a killed
    party's temporary folders (wandb's, made when FedML imports it) stay behind in the system's TMPDIR."""
    home, system_tmp, fedml_home = tmp_path / "home", tmp_path / "tmp", tmp_path / "run" / "fedml_home"
    home.mkdir()
    system_tmp.mkdir()
    result = subprocess.run([sys.executable, "-c", OFFLINE_PROBE, str(fedml_home), mode], capture_output=True,
                            text=True, env={**os.environ, "HOME": str(home), "TMPDIR": str(system_tmp)},
                            timeout=120)
    assert result.returncode == 0, result.stderr
    attempts = json.loads(result.stdout.strip().splitlines()[-1])
    if mode == "patched":
        assert attempts == []
        assert not (home / ".fedml").exists() and (fedml_home / ".fedml" / "fedml_trace").is_dir()
        assert not list(system_tmp.iterdir()) and list((fedml_home / "tmp").glob("*wandb*"))
    else:
        assert attempts and (home / ".fedml").exists()
        assert list(system_tmp.glob("*wandb*"))


# --- what travels ---------------------------------------------------------------------------------------------

def test_payloads_travel_through_the_codec_unchanged(tiny_vit, tmp_path):
    state = {"lora": {"layer.0.lora_A.weight": torch.randn(2, 3)}, "head": {"weight": torch.randn(4, 3)}}
    server = FedAvgServer(2, state, small_recipe("FedAvg", tiny_vit, tmp_path))
    for i, payload in server.initial_payloads().items():
        check_plain(payload, f"payload {i}")
        data = encode(2, 0, i + 1, {"model_params": {"round": 1, "payload": payload}})
        loaded = decode(data, WireLimits(len(data))).params["model_params"]["payload"]
        assert loaded["client_id"] == i and torch.equal(loaded["lora"]["layer.0.lora_A.weight"],
                                                        state["lora"]["layer.0.lora_A.weight"])
        assert fingerprint(loaded) == fingerprint(payload)


def test_check_plain_names_what_cannot_travel():
    class Adapter:
        pass

    with pytest.raises(TypeError, match=r"payload\['lora'\]\['w'\].*Adapter"):
        check_plain({"client_id": 0, "lora": {"w": Adapter()}}, "payload")
    with pytest.raises(TypeError, match="key"):
        check_plain({(0, 1): torch.zeros(1)}, "payload")
    with pytest.raises(TypeError, match="view into a larger tensor"):
        check_plain({"lora": {"w": torch.zeros(4, 3)[:, 0]}}, "payload")  # column 0 of every client's matrix


def test_party_refuses_a_rank_that_does_not_fit_its_role(tiny_vit, tmp_path):
    ipconfig = tmp_path / "ip.csv"
    ipconfig.write_text("eid,rank,grpc_server_ip,grpc_server_port\n")
    recipe = silo_recipe(tiny_vit, tmp_path, grpc_ipconfig_path=str(ipconfig), tls=False)
    assert check_party(recipe, 0, "server") == CLIENTS and check_party(recipe, 3, "client") == CLIENTS
    for rank, role in [(0, "client"), (1, "server"), (4, "client")]:
        with pytest.raises(RecipeError, match="rank"):
            check_party(recipe, rank, role)
    with pytest.raises(RecipeError, match="grpc_ipconfig_path"):
        check_party(silo_recipe(tiny_vit, tmp_path), 0, "server")


def test_a_tls_party_needs_the_ca_and_its_own_certificate_and_key(tiny_vit, tmp_path, capsys):
    ipconfig = tmp_path / "ip.csv"
    ipconfig.write_text("eid,rank,grpc_server_ip,grpc_server_port\n")
    with pytest.raises(RecipeError, match=r"comm_args.tls is on.*pfedseq certs"):
        check_party(silo_recipe(tiny_vit, tmp_path, grpc_ipconfig_path=str(ipconfig)), 0, "server")
    with pytest.raises(RecipeError, match="comm_args.party_key must be set with the other two"):
        silo_recipe(tiny_vit, tmp_path, ca_cert="ca.crt", party_cert="c.crt")
    certs = tmp_path / "certs"
    assert main(["certs", str(certs), "--clients", "2"]) == 0 and "ranks [0, 1, 2]" in capsys.readouterr().out
    recipe = silo_recipe(tiny_vit, tmp_path, grpc_ipconfig_path=str(ipconfig), ca_cert=str(certs / "ca.crt"),
                         party_cert=str(certs / "party-{rank}.crt"), party_key=str(certs / "party-{rank}.key"))
    assert check_party(recipe, 2, "client") == CLIENTS
    with pytest.raises(RecipeError, match=r"comm_args.party_cert: no file .*party-3.crt for rank 3"):
        check_party(recipe, 3, "client")  # issued for 2 clients only


def test_party_command_exits_2_naming_the_problem(tiny_vit, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(silo_recipe(tiny_vit, tmp_path).to_dict()))
    assert main(["party", "--cf", str(path), "--rank", "0", "--role", "server"]) == 2
    assert "grpc_ipconfig_path" in capsys.readouterr().err


def test_launcher_settles_threads_per_party_and_writes_an_address_book(tiny_vit, tmp_path):
    recipe = silo_recipe(tiny_vit, tmp_path)
    recipe.device_args.num_threads = None
    resolved, path, port = deployment_recipe(recipe, tmp_path)
    assert resolved.device_args.num_threads == max(1, os.cpu_count() // CLIENTS)
    assert resolved.common_args.training_type == "cross_silo" and path.is_file()
    rows = Path(resolved.comm_args.grpc_ipconfig_path).read_text().splitlines()
    assert rows[0] == "eid,rank,grpc_server_ip,grpc_server_port" and len(rows) == CLIENTS + 2
    assert rows[1] == f"0,0,127.0.0.1,{port}" and len({r.split(",")[3] for r in rows[1:]}) == CLIENTS + 1
    recipe.device_args.num_threads = 2
    assert deployment_recipe(recipe, tmp_path)[0].device_args.num_threads == 2


def test_waiting_for_the_server_fails_fast_when_it_dies_before_listening(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("Traceback: the backbone could not be loaded\n")
    server = Party(0, subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(4)"]), log)
    with pytest.raises(DeploymentError, match="(?s)exited with code 4 before listening.*backbone could not"):
        wait_for_port(1, server, timeout=60)


WATCHDOG_PROBE = """
import sys, time
from fedml_pfedseq.cross_silo.party import Watchdog
watchdog = Watchdog(startup_timeout=1.0, timeout=0.5, waiting_for="the server")
watchdog.start()
if sys.argv[1] == "started":
    watchdog.kick()  # the first round began; then nothing more arrives
time.sleep(30)
"""


@pytest.mark.parametrize("phase, limit", [("startup", "startup_timeout"), ("started", "round_timeout")])
@pytest.mark.slow
def test_a_party_whose_peer_went_silent_exits_3_naming_the_timeout(phase, limit):
    result = subprocess.run([sys.executable, "-c", WATCHDOG_PROBE, phase], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3
    assert f"(comm_args.{limit}) while waiting for the server" in result.stderr


# --- a real deployment --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def deployed(tiny_vit, tmp_path_factory):
    """``pfedseq deploy`` as a user runs it (a subprocess), and the simulator on the same recipe and seed."""
    tmp = tmp_path_factory.mktemp("deploy")
    recipe = silo_recipe(tiny_vit, tmp, round_timeout=120)
    path = tmp / "pfedseq_3_silos.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    result = subprocess.run([sys.executable, "-m", "fedml_pfedseq.cli", "deploy", str(path), "--no-progress",
                             "--output-dir", str(tmp / "cross_silo")], capture_output=True, text=True, timeout=600)
    simulated = run_recipe(recipe, tmp / "simulator", progress=False)
    return result, tmp / "cross_silo", tmp / "simulator", simulated


@pytest.mark.slow
def test_deployment_exits_zero_and_writes_the_simulator_outputs(deployed):
    result, out, _, _ = deployed
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ["metrics.json", "metrics.csv", "server_metrics.csv", "learning_curve.png", "summary.json"]:
        assert (out / name).is_file(), name
    assert (out / "seq_learner" / "config.json").is_file()  # the server saved pFedSeq's learner


def test_every_client_got_its_own_adapter_each_round(deployed):
    _, out, _, _ = deployed
    found = parties(out)
    sent = found["server"]["sent_fingerprints"]  # per payload k = 1..T+1, per client
    received = [found[f"client_{i}"]["received_fingerprints"] for i in range(CLIENTS)]
    assert len(sent) == 4 and all(len(r) == 4 for r in received)
    for k in range(4):
        assert [received[i][k] for i in range(CLIENTS)] == sent[k]  # each client got exactly what was meant for it
    assert len(set(sent[0])) == 1  # round 1: FedAvg+local heads during warm-up, one global adapter...
    assert all(len(set(sent[k])) == CLIENTS for k in (2, 3))  # ...then theta_g + xi_i, one per client


def test_deployment_reproduces_the_simulator(deployed):
    _, out, sim_out, simulated = deployed
    cross = json.loads((out / "metrics.json").read_text())
    sim = json.loads((sim_out / "metrics.json").read_text())
    assert len(cross["eval"]) == len(sim["eval"]) == 4 * CLIENTS
    for a, b in zip(cross["eval"], sim["eval"]):
        assert (a["round"], a["client"]) == (b["round"], b["client"])
        for key in ["test_accuracy", "validation_accuracy", "test_loss"]:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a, b, key)
    assert [sorted(a) for a in cross["server"]] == [sorted(b) for b in sim["server"]]
    learned = [(a["surrogate_loss"], b["surrogate_loss"]) for a, b in zip(cross["server"], sim["server"])
               if "surrogate_loss" in b]
    assert len(learned) == 2 and all(a == pytest.approx(b, rel=1e-4) for a, b in learned)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_accuracy_mean"] == pytest.approx(simulated["final_test_accuracy_mean"], abs=1e-9)


def wire(params, budget: int):
    """What crosses the parties' transport: the model parameters of one message, encoded and decoded; its tensors
    must fit in ``budget`` bytes and the rest in ``MESSAGE_SLACK`` (what ``message_limit`` allows)."""
    data = encode(2, 0, 1, {"model_params": params})
    (header,) = struct.unpack("<Q", data[:8])
    assert len(data) - 8 - header <= budget and header <= MESSAGE_SLACK
    return decode(data, WireLimits(len(data))).params["model_params"]


def drive_like_fedml(recipe) -> list[dict]:
    """Every party of ``recipe`` in this process, each with its own model as ``run_party`` builds it, driven through
    FedML's calls: the server manager's first ``get_model_params``, then per round each client sampled for it
    (``participants``, as the server manager sends) ``set_model_params`` / ``train`` / ``get_model_params`` and the
    server's ``aggregate_round``, then the final payloads to every client; every message encoded on the way, within
    the method's states per message. Returns every client's evaluation rows."""
    data = build_data(recipe)
    n = len(data.clients)
    model = build_model(recipe, data.num_labels)
    aggregator = StrategyAggregator(build_server(recipe, model, n), args=None)
    trainers = [StrategyTrainer(build_client(recipe, i, data.clients[i],
                                             build_model(recipe, data.num_labels, client_depth(recipe, i))), args=None)
                for i in range(n)]
    budget = message_limit(recipe, model, n) - MESSAGE_SLACK

    def each(payloads: dict) -> dict:
        return {i: wire(payload, budget) for i, payload in payloads.items()}

    payloads = each(aggregator.get_model_params())
    for t in range(1, recipe.train_args.comm_round + 1):
        uploads = {}
        sampled = participants(recipe, n, t)
        for i in sampled:
            trainers[i].set_model_params(payloads[i])
            trainers[i].train(None, None, None)
            uploads[i] = wire(trainers[i].get_model_params(), budget)["upload"]  # the manager unwraps {round, upload}
        payloads = each(aggregator.aggregate_round(uploads, {}, len(sampled)))
    for i, trainer in enumerate(trainers):
        trainer.set_model_params(payloads[i])
    return sorted((row for trainer in trainers for row in trainer.log.rows), key=lambda r: (r["round"], r["client"]))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_methods_fedml_wrappers_reproduce_the_simulator(method, matrix_reference):
    """The FedML wrappers (StrategyAggregator, StrategyTrainer) of every method, driven in process through FedML's
    call sequence with encoded messages, give the simulator's per-client metrics (the matrix's reference run: two of
    three clients per round); the gRPC transport itself is exercised by the real deployments (pFedSeq above, and
    the representative methods below)."""
    recipe, reference = matrix_reference(method)
    rows = drive_like_fedml(recipe)
    simulated = json.loads((reference / "metrics.json").read_text())["eval"]
    simulated = sorted(simulated, key=lambda r: (r["round"], r["client"]))
    assert [(r["round"], r["client"]) for r in rows] == [(r["round"], r["client"]) for r in simulated]
    assert all(a["test_accuracy"] == b["test_accuracy"] and a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-6)
               for a, b in zip(rows, simulated))


@pytest.mark.slow
def test_a_cross_silo_server_warm_starts_its_seq_learner_as_the_simulator_does(tiny_vit, tmp_path):
    """hub_args.hub_learner_init in a deployment: ``build_server`` (what ``run_party`` calls) loads the saved
    SeqLearner, and the clients' metrics equal the warm-started simulator's, not a cold start's."""
    from fedml_pfedseq.models.seq_learner import SeqLearnerModel

    cold = silo_recipe(tiny_vit, tmp_path)
    run_recipe(cold, tmp_path / "source", progress=False)  # writes seq_learner/
    warm = small_recipe("pFedSeq", tiny_vit, tmp_path, **DEPLOYMENT, hub_args={"hub_learner_init": str(tmp_path /
                                                                                                        "source")})
    data = build_data(warm)
    saved = SeqLearnerModel.from_pretrained(str(tmp_path / "source" / "seq_learner")).state_dict()
    started = build_server(warm, build_model(warm, data.num_labels), len(data.clients)).learner.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in started.items())
    rows = drive_like_fedml(warm)
    simulated = sorted(json.loads((tmp_path / "source" / "metrics.json").read_text())["eval"],
                       key=lambda r: (r["round"], r["client"]))
    run_recipe(warm, tmp_path / "warm", progress=False)
    warm_simulated = sorted(json.loads((tmp_path / "warm" / "metrics.json").read_text())["eval"],
                            key=lambda r: (r["round"], r["client"]))
    assert [r["test_loss"] for r in rows] == pytest.approx([r["test_loss"] for r in warm_simulated], rel=1e-6)
    assert [r["test_loss"] for r in rows] != pytest.approx([r["test_loss"] for r in simulated], rel=1e-6)


# APPLE: the largest payloads (every client's core); pFedLoRA: parties of different depths; PeFLL: multi-part
# payloads and uploads (embedding network, descriptor updates and gradients), in plaintext (comm_args.tls: false)
@pytest.mark.parametrize("method, tls", [("apple", True), ("pfedlora", True), ("pefll", False)])
@pytest.mark.slow
def test_representative_methods_run_as_fedml_parties_and_match_the_simulator(method, tls, tiny_vit, tmp_path):
    name = METHODS[method].name
    model_args = {"client_depths": [2, 1]} if method == "pfedlora" else {}  # each party builds its own depth
    recipe = small_recipe(name, tiny_vit, tmp_path, data_args=DEPLOYMENT["data_args"], model_args=model_args,
                          train_args={**DEPLOYMENT["train_args"], "comm_round": 2}, device_args={"num_threads": 1},
                          comm_args={"tls": tls})
    cross = deploy(recipe, tmp_path / "cross_silo", progress=False)
    logs = [path.read_text() for path in sorted((tmp_path / "cross_silo" / "logs").glob("*.log"))]
    assert len(logs) == CLIENTS + 1 and all(
        ("(mutual TLS)" in log) == tls and ("comm_args.tls is false" in log) == (not tls) for log in logs)
    simulated = run_recipe(recipe, tmp_path / "simulator", progress=False)
    assert cross["final_test_accuracy_mean"] == pytest.approx(simulated["final_test_accuracy_mean"], abs=1e-9)
    rows = [json.loads((tmp_path / engine / "metrics.json").read_text())["eval"] for engine in ("cross_silo",
                                                                                             "simulator")]
    assert [(r["round"], r["client"]) for r in rows[0]] == [(r["round"], r["client"]) for r in rows[1]]
    assert all(a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5) for a, b in zip(*rows))


# --- failures stop everyone -------------------------------------------------------------------------------------

def signal_a_client_mid_run(recipe, out, client: str, sig: int) -> tuple[Exception | None, dict]:
    """Deploy in a thread, send ``sig`` to ``client`` once round 1 is done, and wait for the deployment to end;
    returns the error it ended with (None if it succeeded) and every party's pid."""
    outcome = {}

    def target():
        try:
            outcome["summary"] = deploy(recipe, out, progress=False)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            outcome["error"] = err

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 180
    while (read_progress(out) or 0) < 1:  # mid-run: round 1 is done
        assert time.monotonic() < deadline, "timed out waiting for the deployment"
        time.sleep(0.2)
    pids = json.loads((out / "logs" / "pids.json").read_text())
    os.kill(pids[client], sig)
    thread.join(timeout=120)
    assert not thread.is_alive()
    return outcome.get("error"), pids


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead too
        return f.read().split()[2] != "Z"


@pytest.mark.slow
def test_a_client_that_dies_mid_run_stops_every_party_with_an_error(tiny_vit, tmp_path):
    recipe = silo_recipe(tiny_vit, tmp_path, round_timeout=120)
    recipe.train_args.comm_round = 20
    error, pids = signal_a_client_mid_run(recipe, tmp_path / "killed", "client_1", signal.SIGKILL)
    assert isinstance(error, DeploymentError) and "client_1 (rank 2) exited with code -9" in str(error)
    assert not any(alive(pid) for pid in pids.values())


@pytest.mark.slow
def test_a_stalled_round_stops_every_party_after_the_round_timeout(tiny_vit, tmp_path):
    recipe = silo_recipe(tiny_vit, tmp_path, round_timeout=20)
    recipe.train_args.comm_round = 20
    # client_0 stays alive but silent: only a timeout can notice
    error, pids = signal_a_client_mid_run(recipe, tmp_path / "stalled", "client_0", signal.SIGSTOP)
    assert isinstance(error, DeploymentError) and "round_timeout" in str(error)
    assert not any(alive(pid) for pid in pids.values())
