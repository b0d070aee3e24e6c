"""The federated-LoRA methods: FFA-LoRA (A frozen, B trained and averaged), FedSA-LoRA (A averaged, B kept by each
client) and FLoRA (factors stacked, their product merged into the weights): their aggregation against hand-computed
values, what travels, what stays, and each run end to end from its recipe."""
from __future__ import annotations

import pytest
import torch
from conftest import assert_every_client_evaluated, run_shipped_recipe, small_recipe

from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.lora_state import lora_factors
from fedml_pfedseq.strategies import method_class

A, B = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"


def server(method: str, tmp_path):
    """The method's server over two clients, from A = [1, 2], B = [0, 0] and a head [0]."""
    initial = {"lora": {A: torch.tensor([1.0, 2.0]), B: torch.zeros(2)}, "head": {"weight": torch.zeros(1)}}
    return method_class(method).Server(2, initial, small_recipe(method, "unused", tmp_path))


def upload(i: int, n: int, **parts) -> dict:
    return {"client_id": i, "num_samples": n, **parts}


def test_ffa_lora_sends_and_averages_the_b_factors_and_the_head_only(tmp_path):
    ffa = server("FFA-LoRA", tmp_path)
    sent = ffa.initial_payloads()
    assert sent[0]["lora"].keys() == {B} and sent[1]["head"].keys() == {"weight"}
    head = lambda w: {"weight": torch.tensor([w])}  # noqa: E731
    payloads = ffa.aggregate({0: upload(0, 1, lora={B: torch.tensor([1.0, 0.0])}, head=head(4.0)),
                              1: upload(1, 3, lora={B: torch.tensor([0.0, 4.0])}, head=head(0.0))})
    # B: (1 * [1, 0] + 3 * [0, 4]) / 4; head: (1 * 4 + 3 * 0) / 4; A is where it started
    assert torch.equal(ffa.global_state["lora"][B], torch.tensor([0.25, 3.0]))
    assert torch.equal(ffa.global_state["lora"][A], torch.tensor([1.0, 2.0]))
    assert torch.equal(ffa.global_state["head"]["weight"], torch.tensor([1.0]))
    assert payloads[1]["lora"].keys() == {B} and torch.equal(payloads[1]["lora"][B], torch.tensor([0.25, 3.0]))
    with pytest.raises(KeyError, match="client 0: lora update has keys that differ"):  # an A update is refused
        ffa.aggregate({0: upload(0, 1, lora={A: torch.ones(2), B: torch.ones(2)}, head={"weight": torch.zeros(1)})})


def test_fedsa_lora_sends_and_averages_the_a_factors_only(tmp_path):
    fedsa = server("FedSA-LoRA", tmp_path)
    assert fedsa.initial_payloads()[0].keys() == {"client_id", "lora"} and fedsa.sent[0]["lora"].keys() == {A}
    payloads = fedsa.aggregate({0: upload(0, 2, lora={A: torch.tensor([2.0, 0.0])}),
                                1: upload(1, 2, lora={A: torch.tensor([0.0, -2.0])})})
    # A: [1, 2] + (2 * [2, 0] + 2 * [0, -2]) / 4
    assert torch.equal(payloads[0]["lora"][A], torch.tensor([2.0, 1.0])) and payloads[0]["lora"].keys() == {A}
    assert not fedsa.global_adapter  # averaged A factors are no adapter on their own


@pytest.mark.slow
def test_an_ffa_lora_client_trains_b_and_the_head_with_a_left_at_its_init(tiny_vit, tmp_path):
    fed = build_federation(small_recipe("FFA-LoRA", tiny_vit, tmp_path, train_args={"learning_rate": 0.5}))
    client = fed.clients[0]
    client.receive(fed.server.initial_payloads()[0])
    before = fed.model.get_lora_state()
    sent = client.train(1)
    after = fed.model.get_lora_state()
    assert sent["lora"].keys() == lora_factors(before, ("B",)).keys() and sent["head"]
    assert all(torch.equal(before[k], after[k]) for k in lora_factors(before, ("A",)))  # A: frozen
    assert all(sent["lora"][k].abs().sum() > 0 for k in sent["lora"])  # every B moved


