"""pFedMe: the inner Moreau-envelope solution, the local update and the server's beta-mix against hand computations,
the argument checks, and an end-to-end run from its recipe."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    as_state,
    assert_every_client_evaluated,
    first_client_with_global_model,
    run_shipped_recipe,
    small_recipe,
    synthetic_lora,
)
from torch.func import functional_call

from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.lora_state import add
from fedml_pfedseq.strategies import method_class
from fedml_pfedseq.training import make_loader

ETA, LAMBDA, PERSONAL_LR, K = 0.2, 1.5, 0.3, 3


def client_with(tiny_vit, tmp_path, batch_size, lam=LAMBDA):
    """Client 0 (28 training samples) after receiving the initial global model w."""
    recipe = small_recipe("pFedMe", tiny_vit, tmp_path, train_args={"batch_size": batch_size, "learning_rate": ETA},
                          algorithm_args={"pfedme_lambda": lam, "pfedme_k": K, "pfedme_personal_lr": PERSONAL_LR},
                          device_args={"num_threads": 1})
    return first_client_with_global_model(recipe)


def params_of(model, state):
    """The model's trainable parameters by name with ``state`` (LoRA, head) loaded."""
    model.set_lora_state(state["lora"])
    model.set_head_state(state["head"])
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def inner_by_hand(model, theta, w, batch, lam, steps=K, lr=PERSONAL_LR):
    """``steps`` gradient-descent steps on CE(theta; batch) + lambda/2 ||theta - w||^2, the gradient of the whole
    objective taken by autograd on a functional call."""
    for _ in range(steps):
        leaves = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        logits = functional_call(model, leaves, (batch["pixel_values"],))
        objective = F.cross_entropy(logits, batch["labels"]) + lam / 2 * sum(
            ((leaves[n] - w[n]) ** 2).sum() for n in leaves)
        grads = torch.autograd.grad(objective, list(leaves.values()))
        theta = {n: t - lr * g for (n, t), g in zip(theta.items(), grads)}
    return theta


def close(a, b) -> bool:
    return all(torch.allclose(a[part][k], b[part][k], rtol=1e-5, atol=1e-6) for part in a for k in a[part])


def test_inner_solution_is_k_gradient_steps_on_ce_plus_lambda_half_distance_squared(tiny_vit, tmp_path):
    fed, client, w = client_with(tiny_vit, tmp_path, batch_size=64)  # one batch: one local step
    model = fed.model
    batch = next(iter(make_loader(client.data.train, 64, shuffle=False)))  # the round's batch, in another order
    assert len(batch["labels"]) == 28
    w_params = params_of(model, w)
    expected = inner_by_hand(model, dict(w_params), w_params, batch, LAMBDA)
    other_lambda = inner_by_hand(model, dict(w_params), w_params, batch, 2 * LAMBDA)
    fewer_steps = inner_by_hand(model, dict(w_params), w_params, batch, LAMBDA, steps=K - 1)
    expected, other_lambda, fewer_steps = (as_state(model, p) for p in (expected, other_lambda, fewer_steps))

    client.train(1)
    assert close(client.personal, expected)
    assert not close(client.personal, other_lambda)  # lambda enters the inner problem
    assert not close(client.personal, fewer_steps)  # all K steps are taken
    # the evaluated model is theta_i
    model.set_lora_state(expected["lora"])
    model.set_head_state(expected["head"])
    with torch.no_grad():
        loss = F.cross_entropy(model(batch["pixel_values"]), batch["labels"]).item()
    assert client.evaluate(("train",))["train_loss"] == pytest.approx(loss, rel=1e-5)


def test_local_update_moves_w_by_eta_lambda_towards_theta_and_the_next_inner_problem_starts_from_theta(
        tiny_vit, tmp_path):
    fed, client, w = client_with(tiny_vit, tmp_path, batch_size=14)  # two batches: two local steps
    model = fed.model
    d1, d2 = list(client.round_loader(1))
    w0 = params_of(model, w)
    theta1 = inner_by_hand(model, dict(w0), w0, d1, LAMBDA)
    w1 = {n: w0[n] - ETA * LAMBDA * (w0[n] - theta1[n]) for n in w0}
    theta2 = inner_by_hand(model, theta1, w1, d2, LAMBDA)  # warm start from theta1, anchored at w1
    w2 = {n: w1[n] - ETA * LAMBDA * (w1[n] - theta2[n]) for n in w1}
    from_w = inner_by_hand(model, w1, w1, d2, LAMBDA)  # a cold start from w1 instead
    expected_w, expected_theta, cold_theta = (as_state(model, p) for p in (w2, theta2, from_w))

    upload = client.train(1)
    assert close(client.state, expected_w)
    assert close(client.personal, expected_theta)
    assert not close(client.personal, cold_theta)
    assert not close(client.state, client.personal)  # w_i is not theta_i (eta * lambda = 0.3 < 1)
    # the upload is w_i's delta w.r.t. the w received (FedAvg's format); theta_i never travels
    assert set(upload) == {"client_id", "num_samples", "lora", "head"} and upload["num_samples"] == 28
    assert close({part: add(w[part], upload[part]) for part in ("lora", "head")}, expected_w)
    assert math.isfinite(client.last_train_stats["train_loss"])
    assert math.isfinite(client.last_train_stats["inner_train_loss"])


def test_one_local_step_sets_w_to_w_minus_eta_lambda_times_w_minus_theta(tiny_vit, tmp_path):
    _, client, w = client_with(tiny_vit, tmp_path, batch_size=64)  # one batch: one local step
    client.train(1)
    theta = client.personal
    expected = {part: {k: w[part][k] - ETA * LAMBDA * (w[part][k] - theta[part][k]) for k in w[part]}
                for part in ("lora", "head")}
    assert close(client.state, expected)
    assert not close(client.state, theta) and not close(client.state, w)


