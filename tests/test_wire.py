"""The wire format (transport.encode / decode) and the checks a party applies to every message it receives."""
import json
import pickle
import re
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save as save_tensors

from fedml_pfedseq.cross_silo.certificates import issue_federation, party_files, rank_of
from fedml_pfedseq.cross_silo.grpc_transport import CheckingServicer, Refused
from fedml_pfedseq.transport import MAX_DEPTH, MAX_NDIM, WireError, WireLimits, decode, encode

LIMITS = WireLimits(max_bytes=2**20)


def message_bytes(params: dict, tensors: dict | None = None, **fields) -> bytes:
    """A message assembled by hand (as an attacker would): ``params`` is the JSON tree as it goes on the wire."""
    header = {"format": "pfedseq-message/1", "type": 3, "sender": 1, "receiver": 0, "params": params, **fields}
    return save_tensors(tensors or {}, metadata={"pfedseq": json.dumps(header)})


class SideEffect:
    def __reduce__(self):
        return (Path.touch, (Path("/nonexistent/pfedseq-probe"),))


# --- round trip -----------------------------------------------------------------------------------------------

def test_a_payload_comes_back_equal_in_structure_types_and_values():
    shared = torch.randn(3, 2)
    params = {"model_params": {"round": 2, "payload": {
        "client_id": 1, "lora": {"a": torch.randn(4, 3), "b": torch.zeros(0)}, "head": {"w": shared, "w_again": shared},
        "peers": {0: {"x": torch.arange(5)}, 2: {"x": torch.ones(2, dtype=torch.bfloat16)}},
        "mask": torch.tensor([True, False]), "pair": (1, 2.5), "names": ["s", None], "loss": float("nan"),
        "flag": False, "s:tricky": "i:7", "tensor": {"tensor": 3}}}, "num_samples": 28}
    got = decode(encode(3, 1, 0, params), LIMITS)
    assert (got.type, got.sender, got.receiver) == (3, 1, 0)
    payload, sent = got.params["model_params"]["payload"], params["model_params"]["payload"]
    assert set(payload["peers"]) == {0, 2} and payload["pair"] == (1, 2.5) and payload["names"] == ["s", None]
    assert payload["s:tricky"] == "i:7" and payload["tensor"] == {"tensor": 3}  # keys and values like the tags
    assert payload["loss"] != payload["loss"] and payload["flag"] is False and got.params["num_samples"] == 28
    for part in ("lora", "head"):
        assert all(torch.equal(payload[part][k], sent[part][k]) for k in sent[part])
    assert payload["peers"][2]["x"].dtype == torch.bfloat16 and payload["mask"].dtype == torch.bool
    assert payload["head"]["w"] is payload["head"]["w_again"]  # one tensor, sent once, as pickle kept it


def test_what_cannot_travel_is_named_before_anything_is_sent():
    with pytest.raises(TypeError, match=r"message\['x'\].*SideEffect"):
        encode(3, 1, 0, {"x": SideEffect()})


# --- refusals -------------------------------------------------------------------------------------------------

def refusal(data: bytes, limits: WireLimits = LIMITS) -> str:
    with pytest.raises(WireError) as err:
        decode(data, limits)
    return str(err.value)


def test_a_pickle_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Touch:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert "not this format" in refusal(pickle.dumps({"model_params": Touch()}, protocol=protocol))
    assert not marker.exists()


def test_truncated_random_and_empty_bytes_are_refused():
    data = encode(3, 1, 0, {"w": torch.randn(64)})
    assert "malformed tensors" in refusal(data[:-5])
    assert "too short" in refusal(b"")
    assert "not this format" in refusal(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 40)


def test_a_message_over_the_limit_is_refused_before_it_is_parsed():
    data = encode(3, 1, 0, {"w": torch.randn(1000)})
    assert "over the" in refusal(data, WireLimits(max_bytes=len(data) - 1))
    assert decode(data, WireLimits(max_bytes=len(data))).sender == 1


def test_a_header_that_disagrees_with_the_tensors_is_refused():
    t = {"0": torch.ones(2)}
    assert "not in the message" in refusal(message_bytes({"s:w": {"tensor": "1"}}, t))
    assert "not in its header" in refusal(message_bytes({"s:w": 1}, t))
    assert "malformed parameter key" in refusal(message_bytes({"w": 1}))


