"""FedALA: the weight learning against plain autograd, W's bounds and where it stays, the start phase, and an
end-to-end run from its recipe."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_every_client_evaluated, run_shipped_recipe, small_recipe

from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.training import make_loader
from fedml_pfedseq.transport import check_plain


def perturbed(state, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {part: {k: t + scale * torch.randn(t.shape, generator=g) for k, t in state[part].items()} for part in state}


def federation(tiny_vit, tmp_path, **algorithm_args):
    recipe = small_recipe("FedALA", tiny_vit, tmp_path, train_args={"batch_size": 64},
                          algorithm_args=algorithm_args, device_args={"num_threads": 1})
    return build_federation(recipe)


def test_one_ala_step_is_the_clamped_sgd_step_on_w_and_theta_hat_the_elementwise_mix(tiny_vit, tmp_path):
    # 6 tensors from the end: the head's weight and bias and the top block's four LoRA tensors; the whole train
    # set (28 samples) as one batch, so the later-round ALA is exactly one step
    eta = 20.0
    fed = federation(tiny_vit, tmp_path, fedala_layer_idx=6, fedala_rand_percent=100, fedala_eta=eta)
    client, model = fed.clients[0], fed.model
    client.receive(fed.server.initial_payloads()[0])  # round 1: no ALA
    local = perturbed(client.state, seed=1)
    glob = perturbed(client.state, seed=2)
    client.state = local
    g = torch.Generator().manual_seed(3)
    w0 = {part: {key: torch.rand(glob[part][key].shape, generator=g) for key in keys}
          for part, keys in (("lora", [k for k in glob["lora"] if ".layers.1." in k]), ("head", ["weight", "bias"]))}
    assert sum(len(keys) for keys in w0.values()) == 6
    client.weights = {part: {k: w.clone() for k, w in ws.items()} for part, ws in w0.items()}

    # by hand: theta_hat(W0) = theta_g off the covered tensors, theta_l + (theta_g - theta_l) W0 on them
    hat0 = {part: dict(glob[part]) for part in glob}
    for part in w0:
        for k in w0[part]:
            hat0[part][k] = local[part][k] + (glob[part][k] - local[part][k]) * w0[part][k]
    model.set_lora_state(hat0["lora"])
    model.set_head_state(hat0["head"])
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = next(iter(make_loader(client.data.train, 64, shuffle=False)))
    assert len(batch["labels"]) == client.num_samples == 28
    loss = F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
    names = {("head", "weight"): "head.weight", ("head", "bias"): "head.bias"}
    for k in w0["lora"]:
        module, _, leaf = k.rpartition(".")
        names["lora", k] = f"backbone.{module}.default.{leaf}"
    grads = dict(zip(names, torch.autograd.grad(loss, [params[n] for n in names.values()])))
    w1 = {part: {k: torch.clamp(w0[part][k] - eta * grads[part, k] * (glob[part][k] - local[part][k]), 0, 1)
                 for k in w0[part]} for part in w0}
    expected = {part: dict(glob[part]) for part in glob}
    for part in w1:
        for k in w1[part]:
            expected[part][k] = local[part][k] + (glob[part][k] - local[part][k]) * w1[part][k]

    client.receive({"client_id": 0, **glob})  # round 2: one ALA step
    assert client.last_ala_epochs == 1
    for part in w1:
        for k in w1[part]:
            torch.testing.assert_close(client.weights[part][k], w1[part][k], rtol=1e-5, atol=1e-6)
    for part in expected:
        for k in expected[part]:
            torch.testing.assert_close(client.state[part][k], expected[part][k], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(client.state["lora"][k], glob["lora"][k]) for k in glob["lora"] if ".layers.0." in k)
    flat = torch.cat([w.reshape(-1) for ws in w1.values() for w in ws.values()])
    assert (flat == 0).any() and (flat == 1).any() and ((flat > 0) & (flat < 1)).any()  # the clamp acts
    # what the client evaluates before training is theta_hat
    model.set_lora_state(expected["lora"])
    model.set_head_state(expected["head"])
    with torch.no_grad():
        ce = F.cross_entropy(model(batch["pixel_values"]), batch["labels"]).item()
    assert client.evaluate(("train",))["train_loss"] == pytest.approx(ce, rel=1e-5)


def train_two(fed, t):
    """Clients 0 and 1 train round t; returns the server's next payloads (their average: != either local model)."""
    return fed.server.aggregate({i: fed.clients[i].train(t) for i in (0, 1)})