def make_server(beta: float):
    recipe = parse_recipe({"train_args": {"federated_optimizer": "pFedMe", "learning_rate": 0.5},
                           "algorithm_args": {"pfedme_beta": beta}, "device_args": {"using_gpu": False}})
    head = {"weight": torch.randn(5, 3, generator=torch.Generator().manual_seed(2)), "bias": torch.zeros(5)}
    return method_class("pFedMe").Server(3, {"lora": synthetic_lora(2, 3), "head": head}, recipe)


def synthetic_uploads(server):
    g = torch.Generator().manual_seed(7)
    return {i: {"client_id": i, "num_samples": 10 * (i + 1),
                **{part: {k: torch.randn(v.shape, generator=g) for k, v in server.global_state[part].items()}
                   for part in ("lora", "head")}}
            for i in range(3)}


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_server_mixes_the_previous_global_and_the_sample_weighted_average_by_beta(beta):
    server = make_server(beta)
    server.initial_payloads()
    previous = {part: dict(state) for part, state in server.global_state.items()}
    uploads = synthetic_uploads(server)
    payloads = server.aggregate(uploads)
    for part in ("lora", "head"):
        for key, prev in previous[part].items():
            # client i's local model is previous + its delta; weights n_i = 10, 20, 30
            average = sum(n * (prev + uploads[i][part][key]) for i, n in zip(range(3), (10, 20, 30))) / 60
            expected = (1 - beta) * prev + beta * average
            torch.testing.assert_close(server.global_state[part][key], expected)
            assert all(torch.equal(payloads[i][part][key], server.global_state[part][key]) for i in range(3))
            if beta != 1:
                assert not torch.allclose(expected, average)  # beta matters
    # beta = 1 is FedAvg's average exactly
    fedavg = make_server(1.0)
    fedavg.initial_payloads()
    fedavg.aggregate(synthetic_uploads(fedavg))
    key = next(iter(previous["lora"]))
    avg = sum(n * (previous["lora"][key] + synthetic_uploads(fedavg)[i]["lora"][key])
              for i, n in zip(range(3), (10, 20, 30))) / 60
    torch.testing.assert_close(fedavg.global_state["lora"][key], avg)


@pytest.mark.parametrize("args, key", [
    ({"pfedme_lambda": 0.0}, "pfedme_lambda must be a finite number > 0"),
    ({"pfedme_lambda": float("inf")}, "pfedme_lambda must be a finite number > 0"),
    ({"pfedme_k": 0}, "pfedme_k must be an integer >= 1"),
    ({"pfedme_personal_lr": -0.1}, "pfedme_personal_lr must be a finite number > 0"),
    ({"pfedme_beta": 0.0}, "pfedme_beta must be a finite number > 0"),
    ({"pfedme_beta": float("nan")}, "pfedme_beta must be a finite number > 0"),
    ({"pfedme_personal_lr": 0.5, "pfedme_lambda": 4.0}, r"pfedme_personal_lr \* pfedme_lambda must be < 2"),
    ({"pfedme_eta": 0.1}, "unknown key 'pfedme_eta'"),
    ({"pfedme_k": 2.5}, "expected int"),
])
def test_bad_algorithm_args_are_refused_naming_the_key(args, key):
    with pytest.raises(RecipeError, match=key):
        parse_recipe({"train_args": {"federated_optimizer": "pFedMe"}, "algorithm_args": args})


@pytest.mark.parametrize("train_args, algorithm_args, key", [
    ({"learning_rate": 0.5}, {"pfedme_lambda": 2.0}, r"train_args.learning_rate \* algorithm_args.pfedme_lambda"),
    ({"learning_rate": 0.5, "momentum": 0.9}, {}, "train_args.momentum must be 0"),
    ({"learning_rate": 0.5, "weight_decay": 1e-4}, {}, "train_args.weight_decay must be 0"),
])
def test_recipes_where_the_local_update_overshoots_or_steps_are_not_plain_are_refused(train_args, algorithm_args,
                                                                                        key):
    with pytest.raises(RecipeError, match=key):
        parse_recipe({"train_args": {"federated_optimizer": "pFedMe", **train_args},
                      "algorithm_args": algorithm_args, "device_args": {"using_gpu": False}})


def flat(state):
    return torch.cat([state[part][k].reshape(-1) for part in ("lora", "head") for k in sorted(state[part])])


@pytest.mark.slow
def test_recipe_runs_end_to_end_evaluating_personalized_models_that_differ_from_the_uploaded_ones(
        tiny_vit, tmp_path):
    fed, _, metrics = run_shipped_recipe("pfedme", tiny_vit, tmp_path, "a")
    assert_every_client_evaluated(metrics)
    assert len(metrics["train"]) == 40 and all(math.isfinite(r["inner_train_loss"]) for r in metrics["train"])
    for client in fed.clients:
        # theta_i (evaluated) is not w_i (uploaded) nor the global model (received last)
        assert not torch.allclose(flat(client.personal), flat(client.state))
        assert not torch.allclose(flat(client.personal), flat(client.received))
    thetas = torch.stack([flat(c.personal) for c in fed.clients])
    assert torch.cdist(thetas, thetas).fill_diagonal_(1.0).min() > 0  # personalized per client
    assert run_shipped_recipe("pfedme", tiny_vit, tmp_path, "b")[2]["eval"] == metrics["eval"]  # same seed
