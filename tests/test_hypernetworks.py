"""pFedHN and PeFLL: proxy gradients against plain backward on direct formulations, PeFLL's descriptor path through
real clients, per-client payloads, refused uploads and arguments, and a short run of each recipe."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import small_recipe, synthetic_lora
from safetensors import safe_open
from transformers import ViTForImageClassification

from fedml_pfedseq.config import RecipeError, load_recipe, parse_recipe
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.simulation import run_recipe
from fedml_pfedseq.strategies import method_class
from fedml_pfedseq.transport import check_plain

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
N, RANK, HIDDEN, LABELS, EMBED = 4, 2, 3, 5, 3  # per layer 4 * RANK * HIDDEN = 24 LoRA values, D = 48


def initial_state() -> dict:
    lora = synthetic_lora(RANK, HIDDEN)
    return {"lora": lora, "head": {"weight": torch.zeros(LABELS, HIDDEN), "bias": torch.zeros(LABELS)}}


def make_server(method: str, **algorithm_args):
    args = {"hn_embedding_dim": EMBED, "hn_hidden_dim": 8, "hn_num_hidden": 2, **algorithm_args}
    recipe = parse_recipe({"train_args": {"federated_optimizer": method}, "algorithm_args": args,
                           "device_args": {"using_gpu": False}})
    server = method_class(method).Server(N, initial_state(), recipe)
    server.initial_payloads()
    return server


def uploads_for(server, round_idx: int) -> dict[int, dict]:
    """Client i's LoRA update (a client-specific direction plus noise); for PeFLL also a descriptor and, where the
    server asked for it, an embedding-network gradient."""
    g = torch.Generator().manual_seed(100 + round_idx)
    out = {}
    for i in range(N):
        delta = {k: 1e-3 * (torch.full_like(v, float(i + 1)) + torch.randn(v.shape, generator=g))
                 for k, v in initial_state()["lora"].items()}
        out[i] = {"client_id": i, "num_samples": 10 * (i + 1), "lora": delta}
        if hasattr(server, "descriptors"):
            out[i]["descriptor"] = torch.randn(EMBED, generator=g)
            if i in server.descriptor_updates:
                out[i]["embedding_grad"] = {k: torch.randn(p.shape, generator=g)
                                            for k, p in server.embedding_net.named_parameters()}
    return out


def run_rounds(server, rounds: int) -> list[dict]:
    return [server.aggregate(uploads_for(server, t)) for t in range(1, rounds + 1)]


def layer_keys(state: dict) -> list[list[str]]:
    """LoRA keys grouped by backbone layer, each group sorted: the order the adapter is generated in."""
    layers = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in state})
    return [sorted(k for k in state if f".layers.{layer}." in k) for layer in layers]


def apply_mlp(weights: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    for j, (w, b) in enumerate(weights):
        x = x @ w.T + b
        if j < len(weights) - 1:
            x = torch.relu(x)
    return x


def direct_adapters(hypernetwork, inputs: torch.Tensor) -> list[dict]:
    """theta_i = theta^0 + [W_l f(x_i) + b_l]_l with f the trunk, written out from the parameters; a state per row."""
    trunk = [(m.weight, m.bias) for m in hypernetwork.trunk if isinstance(m, torch.nn.Linear)]
    features = apply_mlp(trunk, inputs)  # [N, hidden]
    base = initial_state()["lora"]
    adapters = [dict() for _ in range(len(inputs))]
    for keys, head in zip(layer_keys(base), hypernetwork.heads):
        out = features @ head.weight.T + head.bias  # [N, D_l]
        offset = 0
        for key in keys:
            size = base[key].numel()
            for i, adapter in enumerate(adapters):
                adapter[key] = base[key] + out[i, offset:offset + size].reshape(base[key].shape)
            offset += size
    return adapters


def inner(a: dict, b: dict) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """Close relative to the gradient's own size: gradients here are ~1e-5, under assert_close's default atol."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=msg)


def lora_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_first_adapters_are_the_peft_init_for_every_client():
    for method in ("pFedHN", "PeFLL"):
        server = make_server(method)
        assert all(lora_equal(server.sent[i]["lora"], initial_state()["lora"]) for i in range(N)), method


