"""Per-FedAvg (FO): the meta-gradient step and the evaluation's adaptation step against independent autograd, and
an end-to-end run from its recipe."""
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
)
from torch.func import functional_call

from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.data.federated import client_seed
from fedml_pfedseq.lora_state import add
from fedml_pfedseq.training import make_loader

ALPHA, BETA = 0.3, 0.2


def two_batch_client(tiny_vit, tmp_path):
    """Client 0 after receiving the initial global model, with 28 training samples in batches of 14: one round is
    exactly one pair-step (D, D')."""
    recipe = small_recipe("PerFedAvg", tiny_vit, tmp_path, train_args={"batch_size": 14, "learning_rate": BETA},
                          algorithm_args={"perfedavg_alpha": ALPHA}, device_args={"num_threads": 1})
    return first_client_with_global_model(recipe)


def theta_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def ce(model, params, batch):
    """Cross-entropy of the model with its trainable parameters replaced by ``params`` (a functional call)."""
    return F.cross_entropy(functional_call(model, params, (batch["pixel_values"],)), batch["labels"])


def grad(model, params, batch):
    leaves = {n: t.clone().requires_grad_(True) for n, t in params.items()}
    return dict(zip(leaves, torch.autograd.grad(ce(model, leaves, batch), list(leaves.values()))))


def step(params, grads, lr):
    return {n: params[n] - lr * grads[n] for n in params}


def close(a, b) -> bool:
    return all(torch.allclose(a[part][k], b[part][k], rtol=1e-5, atol=1e-6) for part in a for k in a[part])


def test_local_step_is_the_first_order_meta_gradient_step_on_two_batches(tiny_vit, tmp_path):
    fed, client, received = two_batch_client(tiny_vit, tmp_path)
    model = fed.model
    d, d_prime = list(client.round_loader(1))
    model.set_lora_state(received["lora"])
    model.set_head_state(received["head"])
    theta = theta_of(model)
    temp = step(theta, grad(model, theta, d), ALPHA)
    expected = as_state(model, step(theta, grad(model, temp, d_prime), BETA))
    after_d = step(theta, grad(model, theta, d), BETA)
    plain_sgd = as_state(model, step(after_d, grad(model, after_d, d_prime), BETA))
    at_theta = as_state(model, step(theta, grad(model, theta, d_prime), BETA))

    upload = client.train(1)
    assert close(client.state, expected)
    assert not close(client.state, plain_sgd)  # not FedAvg's two SGD steps
    assert not close(client.state, at_theta)  # the D' gradient is taken at the adapted point, not at theta
    # the upload is the meta-model's delta w.r.t. what was received (FedAvg's format)
    assert set(upload) == {"client_id", "num_samples", "lora", "head"}
    assert close({part: add(received[part], upload[part]) for part in ("lora", "head")}, expected)
    assert math.isfinite(client.last_train_stats["adapted_train_loss"])


def test_evaluation_takes_one_alpha_step_on_the_seeded_batch_and_keeps_the_meta_model(tiny_vit, tmp_path):
    fed, client, received = two_batch_client(tiny_vit, tmp_path)
    model = fed.model
    seed = client_seed(0, 0, purpose=6000)  # first payload received -> round 0
    batch = next(iter(make_loader(client.data.train, 14, shuffle=True, seed=seed)))
    val = next(iter(make_loader(client.data.validation, 256, shuffle=False)))
    model.set_lora_state(received["lora"])
    model.set_head_state(received["head"])
    theta = theta_of(model)
    adapted = step(theta, grad(model, theta, batch), ALPHA)
    with torch.no_grad():
        adapted_loss = ce(model, adapted, val).item()
        meta_loss = ce(model, theta, val).item()

    first = client.evaluate(("validation",))
    assert first["validation_loss"] == pytest.approx(adapted_loss, rel=1e-5)
    assert first["validation_loss"] != pytest.approx(meta_loss, rel=1e-3)  # the adaptation step matters
    assert close(client.state, received)  # the meta-model is untouched
    assert client.evaluate(("validation",)) == first  # deterministic
    client.receive({"client_id": 0, **received})  # the next round draws another adaptation batch
    assert client.evaluate(("validation",))["validation_loss"] != pytest.approx(adapted_loss, rel=1e-6)


@pytest.mark.slow
def test_recipe_runs_end_to_end_reproducibly(tiny_vit, tmp_path):
    _, _, metrics = run_shipped_recipe("perfedavg", tiny_vit, tmp_path, "a")
    assert_every_client_evaluated(metrics)
    assert len(metrics["train"]) == 40 and all(math.isfinite(r["adapted_train_loss"]) for r in metrics["train"])
    assert run_shipped_recipe("perfedavg", tiny_vit, tmp_path, "b")[2]["eval"] == metrics["eval"]  # same seed


@pytest.mark.parametrize("args, key", [
    ({"perfedavg_alpha": 0.0}, "perfedavg_alpha must be a finite number > 0"),
    ({"perfedavg_alpha": float("nan")}, "perfedavg_alpha must be a finite number > 0"),
    ({"perfedavg_beta": 0.1}, "unknown key 'perfedavg_beta'"),
])
def test_bad_algorithm_args_are_refused_naming_the_key(args, key):
    with pytest.raises(RecipeError, match=key):
        parse_recipe({"train_args": {"federated_optimizer": "PerFedAvg"}, "algorithm_args": args})
