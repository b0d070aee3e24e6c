"""FedRep (head epochs, then adapter epochs; only the LoRA travels) and pFedLA (per-client hypernetworks giving
layer-wise aggregation weights, trained from clients' updates), each checked against an independent calculation,
and both run end to end from their recipes."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_every_client_evaluated, run_shipped_recipe, small_recipe, synthetic_lora
from safetensors.torch import load_file

import fedml_pfedseq.strategies.fedrep as fedrep
import fedml_pfedseq.strategies.pfedla as pfedla
from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.data.federated import client_seed
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.lora_state import add, subtract
from fedml_pfedseq.strategies import method_class
from fedml_pfedseq.training import make_loader, train_epochs
from fedml_pfedseq.transport import check_plain, encoded_bytes

N, RANK, HIDDEN, LAYERS = 4, 2, 3, 3  # 4 clients; per layer D = 4 * RANK * HIDDEN = 24


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------- FedRep


def test_fedrep_trains_the_head_then_the_adapter_and_uploads_only_the_lora_delta(tiny_vit, tmp_path, monkeypatch):
    recipe = small_recipe("FedRep", tiny_vit, tmp_path, algorithm_args={"fedrep_head_epochs": 2},
                          train_args={"epochs": 1, "learning_rate": 0.5})
    fed = build_federation(recipe)
    client, model = fed.clients[3], fed.model
    head_ids = {id(p) for p in model.head.parameters()}
    lora_ids = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    calls = []

    def recording(model, loader, epochs, *sgd, parameters=None, extra_loss=None):
        before = model.get_lora_state(), model.get_head_state()
        with_grad = {id(p) for p in model.parameters() if p.requires_grad}
        stats = train_epochs(model, loader, epochs, *sgd, parameters=parameters, extra_loss=extra_loss)
        calls.append({"epochs": epochs, "trained": {id(p) for p in parameters}, "with_grad": with_grad,
                      "lora_changed": not equal(before[0], model.get_lora_state()),
                      "head_changed": not equal(before[1], model.get_head_state())})
        return stats

    monkeypatch.setattr(fedrep, "train_epochs", recording)
    payload = fed.server.initial_payloads()[3]
    client.receive(payload)
    head_before = copy.deepcopy(client.state["head"])
    upload = client.train(1)

    head_phase, adapter_phase = calls
    assert head_phase == {"epochs": 2, "trained": head_ids, "with_grad": head_ids,
                          "lora_changed": False, "head_changed": True}
    assert adapter_phase == {"epochs": 1, "trained": lora_ids, "with_grad": lora_ids,
                             "lora_changed": True, "head_changed": False}
    assert {id(p) for p in model.parameters() if p.requires_grad} == head_ids | lora_ids  # unfrozen again
    assert set(upload) == {"client_id", "num_samples", "lora"} and upload["client_id"] == 3
    assert equal(upload["lora"], subtract(client.state["lora"], payload["lora"]))
    check_plain(upload, "upload")

    # independently: plain SGD loops, head only on the received adapter, then the adapter only under the new head
    model.set_lora_state(payload["lora"])
    model.set_head_state(head_before)
    loader = make_loader(client.data.train, 32, shuffle=True, seed=client_seed(0, 3, purpose=1001))
    lora_params = [p for p in model.parameters() if id(p) in lora_ids]
    for params, epochs in [(list(model.head.parameters()), 2), (lora_params, 1)]:
        optimizer = torch.optim.SGD(params, lr=0.5)
        for _ in range(epochs):
            for batch in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(batch["pixel_values"]), batch["labels"]).backward()
                optimizer.step()
    for part, state in [("lora", model.get_lora_state()), ("head", model.get_head_state())]:
        for k in state:
            torch.testing.assert_close(client.state[part][k], state[k], msg=f"{part} {k}")


# ---------------------------------------------------------------------------------------------------------- pFedLA


def initial_lora() -> dict[str, torch.Tensor]:
    return synthetic_lora(RANK, HIDDEN, LAYERS)


def make_server(seed: int = 0, **algorithm_args):
    args = {"pfedla_embedding_dim": 5, "pfedla_hidden_dim": 7, **algorithm_args}
    recipe = parse_recipe({"train_args": {"federated_optimizer": "pFedLA"}, "algorithm_args": args,
                           "common_args": {"random_seed": seed}, "device_args": {"using_gpu": False}})
    return method_class("pFedLA").Server(N, {"lora": initial_lora()}, recipe)


def uploads_for(round_idx: int, scale: float = 1e-2) -> dict[int, dict]:
    """Client i's LoRA update: a client-specific direction plus noise."""
    g = torch.Generator().manual_seed(100 + round_idx)
    return {i: {"client_id": i, "num_samples": 10 * (i + 1),
                "lora": {k: scale * (torch.full_like(v, float(i - 1.5)) + torch.randn(v.shape, generator=g))
                         for k, v in initial_lora().items()}}
            for i in range(N)}