def test_w_is_learned_in_0_1_kept_on_the_client_and_the_start_phase_runs_until_the_losses_settle(tiny_vit, tmp_path):
    fed = federation(tiny_vit, tmp_path, fedala_threshold=1e9, fedala_num_pre_loss=3)
    client = fed.clients[0]
    payloads = fed.server.initial_payloads()
    for i in (0, 1):
        fed.clients[i].receive(payloads[i])
    assert client.weights is None and client.last_ala_epochs == 0
    client.receive(train_two(fed, 1)[0])  # start phase: stops after num_pre_loss + 1 epochs
    assert client.last_ala_epochs == 4
    weights = torch.cat([w.reshape(-1) for w in client.weights["head"].values()])
    assert client.weights.keys() == {"head"} and (weights >= 0).all() and (weights <= 1).all()
    assert (weights < 1).any()  # learned away from its initial 1
    assert all(torch.equal(client.state["lora"][k], client.received["lora"][k]) for k in client.state["lora"])
    assert not torch.equal(client.state["head"]["weight"], client.received["head"]["weight"])
    kept = {k: w.clone() for k, w in client.weights["head"].items()}
    fed.clients[1].receive(fed.server.sent[1])
    upload = client.train(2)
    assert set(upload) == {"client_id", "num_samples", "lora", "head"} and upload["client_id"] == 0
    check_plain(upload, "upload")
    stored = [w.data_ptr() for w in client.weights["head"].values()]
    assert not any(t.data_ptr() in stored for part in ("lora", "head") for t in upload[part].values())
    assert client.last_train_stats["ala_epochs"] == 4
    payload = fed.server.aggregate({0: upload, 1: fed.clients[1].train(2)})[0]
    client.receive(payload)  # later rounds: one epoch, from the W kept
    assert client.last_ala_epochs == 1
    assert not all(torch.equal(kept[k], client.weights["head"][k]) for k in kept)
    assert all(((w >= 0) & (w <= 1)).all() for w in client.weights["head"].values())

    # threshold 0 never settles: the start phase stops at its bound
    fed = federation(tiny_vit, tmp_path, fedala_threshold=0.0, fedala_max_start_epochs=5)
    payloads = fed.server.initial_payloads()
    for i in (0, 1):
        fed.clients[i].receive(payloads[i])
    fed.clients[0].receive(train_two(fed, 1)[0])
    assert fed.clients[0].last_ala_epochs == 5


@pytest.mark.slow
def test_recipe_runs_end_to_end(tiny_vit, tmp_path):
    fed, summary, metrics = run_shipped_recipe("fedala", tiny_vit, tmp_path)
    assert summary["clients"] == 20 and summary["rounds"] == 2
    assert_every_client_evaluated(metrics)
    assert [r["ala_epochs"] for r in metrics["train"] if r["round"] == 1] == [0] * 20
    assert all(r["ala_epochs"] >= 11 for r in metrics["train"] if r["round"] == 2)  # start phase: > num_pre_loss
    heads = [c.state["head"]["weight"] for c in fed.clients]  # theta_hat after the last ALA: evaluated at round 2
    assert not any(torch.equal(heads[0], h) for h in heads[1:])
    assert all(torch.equal(c.state["lora"][k], fed.server.global_state["lora"][k])
               for c in fed.clients for k in c.state["lora"])  # layer_idx 2: the adapter is the global one


@pytest.mark.parametrize("key, value", [
    ("fedala_eta", 0.0), ("fedala_rand_percent", 0), ("fedala_rand_percent", 101), ("fedala_layer_idx", 0),
    ("fedala_threshold", -0.1), ("fedala_num_pre_loss", 0), ("fedala_max_start_epochs", 0)])
def test_bad_algorithm_args_are_named(key, value):
    with pytest.raises(RecipeError, match=f"algorithm_args.{key}"):
        parse_recipe({"train_args": {"federated_optimizer": "FedALA"}, "algorithm_args": {key: value}})


def test_layer_idx_beyond_the_models_trainable_tensors_is_named(tiny_vit, tmp_path):
    with pytest.raises(RecipeError, match="algorithm_args.fedala_layer_idx"):
        federation(tiny_vit, tmp_path, fedala_layer_idx=11)  # 2 layers x 4 LoRA tensors + 2 head tensors = 10