@pytest.mark.slow
def test_a_fedsa_lora_client_keeps_its_b_and_head_when_a_new_a_arrives(tiny_vit, tmp_path):
    fed = build_federation(small_recipe("FedSA-LoRA", tiny_vit, tmp_path, train_args={"learning_rate": 0.5}))
    client = fed.clients[0]
    client.receive(fed.server.initial_payloads()[0])
    sent = client.train(1)
    own_b, own_head = lora_factors(client.state["lora"], ("B",)), client.state["head"]
    assert sent.keys() == {"client_id", "num_samples", "lora"}
    assert sent["lora"].keys() == lora_factors(client.state["lora"], ("A",)).keys()  # only A travels
    new_a = {k: v + 1 for k, v in lora_factors(client.state["lora"], ("A",)).items()}
    client.receive({"client_id": 0, "lora": new_a})
    assert all(torch.equal(client.state["lora"][k], new_a[k]) for k in new_a)
    assert all(torch.equal(client.state["lora"][k], own_b[k]) for k in own_b) and client.state["head"] is own_head
    assert any(v.abs().sum() > 0 for v in own_b.values())  # B trained (it starts at 0)


def test_flora_merges_the_stacked_product_not_the_product_of_averages(tmp_path):
    a, b = "m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight"  # r = 1, d_in = d_out = 2
    initial = {"lora": {a: torch.tensor([[0.5, 0.5]]), b: torch.zeros(2, 1)}, "head": {"weight": torch.zeros(1)}}
    recipe = small_recipe("FLoRA", "unused", tmp_path, model_args={"lora_r": 1, "lora_alpha": 2})  # scaling 2
    flora = method_class("FLoRA").Server(2, initial, recipe)
    key = "m.layers.0.q_proj.base_layer.weight"
    assert torch.equal(flora.initial_payloads()[0]["merged"][key], torch.zeros(2, 2))
    trained = {0: (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]])),  # (A_k, B_k), n = 1 and 3
               1: (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [2.0]]))}
    uploads = {i: upload(i, n, lora={a: trained[i][0] - initial["lora"][a], b: trained[i][1]},
                         head={"weight": torch.tensor([float(i)])}) for i, n in ((0, 1), (1, 3))}
    payloads = flora.aggregate(uploads)
    # 2 * (1/4 B_0 A_0 + 3/4 B_1 A_1) = [[0.5, 0], [0, 3]]; FedAvg of the factors would merge
    # 2 * avg(B) avg(A) = 2 * [[0.25], [1.5]] [[0.25, 0.75]]
    assert torch.equal(payloads[1]["merged"][key], torch.tensor([[0.5, 0.0], [0.0, 3.0]]))
    assert torch.equal(payloads[1]["lora"][a], initial["lora"][a]) and torch.equal(payloads[1]["lora"][b],
                                                                                   torch.zeros(2, 1))
    assert torch.equal(payloads[0]["head"]["weight"], torch.tensor([0.75]))
    payloads = flora.aggregate(uploads)  # the merged updates add up round after round
    assert torch.equal(payloads[0]["merged"][key], torch.tensor([[1.0, 0.0], [0.0, 6.0]]))


@pytest.mark.slow
def test_a_flora_global_model_of_one_upload_computes_what_its_client_trained(tiny_vit, tmp_path):
    """The merged weights with theta^0's LoRA (B = 0) are the function of the client's trained LoRA on the
    pretrained weights: the scaling and the stacking are PEFT's."""
    fed = build_federation(small_recipe("FLoRA", tiny_vit, tmp_path, train_args={"learning_rate": 0.5}))
    client = fed.clients[0]
    client.receive(fed.server.initial_payloads()[0])
    sent = client.train(1)
    x = torch.stack([client.data.test[i]["pixel_values"] for i in range(4)])
    fed.model.eval()
    with torch.no_grad():
        trained_logits = fed.model(x)  # its trained LoRA and head on the pretrained weights
        client.receive(fed.server.aggregate({0: sent})[0])
        client.load()
        global_logits = fed.model(x)
    assert torch.allclose(global_logits, trained_logits, atol=1e-5)
    assert any(v.abs().sum() > 0 for v in client.state["merged"].values())


@pytest.mark.slow
@pytest.mark.parametrize("name, method", [("ffa_lora", "FFA-LoRA"), ("fedsa_lora", "FedSA-LoRA"),
                                          ("flora", "FLoRA")])
def test_the_shipped_recipe_runs_and_evaluates_every_client(name, method, tiny_vit, tmp_path):
    _, summary, metrics = run_shipped_recipe(name, tiny_vit, tmp_path)
    assert_every_client_evaluated(metrics)
    assert summary["method"] == method
