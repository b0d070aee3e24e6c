"""Attacks on a running deployment, from this process, on 127.0.0.1: what reaches a party's port never runs, never
changes the federation, and is named in the party's log.

``pfedseq deploy`` runs in a subprocess (pFedSeq, 3 clients) with mutual TLS (its throw-away CA). As soon as the
server's and client 0's ports listen, this process sends each port, with client 1's valid certificate (an insider:
the strongest attacker the codec faces), a pickle whose unpickling would create a file and messages that disagree with
themselves or exceed the limit; it connects without a certificate and with one from another CA; and it claims to be
client 0 (to the server) or the server (to client 0) with client 1's certificate. The deployment must then finish
with the simulator's per-client metrics. (Without TLS the same codec refuses the same bytes: test_wire.py; a
plaintext deployment: test_cross_silo.py's representative methods.)
"""
import json
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2 as pb2
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2_grpc as pb2_grpc
from fedml.cross_silo.server.message_define import MyMessage
from safetensors.torch import save as save_tensors
from test_cross_silo import silo_recipe

from fedml_pfedseq.cross_silo.certificates import CA_CERT, issue_federation, party_files
from fedml_pfedseq.cross_silo.grpc_transport import read_addresses
from fedml_pfedseq.cross_silo.party import message_limit
from fedml_pfedseq.data.federated import dataset_label_names
from fedml_pfedseq.federation import build_model
from fedml_pfedseq.simulation import run_recipe
from fedml_pfedseq.transport import encode

SERVER, CLIENT_0, CLIENT_1 = 0, 1, 2  # ranks


class CreatesFile:
    """Unpickling this creates ``path``: the side effect an attacker's pickle would have."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def send(port: int, data: bytes, tls: Path, as_rank: int | None, to_rank: int, certificates: Path | None = None) -> str:
    """Send ``data`` to ``port`` as a party's transport does, trusting the CA in ``tls`` (the federation's folder),
    presenting party ``as_rank``'s certificate from ``certificates`` (default: ``tls``; ``as_rank`` None: none) and
    expecting the listener to prove ``party-<to_rank>``. Returns the gRPC status name the sender got."""
    key_pair = {}
    if as_rank is not None:
        cert, key = party_files(certificates or tls, as_rank)
        key_pair = {"private_key": key.read_bytes(), "certificate_chain": cert.read_bytes()}
    credentials = grpc.ssl_channel_credentials(root_certificates=(tls / CA_CERT).read_bytes(), **key_pair)
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials,
                                  options=[("grpc.ssl_target_name_override", f"party-{to_rank}")])
    try:
        pb2_grpc.gRPCCommManagerStub(channel).sendMessage(pb2.CommRequest(client_id=0, message=data), timeout=10)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name
    finally:
        channel.close()


def upload(sender: int, round_idx: int = 1) -> bytes:
    """A well-formed upload message from ``sender`` with a harmful-looking update."""
    harmful = {"client_id": sender - 1, "lora": {"w": torch.full((2,), 1e6)}}
    params = {MyMessage.MSG_ARG_KEY_MODEL_PARAMS: {"round": round_idx, "upload": harmful},
              MyMessage.MSG_ARG_KEY_NUM_SAMPLES: 1}
    return encode(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, sender, SERVER, params)


def attack(port: int, rank: int, marker: Path, tls: Path, limit: int) -> dict[str, str]:
    """Every attack on party ``rank`` listening on ``port``; the status each attacker got back."""
    insider = CLIENT_1  # a client that holds a valid certificate
    expected_sender = SERVER if rank != SERVER else CLIENT_1
    disagreeing = save_tensors({"0": torch.ones(2)}, metadata={"pfedseq": json.dumps(
        {"format": "pfedseq-message/1", "type": 3, "sender": insider, "receiver": rank,
         "params": {"s:w": {"tensor": "1"}}})})  # names tensor "1"; the message holds "0"
    oversized = encode(3, expected_sender, rank, {"w": torch.zeros((limit + 1000) // 4)})
    results = {
        "pickle": send(port, pickle.dumps(CreatesFile(marker)), tls, insider, rank),
        "disagreeing": send(port, disagreeing, tls, insider, rank),
        "oversized": send(port, oversized, tls, insider, rank),
        "far oversized": send(port, encode(3, insider, rank, {"w": torch.zeros(limit // 2 + 1)}) * 4, tls, insider,
                              rank),
    }
    other_ca = tls.parent / "other_ca"
    issue_federation(other_ca, 3)
    results["no certificate"] = send(port, upload(insider), tls, None, rank)
    results["another CA"] = send(port, upload(insider), tls, insider, rank, certificates=other_ca)
    results["forged sender"] = send(port, upload(CLIENT_0) if rank == SERVER else
                                    encode(2, SERVER, rank, {"model_params": {"round": 1}}), tls, insider, rank)
    return results


def deploy_under_attack(tiny_vit, tmp: Path) -> dict:
    """Deploy in a subprocess, attack the server and client 0 as soon as they listen, wait for the end."""
    recipe = silo_recipe(tiny_vit, tmp, round_timeout=120)
    path, out = tmp / "attacked.yaml", tmp / "cross_silo"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    process = subprocess.Popen([sys.executable, "-m", "fedml_pfedseq.cli", "deploy", str(path), "--no-progress",
                                "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    limit = message_limit(recipe, build_model(recipe, len(dataset_label_names(recipe.data_args))), 3)
    marker, results = tmp / "pickle_ran", {}
    deadline = time.monotonic() + 300
    for rank in (SERVER, CLIENT_0):
        while not (out / "grpc_ipconfig.csv").is_file() or not listening(read_addresses(
                str(out / "grpc_ipconfig.csv"))[rank][1]):
            assert process.poll() is None and time.monotonic() < deadline, "the deployment ended before listening"
            time.sleep(0.1)
        port = read_addresses(str(out / "grpc_ipconfig.csv"))[rank][1]
        results[rank] = attack(port, rank, marker, out / "tls", limit)
    _, stderr = process.communicate(timeout=600)
    run_recipe(recipe, tmp / "simulator", progress=False)
    return {"returncode": process.returncode, "stderr": stderr, "out": out, "marker": marker, "results": results,
            "logs": {name: (out / "logs" / f"{name}.log").read_text()
                                             for name in ("server", "client_0", "client_1", "client_2")}}


@pytest.fixture(scope="module")
def attacked(tiny_vit, tmp_path_factory):
    return deploy_under_attack(tiny_vit, tmp_path_factory.mktemp("attacked"))


def assert_unchanged(run: dict) -> None:
    """The federation finished as if nothing had been sent: no side effect, the simulator's metrics."""
    assert run["returncode"] == 0, run["stderr"][-3000:]
    assert not run["marker"].exists()
    cross = json.loads((run["out"] / "metrics.json").read_text())["eval"]
    sim = json.loads((run["out"].parent / "simulator" / "metrics.json").read_text())["eval"]
    assert [(r["round"], r["client"]) for r in cross] == [(r["round"], r["client"]) for r in sim]
    assert all(a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-5) for a, b in zip(cross, sim))


