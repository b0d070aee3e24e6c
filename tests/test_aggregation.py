"""Server aggregation against hand-computed values, and what each method sends."""
from types import SimpleNamespace

import pytest
import torch

from fedml_pfedseq.lora_state import weighted_average
from fedml_pfedseq.strategies import method_class


def test_weighted_average_matches_hand_computed_values():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    avg = weighted_average([a, b], [1, 3])  # (1*a + 3*b) / 4
    assert torch.allclose(avg["w"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(avg["b"], torch.tensor([3.0]))


def initial_state():
    return {"lora": {"l.layers.0.q.lora_A": torch.tensor([1.0, 1.0])}, "head": {"weight": torch.tensor([0.0])}}


def make_server(name, num_clients=3, cluster_transforms=None, **algorithm_args):
    """The method's server over ``initial_state``, with only the recipe sections these servers read."""
    method = method_class(name)
    recipe = SimpleNamespace(algorithm_args=method.Args(**algorithm_args),
                             data_args=SimpleNamespace(cluster_transforms=cluster_transforms))
    return method.Server(num_clients, initial_state(), recipe=recipe)


def upload(i, n, lora_delta, head_delta=None):
    out = {"client_id": i, "num_samples": n, "lora": {"l.layers.0.q.lora_A": torch.tensor(lora_delta)}}
    if head_delta is not None:
        out["head"] = {"weight": torch.tensor(head_delta)}
    return out


def test_fedavg_rebuilds_sent_plus_delta_and_averages_by_sample_count():
    server = make_server("FedAvg")
    server.initial_payloads()
    payloads = server.aggregate({0: upload(0, 10, [1.0, 0.0], [1.0]), 1: upload(1, 30, [0.0, 2.0], [2.0]),
                                 2: upload(2, 60, [-1.0, 1.0], [0.0])})
    # trained states: [2,1], [1,3], [0,2]; weights .1, .3, .6 -> [0.5, 2.2]; head: .1*1 + .3*2 = 0.7
    for i, p in payloads.items():
        assert p["client_id"] == i
        assert torch.allclose(p["lora"]["l.layers.0.q.lora_A"], torch.tensor([0.5, 2.2]))
        assert torch.allclose(p["head"]["weight"], torch.tensor([0.7]))
    # the next round starts from what was sent: a zero delta keeps the average
    again = server.aggregate({i: upload(i, 1, [0.0, 0.0], [0.0]) for i in range(3)})
    assert torch.allclose(again[0]["lora"]["l.layers.0.q.lora_A"], torch.tensor([0.5, 2.2]))


def test_the_cluster_oracle_averages_within_each_cluster_by_sample_count():
    server = make_server("FedAvgLocalHead", num_clients=5, cluster_transforms=["identity", "rot90"],
                         oracle_clusters=True)
    server.initial_payloads()  # every client starts from [1, 1]
    payloads = server.aggregate({0: upload(0, 10, [1.0, 0.0]), 2: upload(2, 30, [0.0, 2.0]),
                                 4: upload(4, 60, [-1.0, 1.0]), 1: upload(1, 1, [3.0, 3.0])})
    # cluster 0 (clients 0, 2, 4): trained [2,1], [1,3], [0,2], weights .1 .3 .6 -> [0.5, 2.2]
    # cluster 1 (clients 1, 3): only client 1 reported, trained [4, 4]; client 3 gets it too
    got = {i: p["lora"]["l.layers.0.q.lora_A"] for i, p in payloads.items()}
    for i in (0, 2, 4):
        assert torch.allclose(got[i], torch.tensor([0.5, 2.2]))
    for i in (1, 3):
        assert torch.allclose(got[i], torch.tensor([4.0, 4.0]))
    # the global adapter is the average over every client that reported: (10*[2,1] + 30*[1,3] + 60*[0,2] + [4,4])/101
    assert torch.allclose(server.global_state["lora"]["l.layers.0.q.lora_A"],
                          torch.tensor([54.0 / 101, 224.0 / 101]))
    # a cluster none of whose clients reported keeps what it was sent
    again = server.aggregate({0: upload(0, 1, [0.0, 0.0])})
    assert torch.allclose(again[0]["lora"]["l.layers.0.q.lora_A"], torch.tensor([0.5, 2.2]))
    assert torch.allclose(again[3]["lora"]["l.layers.0.q.lora_A"], torch.tensor([4.0, 4.0]))
    plain = make_server("FedAvgLocalHead", num_clients=5, cluster_transforms=["identity", "rot90"])
    plain.initial_payloads()
    same = plain.aggregate({0: upload(0, 10, [1.0, 0.0]), 1: upload(1, 30, [0.0, 2.0])})
    assert torch.equal(same[0]["lora"]["l.layers.0.q.lora_A"], same[1]["lora"]["l.layers.0.q.lora_A"])


def test_each_method_sends_only_what_it_declares():
    assert set(make_server("FedAvg").initial_payloads()[0]) == {"client_id", "lora", "head"}
    assert set(make_server("FedAvgLocalHead").initial_payloads()[0]) == {"client_id", "lora"}
    assert set(make_server("Local").initial_payloads()[0]) == {"client_id"}


def test_nan_update_is_refused_and_leaves_the_server_state_unchanged():
    server = make_server("FedAvgLocalHead", num_clients=2)
    server.initial_payloads()
    before = server.global_state["lora"]["l.layers.0.q.lora_A"].clone()
    with pytest.raises(ValueError, match="client 1 lora update.*NaN or Inf"):
        server.aggregate({0: upload(0, 5, [1.0, 1.0]), 1: upload(1, 5, [float("nan"), 0.0])})
    assert torch.equal(server.global_state["lora"]["l.layers.0.q.lora_A"], before)


def test_upload_with_wrong_keys_or_sender_is_refused():
    server = make_server("FedAvgLocalHead", num_clients=2)
    server.initial_payloads()
    bad = {"client_id": 1, "num_samples": 5, "lora": {"other": torch.zeros(2)}}
    with pytest.raises(KeyError, match="client 1: lora update has keys"):
        server.aggregate({0: upload(0, 5, [1.0, 1.0]), 1: bad})
    with pytest.raises(ValueError, match="claims to come from client 0"):
        server.aggregate({0: upload(0, 5, [1.0, 1.0]), 1: upload(0, 5, [1.0, 1.0])})


@pytest.mark.parametrize("field, value, message", [
    ("shape", torch.ones(1, 2), r"client 1: lora update 'l.layers.0.q.lora_A' is torch.float32 \(1, 2\), "
                                r"expected torch.float32 \(2,\)"),  # broadcastable: it would pass silently
    ("dtype", torch.ones(2, dtype=torch.float64), r"is torch.float64 \(2,\), expected torch.float32"),
    ("num_samples", 0, "num_samples must be a positive int"),
    ("num_samples", 2.5, "num_samples must be a positive int"),
    ("num_samples", True, "num_samples must be a positive int"),
])
def test_an_update_of_the_wrong_shape_dtype_or_weight_is_refused_and_changes_nothing(field, value, message):
    server = make_server("FedAvgLocalHead", num_clients=2)
    server.initial_payloads()
    before = {k: v.clone() for k, v in server.global_state["lora"].items()}
    bad = upload(1, 5, [1.0, 1.0])
    if field == "num_samples":
        bad["num_samples"] = value
    else:
        bad["lora"]["l.layers.0.q.lora_A"] = value
    with pytest.raises(ValueError, match=message):
        server.aggregate({0: upload(0, 5, [1.0, 1.0]), 1: bad})
    assert all(torch.equal(server.global_state["lora"][k], before[k]) for k in before)