def test_pfedhn_proxy_gradient_equals_backward_on_the_direct_surrogate():
    """d/d(phi, v) of sum_i <theta_i(phi, v_i), -Delta_i>, by plain backward on the adapters written out."""
    server = make_server("pFedHN")
    run_rounds(server, 2)  # heads and trunk have moved, so every gradient is non-zero
    reference = copy.deepcopy(server.networks)
    adapters = direct_adapters(reference["hypernetwork"], reference["client_embeddings"].weight)
    for i in range(N):  # the written-out adapters are what the server sent
        torch.testing.assert_close({k: v.detach() for k, v in adapters[i].items()}, server.sent[i]["lora"])
    uploads = uploads_for(server, 3)
    surrogate = sum(inner(adapters[i], uploads[i]["lora"]) for i in range(N)) * -1
    surrogate.backward()
    updates = torch.stack([server.hypernetwork.flatten(uploads[i]["lora"]) for i in range(N)])
    hypernetwork_grads, input_grad = server.proxy_gradients(updates)
    for (name, p), grad in zip(reference["hypernetwork"].named_parameters(), hypernetwork_grads):
        assert p.grad.abs().sum() > 0, name
        assert_grad_close(grad, p.grad, name)
    assert_grad_close(input_grad, reference["client_embeddings"].weight.grad, "embeddings")
    assert (input_grad.norm(dim=1) > 0).all()


def test_pfedhn_small_step_moves_adapters_along_the_updates():
    """After one Adam step with a small lr, sum_i <theta_i^new - theta_i^old, Delta_i> > 0."""
    server = make_server("pFedHN", hn_lr=1e-5)
    run_rounds(server, 2)
    old = {i: server.sent[i]["lora"] for i in range(N)}
    embeddings = server.networks["client_embeddings"].weight.detach().clone()
    uploads = uploads_for(server, 3)
    new = server.aggregate(uploads)
    gain = sum(float(inner({k: new[i]["lora"][k] - old[i][k] for k in old[i]}, uploads[i]["lora"])) for i in range(N))
    assert gain > 0
    assert not torch.equal(server.networks["client_embeddings"].weight, embeddings)
    stats = server.last_round_stats
    assert stats["round"] == 3 and 0 < stats["step_update_ratio"] and stats["adapter_spread_mean"] > 0


@pytest.mark.parametrize("method", ["pFedHN", "PeFLL"])
def test_each_payload_holds_only_its_own_adapter_and_adapters_differ(method):
    server = make_server(method)
    payloads = run_rounds(server, 3)[-1]
    theta = server.hypernetwork(server._inputs()).detach()  # [N, D]
    expected_keys = {"client_id", "lora"} | ({"embedding_net", "descriptor_update"} if method == "PeFLL" else set())
    for i, payload in payloads.items():
        check_plain(payload, f"payload {i}")
        assert set(payload) == expected_keys and payload["client_id"] == i
        for j in range(N):  # client i's adapter is h(x_i), nobody else's
            assert torch.equal(server.hypernetwork.flatten(payload["lora"]), theta[j]) == (i == j)
        for v in payload["lora"].values():  # a tensor of its own, so pickling it sends no other client's values
            assert v.untyped_storage().nbytes() == v.numel() * v.element_size()
    if method == "PeFLL":
        assert all(payloads[i]["descriptor_update"]["round"] == 2 for i in range(N))  # computed in round 2
        updates = torch.stack([payloads[i]["descriptor_update"]["update"] for i in range(N)])
        assert updates.shape == (N, EMBED) and len({tuple(u.tolist()) for u in updates}) == N


@pytest.mark.parametrize("method", ["pFedHN", "PeFLL"])
def test_bad_uploads_are_refused_before_any_state_changes(method):
    server = make_server(method)
    run_rounds(server, 2)
    before = (server.round, copy.deepcopy(server.networks.state_dict()), server.generated.clone())
    bad = uploads_for(server, 3)
    bad[2]["lora"][next(iter(bad[2]["lora"]))][0, 0] = float("nan")
    with pytest.raises(ValueError, match="client 2 lora update"):
        server.aggregate(bad)
    if method == "PeFLL":
        bad = uploads_for(server, 3)
        bad[0]["descriptor"][1] = float("inf")
        with pytest.raises(ValueError, match="client 0 descriptor"):
            server.aggregate(bad)
        bad = uploads_for(server, 3)
        del bad[3]["embedding_grad"]
        with pytest.raises(KeyError, match="client 3: upload lacks the embedding-network gradient for its round-1"):
            server.aggregate(bad)
    assert server.round == before[0] and torch.equal(server.generated, before[2])
    assert all(torch.equal(v, before[1][k]) for k, v in server.networks.state_dict().items())