@pytest.mark.slow
def test_attacks_over_tls_change_nothing_and_the_federation_finishes(attacked):
    assert_unchanged(attacked)


def test_a_pickle_and_malformed_messages_are_refused_by_the_codec_and_logged(attacked):
    for rank, log in ((SERVER, attacked["logs"]["server"]), (CLIENT_0, attacked["logs"]["client_0"])):
        got = attacked["results"][rank]
        assert got["pickle"] == got["disagreeing"] == got["oversized"] == "INVALID_ARGUMENT", got
        assert got["far oversized"] == "RESOURCE_EXHAUSTED"  # gRPC stops it before reading it
        assert "refused a message from ipv4:127.0.0.1" in log and "(party-2)" in log  # the peer and its identity
        for reason in ("not this format", "names a tensor '1' that is not in the message", "-byte message limit"):
            assert reason in log, (rank, reason)


def test_a_party_without_a_certificate_of_the_federation_is_refused_at_the_handshake(attacked):
    for rank, log in ((SERVER, attacked["logs"]["server"]), (CLIENT_0, attacked["logs"]["client_0"])):
        assert attacked["results"][rank]["no certificate"] == attacked["results"][rank]["another CA"] == "UNAVAILABLE"
        assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log  # gRPC's own line for the refused handshake
        assert "certificate signature failure" in log


def test_a_valid_certificate_cannot_speak_for_another_party(attacked):
    assert attacked["results"][SERVER]["forged sender"] == "PERMISSION_DENIED"
    assert "its header says it is from rank 1, its certificate proves rank 2" in attacked["logs"]["server"]
    assert attacked["results"][CLIENT_0]["forged sender"] == "PERMISSION_DENIED"  # client 1 posing as the server
    assert "its header says it is from rank 0, its certificate proves rank 2" in attacked["logs"]["client_0"]


def test_every_party_runs_mutual_tls(attacked):
    assert all("listens on 127.0.0.1" in log and "(mutual TLS)" in log for log in attacked["logs"].values())