def started(rounds: int, **algorithm_args):
    """A server after ``rounds`` rounds, with the payloads it sent last."""
    server = make_server(**algorithm_args)
    payloads = server.initial_payloads()
    for t in range(1, rounds + 1):
        payloads = server.aggregate(uploads_for(t))
    return server, payloads


def trained_by_hand(payloads: dict, uploads: dict) -> list[dict]:
    return [add(payloads[i]["lora"], uploads[i]["lora"]) for i in range(N)]


def hypernetwork_params(server) -> list[torch.Tensor]:
    return [p.detach().clone() for p in server.hypernetworks.parameters()]


def test_pfedla_first_round_sends_the_initial_adapter_and_takes_no_hypernetwork_step():
    server = make_server()
    assert all(equal(p["lora"], initial_lora()) for p in server.initial_payloads().values())
    before = hypernetwork_params(server)
    server.aggregate(uploads_for(1))
    assert all(torch.equal(a, b) for a, b in zip(before, hypernetwork_params(server)))
    assert "hn_grad_norm" not in server.last_round_stats and not server.optimizer.state
    server.aggregate(uploads_for(2))
    assert not all(torch.equal(a, b) for a, b in zip(before, hypernetwork_params(server)))
    assert server.last_round_stats["hn_grad_norm"] > 0


def test_pfedla_sends_each_client_the_layerwise_alpha_weighted_sum_of_the_latest_adapters():
    server, payloads = started(1)
    uploads = uploads_for(2)
    trained = trained_by_hand(payloads, uploads)
    payloads = server.aggregate(uploads)
    with torch.no_grad():
        alphas = torch.stack([net() for net in server.hypernetworks])  # [N, L, N]
    assert torch.equal(alphas, server.alphas) and alphas.shape == (N, LAYERS, N)
    assert (alphas >= 0).all() and torch.allclose(alphas.sum(-1), torch.ones(N, LAYERS))
    for i in range(N):
        for key in initial_lora():
            layer = int(key.split(".layers.")[1].split(".")[0])
            expected = sum(float(alphas[i, layer, j]) * trained[j][key] for j in range(N))
            torch.testing.assert_close(payloads[i]["lora"][key], expected, msg=f"client {i} {key}")
    stats = server.last_round_stats
    assert stats["self_weight_mean"] == pytest.approx(float(torch.diagonal(alphas, dim1=0, dim2=2).mean()))
    assert 0 < stats["self_weight_min"] <= stats["self_weight_max"] < 1


def test_pfedla_layer_whose_weights_are_all_zero_keeps_the_clients_own_layer():
    server = make_server()
    net = server.hypernetworks[2]
    with torch.no_grad():
        net.heads.bias[N : 2 * N] = -1e6  # layer 1's pre-activations all negative: relu gives zeros
    alpha = net()
    assert torch.equal(alpha[1], F.one_hot(torch.tensor(2), N).float())
    assert torch.allclose(alpha[[0, 2]].sum(-1), torch.ones(2)) and (alpha[[0, 2]] < 1).all()