def test_dtypes_and_ranks_outside_the_payload_contract_are_refused():
    assert "dtype 'U16'" in refusal(message_bytes({"s:w": {"tensor": "0"}}, {"0": torch.ones(2, dtype=torch.uint16)}))
    deep = torch.ones([1] * (MAX_NDIM + 1))
    assert "dimensions" in refusal(message_bytes({"s:w": {"tensor": "0"}}, {"0": deep}))


def test_fields_of_the_wrong_type_and_deep_nesting_are_refused():
    assert "sender and receiver ints" in refusal(message_bytes({}, sender="1"))
    assert "sender and receiver ints" in refusal(message_bytes({}, type=[1]))
    assert "not this format" in refusal(message_bytes({}, format="pickle"))
    nested = {}
    for _ in range(MAX_DEPTH + 2):
        nested = {"s:n": nested}
    assert "nested deeper" in refusal(message_bytes(nested))
    hostile = "[" * 200_000 + "]" * 200_000  # deeper than Python's JSON parser can recurse
    assert "not this format" in refusal(save_tensors({}, metadata={"pfedseq": hostile}))


# --- a party's checks: who may say what --------------------------------------------------------------------

def accepted(rank: int, data: bytes, proven: int | None, tls: bool = True):
    return CheckingServicer(rank, num_clients=3, limits=LIMITS, tls=tls).accept(data, proven)


def test_the_sender_must_be_the_rank_its_certificate_proves():
    upload = encode(3, 2, 0, {"model_params": {"round": 1, "upload": {}}})
    assert accepted(0, upload, proven=2).get_sender_id() == 2
    with pytest.raises(Refused, match="from rank 2, its certificate proves rank 1") as err:
        accepted(0, upload, proven=1)
    assert err.value.status == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(Refused, match="names no party"):
        accepted(0, upload, proven=None)


def test_clients_hear_only_the_server_and_the_server_only_clients():
    with pytest.raises(Refused, match="rank 2 may not send rank 1"):
        accepted(1, encode(2, 2, 1, {}), proven=2)  # a client posing as the server to a peer
    with pytest.raises(Refused, match="rank 4 may not send rank 0"):
        accepted(0, encode(3, 4, 0, {}), proven=4)  # a rank outside the federation
    with pytest.raises(Refused, match="to rank 2"):
        accepted(1, encode(2, 0, 2, {}), proven=0)  # meant for another party
    with pytest.raises(Refused, match="repeat the header"):
        accepted(0, encode(3, 1, 0, {"sender": 2}), proven=1)
    msg = accepted(1, encode(2, 0, 1, {"model_params": {"round": 1}}), proven=0)
    assert (msg.get_type(), msg.get_sender_id(), msg.get("model_params")) == (2, 0, {"round": 1})


def test_without_tls_the_codec_still_refuses_a_pickle():
    with pytest.raises(Refused, match="not this format"):
        accepted(0, pickle.dumps({"x": 1}), proven=None, tls=False)
    assert accepted(0, encode(3, 1, 0, {}), proven=None, tls=False).get_sender_id() == 1


# --- certificates -----------------------------------------------------------------------------------------

def test_a_federation_has_one_ca_and_one_identity_per_party(tmp_path):
    from cryptography import x509

    assert issue_federation(tmp_path, 2) == [0, 1, 2] and issue_federation(tmp_path, 3) == [3]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    for rank in range(4):
        cert_path, key_path = party_files(tmp_path, rank)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        assert [rank_of(n) for n in names] == [rank]
        assert key_path.stat().st_mode & 0o077 == 0  # readable by its owner only
    assert rank_of("party-x") is None and rank_of("evil.party-1") is None


# --- no unpickling anywhere in the package ---------------------------------------------------------------

UNSAFE = re.compile(r"pickle\.loads?\(|Unpickler|cloudpickle\.loads?\(|dill\.loads?\("
                    r"|torch\.load\((?![^)]*weights_only=True)")


def test_no_code_of_the_package_unpickles():
    package = Path(__file__).resolve().parents[1] / "fedml_pfedseq"
    found = [f"{path.relative_to(package)}:{i}: {line.strip()}" for path in sorted(package.rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1) if UNSAFE.search(line)]
    assert found == []
    assert UNSAFE.search("x = torch.load(f)") and not UNSAFE.search("torch.load(f, weights_only=True)")