def test_pefll_keeps_an_absent_clients_descriptor_and_pending_update_until_it_reports():
    server = make_server("PeFLL")
    run_rounds(server, 2)  # every client has a round-2 descriptor and a pending update for its round-1 one
    kept_descriptor, kept_update = server.descriptors[1].clone(), server.descriptor_updates[1]
    uploads = uploads_for(server, 3)
    del uploads[1]  # round 3 without client 1
    names = [name for name, _ in server.embedding_net.named_parameters()]
    expected = {n: sum(uploads[i]["embedding_grad"][n] for i in (0, 2, 3)) for n in names}
    seen, step = {}, server.optimizer.step
    server.optimizer.step = lambda: (seen.update({n: p.grad.clone() for n, p in
                                                  server.embedding_net.named_parameters()}), step())
    server.aggregate(uploads)
    assert all(torch.allclose(seen[n], expected[n]) for n in names)  # psi: the reporting clients' gradients only
    assert torch.equal(server.descriptors[1], kept_descriptor) and server.descriptor_rounds[1] == 2
    assert server.descriptor_updates[1] is kept_update and kept_update["round"] == 1
    for i in (0, 2, 3):  # the descriptor their round-3 adapter came from (round 2) gets the update; round 3's is new
        assert server.descriptor_updates[i]["round"] == 2 and server.descriptor_rounds[i] == 3
        assert torch.equal(server.descriptors[i], uploads[i]["descriptor"])
    back = uploads_for(server, 4)  # client 1 reports again, answering its round-1 update
    assert "embedding_grad" in back[1]
    server.aggregate(back)
    assert server.descriptor_updates[1]["round"] == 2 and server.descriptor_rounds[1] == 4


def test_servers_are_reproducible_from_the_seed():
    for method in ("pFedHN", "PeFLL"):
        a, b = make_server(method), make_server(method)
        run_rounds(a, 3), run_rounds(b, 3)
        assert torch.equal(a.generated, b.generated), method