def test_pfedla_latest_adapters_keep_a_left_out_clients_column_on_the_servers_device():
    """Uploads arrive on the CPU while the stored adapters live on the server's device (meta stands in for a GPU):
    a client left out of the round must not bring a device column into a stack of CPU states."""
    server, payloads = started(1)
    trained = trained_by_hand(payloads, uploads_for(2))
    on_cpu = server.latest_adapters({i: trained[i] for i in (0, 1, 3)})  # client 2 left out
    expected = server.layout.stack([trained[0], trained[1], server.layout.column(server.adapters, 2), trained[3]])
    assert all(torch.equal(a, b) for a, b in zip(on_cpu, expected))
    server.device = torch.device("meta")
    server.adapters = [a.to("meta") for a in server.adapters]
    on_device = server.latest_adapters({i: trained[i] for i in (0, 1, 3)})
    assert [a.device.type for a in on_device] == ["meta"] * len(expected)
    assert [a.shape for a in on_device] == [a.shape for a in expected]


def test_pfedla_hypernetwork_gradient_and_step_equal_autograd_on_the_written_surrogate(monkeypatch):
    """Gradient of -sum_i sum_l <sum_j alpha_ij^l theta_j^l, Delta_i^l> over every hypernetwork, then Adam."""
    server, _ = started(1)
    uploads = uploads_for(2)
    stored = [add(initial_lora(), uploads_for(1)[j]["lora"]) for j in range(N)]  # round 1 trained the initial adapter
    reference = copy.deepcopy(server.hypernetworks)
    optimizer = torch.optim.Adam(reference.parameters(), lr=server.args.pfedla_hn_lr)
    optimizer.load_state_dict(copy.deepcopy(server.optimizer.state_dict()))
    surrogate = 0.0
    for i, net in enumerate(reference):
        alpha = net()  # [L, N]
        for key in initial_lora():
            layer = int(key.split(".layers.")[1].split(".")[0])
            theta = sum(alpha[layer, j] * stored[j][key] for j in range(N))
            surrogate = surrogate - (theta * uploads[i]["lora"][key]).sum()
    surrogate.backward()
    optimizer.step()

    seen = []
    real = pfedla.update_proxy_gradient
    monkeypatch.setattr(pfedla, "update_proxy_gradient", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    server.aggregate(uploads)
    (grads,) = seen
    for (name, p), grad in zip(reference.named_parameters(), grads):
        torch.testing.assert_close(grad, p.grad, msg=name)
    for (name, p), q in zip(server.hypernetworks.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_a_small_hypernetwork_step_moves_each_clients_adapter_along_its_update():
    """<theta_i_new - theta_i_old, Delta_i> > 0, both built from the adapters that made theta_i_old."""
    server, _ = started(1, pfedla_hn_lr=1e-4)
    adapters = [a.double() for a in server.adapters]
    old = torch.cat(server.personalize(server.alphas.double(), adapters))  # [D, N], what was sent
    uploads = uploads_for(2)
    server.aggregate(uploads)
    with torch.no_grad():
        new = torch.cat(server.personalize(server.weights().double(), adapters))
    deltas = torch.cat(server.layout.stack([uploads[i]["lora"] for i in range(N)])).double()
    gains = ((new - old) * deltas).sum(0)  # [N]
    assert (gains > 0).all(), gains


def test_pfedla_payloads_carry_only_their_own_adapter():
    server, payloads = started(2)
    single = encoded_bytes({"client_id": 0, "lora": initial_lora()})
    for i, payload in payloads.items():
        assert set(payload) == {"client_id", "lora"} and payload["client_id"] == i
        assert payload["lora"].keys() == initial_lora().keys()
        check_plain(payload, f"payload {i}")
        for value in payload["lora"].values():  # no view into the [D_l, N] matrix of all clients' adapters
            assert value.untyped_storage().nbytes() == value.numel() * value.element_size()
        assert encoded_bytes(payload) <= single + 64
    for i in range(N):
        for j in range(i + 1, N):
            assert not equal(payloads[i]["lora"], payloads[j]["lora"])


def test_pfedla_refuses_bad_uploads_before_any_state_change():
    server, _ = started(2)
    before = (server.round, [a.clone() for a in server.adapters], server.alphas.clone(), hypernetwork_params(server),
              copy.deepcopy(server.optimizer.state_dict()["state"]))
    bad = uploads_for(3)
    bad[2]["lora"][next(iter(bad[2]["lora"]))][0, 0] = float("nan")
    with pytest.raises(ValueError, match="client 2 lora update"):
        server.aggregate(bad)
    wrong = uploads_for(3)
    wrong[0]["lora"].pop(next(iter(wrong[0]["lora"])))
    with pytest.raises(KeyError, match="client 0"):
        server.aggregate(wrong)
    after = (server.round, server.adapters, server.alphas, hypernetwork_params(server),
             server.optimizer.state_dict()["state"])
    assert after[0] == before[0] and torch.equal(after[2], before[2])
    assert all(torch.equal(a, b) for a, b in zip(after[1], before[1]))
    assert all(torch.equal(a, b) for a, b in zip(after[3], before[3]))
    assert all(torch.equal(after[4][k]["exp_avg"], before[4][k]["exp_avg"]) for k in before[4])


def test_pfedla_is_reproducible_from_the_seed():
    a, b = started(3)[1], started(3)[1]
    assert all(equal(a[i]["lora"], b[i]["lora"]) for i in range(N))
    other = make_server(seed=1)
    assert not torch.equal(other.hypernetworks[0].embedding, make_server().hypernetworks[0].embedding)


@pytest.mark.parametrize("method, key, value", [
    ("FedRep", "fedrep_head_epochs", 0), ("pFedLA", "pfedla_hn_lr", 0.0), ("pFedLA", "pfedla_hn_lr", -1e-3),
    ("pFedLA", "pfedla_embedding_dim", 0), ("pFedLA", "pfedla_hidden_dim", 0)])
def test_bad_algorithm_args_are_named(method, key, value):
    with pytest.raises(RecipeError, match=f"algorithm_args.{key}"):
        parse_recipe({"train_args": {"federated_optimizer": method}, "algorithm_args": {key: value}})


# ------------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", ["fedrep", "pfedla"])
@pytest.mark.slow
def test_recipe_runs_end_to_end(name, tiny_vit, tmp_path):
    fed, summary, metrics = run_shipped_recipe(name, tiny_vit, tmp_path)
    assert summary["clients"] == 20 and summary["rounds"] == 2
    assert_every_client_evaluated(metrics)
    heads = [c.state["head"] for c in fed.clients]
    loras = [c.state["lora"] for c in fed.clients]
    assert not any(equal(heads[0], h) for h in heads[1:])  # heads are local in both methods
    if name == "fedrep":
        assert all(equal(loras[0], lora) for lora in loras[1:])  # one shared (averaged) adapter
        assert all(math.isfinite(r["head_train_loss"]) for r in metrics["train"])
    else:
        assert not any(equal(loras[0], lora) for lora in loras[1:])  # a personalized adapter each
        server_rows = metrics["server"]
        assert [r["round"] for r in server_rows] == [1, 2] and server_rows[1]["hn_grad_norm"] > 0
        assert all(0 < r["self_weight_mean"] < 1 for r in server_rows)
        saved = load_file(tmp_path / "out" / pfedla.ARTIFACT)
        assert saved.keys() == fed.server.hypernetworks.state_dict().keys()
        assert all(torch.equal(saved[k], v) for k, v in fed.server.hypernetworks.state_dict().items())