def test_pefll_descriptor_path_matches_the_direct_composition(tiny_vit, tmp_path):
    """Real clients on the tiny ViT, four rounds. Client 0's descriptor of round r (1, 2) is the mean embedding of
    its own samples under psi^r, computed here from a plain ViT; the descriptor update the server sends in round
    r + 2 and the psi gradient the client returns then equal autograd on <h_phi^{r+1}(mean psi^r(x, y)), -Delta^{r+1}>,
    at psi^r although the client holds psi^{r+2} by then (it differs from psi^2: psi stepped in round 3)."""
    recipe = small_recipe("PeFLL", tiny_vit, tmp_path, data_args={"samples_per_client": 20},
                          algorithm_args={"hn_hidden_dim": 16}, device_args={"num_threads": 1})
    fed = build_federation(recipe)
    payloads, sent, uploads, networks = fed.server.initial_payloads(), [], [], []
    for t in (1, 2, 3, 4):
        networks.append(copy.deepcopy(fed.server.networks))  # what generated this round's adapters
        sent.append(payloads)
        round_uploads = {}
        for i, client in enumerate(fed.clients):
            client.receive(payloads[i])
            round_uploads[i] = client.train(t)
            check_plain(round_uploads[i], f"upload {i}")
        uploads.append(round_uploads)
        payloads = fed.server.aggregate(round_uploads)
    assert "embedding_grad" not in uploads[1][0] and "descriptor_update" not in sent[1][0]
    assert not torch.equal(sent[3][0]["embedding_net"]["0.weight"], sent[1][0]["embedding_net"]["0.weight"])

    data = fed.data.clients[0].train
    pixels = torch.stack([data[j]["pixel_values"] for j in range(len(data))])
    labels = torch.tensor([data[j]["labels"] for j in range(len(data))])
    vit = ViTForImageClassification.from_pretrained(tiny_vit).eval()
    with torch.no_grad():
        features = vit.vit(pixel_values=pixels).last_hidden_state[:, 0]  # frozen [CLS], no LoRA
    x = torch.cat([features, F.one_hot(labels, fed.data.num_labels).float()], dim=1)
    for r in (1, 2):
        psi = {k: v.clone().requires_grad_() for k, v in sent[r - 1][0]["embedding_net"].items()}
        layers = sorted({int(k.split(".")[0]) for k in psi})
        descriptor = apply_mlp([(psi[f"{j}.weight"], psi[f"{j}.bias"]) for j in layers], x).mean(0)
        torch.testing.assert_close(uploads[r - 1][0]["descriptor"], descriptor.detach())

        d = descriptor.detach().requires_grad_()
        theta = networks[r]["hypernetwork"](d[None])[0]  # the adapter client 0 trained in round r + 1
        torch.testing.assert_close(theta.detach(), fed.server.hypernetwork.flatten(sent[r][0]["lora"]))
        delta = fed.server.hypernetwork.flatten(uploads[r][0]["lora"])
        (-(theta * delta).sum()).backward()
        message = sent[r + 1][0]["descriptor_update"]
        assert message["round"] == r
        assert_grad_close(message["update"], -d.grad, f"round {r}")  # the descriptor's descent direction, -dL/dd

        descriptor.backward(d.grad)  # chain through the mean and psi^r
        grads = uploads[r + 1][0]["embedding_grad"]
        assert grads.keys() == psi.keys()
        for k, p in psi.items():
            assert_grad_close(grads[k], p.grad, f"round {r} {k}")
        assert sum(float(g.abs().sum()) for g in grads.values()) > 0


@pytest.mark.parametrize("name, method, inputs", [("pfedhn", "pFedHN", "client_embeddings.weight"),
                                                  ("pefll", "PeFLL", "embedding_net.0.weight")])
@pytest.mark.slow
def test_recipe_runs_end_to_end(tiny_vit, tmp_path, name, method, inputs):
    recipe = load_recipe(RECIPES / f"omniglot_{name}.yaml",
                         [f"model_args.model={tiny_vit}", "data_args.samples_per_client=40", "train_args.comm_round=2",
                          f"common_args.output_dir={tmp_path}", "device_args.num_threads=1"])
    assert recipe.train_args.federated_optimizer == method
    summary = run_recipe(recipe, tmp_path / "out", progress=False)
    assert summary["clients"] == 20 and summary["rounds"] == 2
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for t in (0, 1, 2):
        rows = [r for r in metrics["eval"] if r["round"] == t]
        assert sorted(r["client"] for r in rows) == list(range(20)), t
        assert all(math.isfinite(r["test_accuracy"]) and math.isfinite(r["test_loss"]) for r in rows)
    assert [r["round"] for r in metrics["server"]] == [1, 2]
    assert all(math.isfinite(v) for r in metrics["server"] for k, v in r.items() if k != "left_out")
    assert all(r["left_out"] == "" and r["aggregated"] == 20 for r in metrics["server"])
    assert metrics["server"][-1]["adapter_spread_mean"] > 0  # the adapters are personalized
    with safe_open(tmp_path / "out" / "hypernetwork.safetensors", "pt") as saved:
        assert inputs in saved.keys() and "hypernetwork.base" in saved.keys()
        assert json.loads(saved.metadata()["algorithm_args"]) == json.loads(json.dumps(
            recipe.to_dict()["algorithm_args"]))


@pytest.mark.parametrize("method, key, value", [
    ("pFedHN", "hn_embedding_dim", 0), ("pFedHN", "hn_hidden_dim", 0), ("pFedHN", "hn_num_hidden", -1),
    ("pFedHN", "hn_lr", 0.0), ("PeFLL", "hn_lr", -1.0), ("PeFLL", "pefll_embed_hidden_dim", 0),
    ("PeFLL", "pefll_embed_layers", 0)])
def test_bad_algorithm_args_are_named(method, key, value):
    with pytest.raises(RecipeError, match=f"algorithm_args.{key}"):
        make_server(method, **{key: value})
