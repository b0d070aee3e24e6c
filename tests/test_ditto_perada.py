"""Ditto and PerAda: the personal update rule against hand computations, and end-to-end runs from their recipes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_every_client_evaluated, run_shipped_recipe, small_recipe

from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.lora_state import add
from fedml_pfedseq.strategies.perada import distillation_loss
from fedml_pfedseq.training import make_loader

LR = 0.05


def put(model, state):
    model.set_lora_state(state["lora"])
    model.set_head_state(state["head"])


def states(model):
    return {"lora": model.get_lora_state(), "head": model.get_head_state()}


def kl_by_hand(teacher_logits, student_logits, temperature):
    """sum_c p_t (log p_t - log p_s) averaged over the batch, softmaxes written out."""
    p_t = torch.exp(teacher_logits / temperature)
    p_t = p_t / p_t.sum(-1, keepdim=True)
    p_s = torch.exp(student_logits / temperature)
    p_s = p_s / p_s.sum(-1, keepdim=True)
    return (p_t * (p_t.log() - p_s.log())).sum(-1).mean()


def step_by_hand(model, v, w, batch, mu, kd_weight=0.0, temperature=1.0):
    """One SGD step on v: autograd of CE (+ kd_weight * KL from the model w to v), plus mu (v - w) added by hand."""
    put(model, w)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        teacher = model(batch["pixel_values"])
    put(model, v)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    logits = model(batch["pixel_values"])
    loss = F.cross_entropy(logits, batch["labels"]) + kd_weight * kl_by_hand(teacher, logits, temperature)
    grads = torch.autograd.grad(loss, list(params.values()))
    with torch.no_grad():
        for (name, p), g in zip(params.items(), grads):
            p -= LR * (g + mu * (p - anchor[name]))
    return states(model)


def close(a, b) -> bool:
    return all(torch.allclose(a[part][k], b[part][k], rtol=1e-5, atol=1e-6) for part in a for k in a[part])


def one_batch_client(method, tiny_vit, tmp_path, algorithm_args):
    """Client 0 holding the initial global model w and a personal model v != w, and its whole train set as one
    batch (batch_size 64 > 28 samples), so that ``train`` takes exactly one SGD step on each model."""
    recipe = small_recipe(method, tiny_vit, tmp_path, train_args={"batch_size": 64, "learning_rate": LR},
                          algorithm_args=algorithm_args, device_args={"num_threads": 1})
    fed = build_federation(recipe)
    client = fed.clients[0]
    w = fed.server.initial_payloads()[0]
    client.receive(w)
    g = torch.Generator().manual_seed(1)
    client.personal = {part: {k: t + 0.3 * torch.randn(t.shape, generator=g) for k, t in client.personal[part].items()}
                       for part in ("lora", "head")}
    batch = next(iter(make_loader(client.data.train, 64, shuffle=False)))
    assert len(batch["labels"]) == client.num_samples == 28
    return fed, client, {"lora": w["lora"], "head": w["head"]}, batch


def test_ditto_personal_step_is_the_ce_gradient_plus_lambda_times_the_distance_to_the_received_global(
        tiny_vit, tmp_path):
    fed, client, w, batch = one_batch_client("Ditto", tiny_vit, tmp_path, {"ditto_lambda": 0.7})
    v = client.personal
    upload = client.train(1)
    assert close(client.personal, step_by_hand(fed.model, v, w, batch, mu=0.7))
    assert not close(client.personal, step_by_hand(fed.model, v, w, batch, mu=1.4))  # lambda/2 ||v - w||^2, not lambda
    # the global copy is FedAvg's plain SGD from w, uploaded as a delta; the personal model never travels
    assert set(upload) == {"client_id", "num_samples", "lora", "head"}
    trained_global = {part: add(w[part], upload[part]) for part in ("lora", "head")}
    assert close(trained_global, step_by_hand(fed.model, w, w, batch, mu=0.0))
    # evaluation reports the personal model
    put(fed.model, client.personal)
    expected = F.cross_entropy(fed.model(batch["pixel_values"]), batch["labels"]).item()
    assert client.evaluate(("train",))["train_loss"] == pytest.approx(expected, rel=1e-5)


def test_perada_personal_objective_adds_lambda_distance_squared_and_distillation_from_the_received_global(
        tiny_vit, tmp_path):
    lam, beta, temperature = 0.3, 2.0, 2.0
    fed, client, w, batch = one_batch_client("PerAda", tiny_vit, tmp_path, {
        "perada_lambda": lam, "perada_kd_weight": beta, "perada_kd_temperature": temperature})
    v = client.personal
    model = fed.model
    # value of the added loss: lambda ||v - w||^2 + beta KL(p_w || p_v), from the states and an explicit w forward
    put(model, w)
    with torch.no_grad():
        teacher = model(batch["pixel_values"])
    anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    put(model, v)
    with torch.no_grad():
        logits = model(batch["pixel_values"])
        value = client.personal_loss(anchor)(logits, batch)
    distance = sum(((v[part][k] - w[part][k]) ** 2).sum() for part in v for k in v[part])
    torch.testing.assert_close(value, lam * distance + beta * kl_by_hand(teacher, logits, temperature))
    # one SGD step: gradients of the same terms
    client.train(1)
    assert close(client.personal, step_by_hand(model, v, w, batch, mu=2 * lam, kd_weight=beta,
                                               temperature=temperature))
    assert not close(client.personal, step_by_hand(model, v, w, batch, mu=2 * lam))  # the distillation matters


def test_distillation_loss_is_the_batch_mean_kl_from_teacher_to_student_with_its_gradient():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 7, generator=g, dtype=torch.float64)
    temperature = 2.5
    loss = distillation_loss(student, teacher, temperature)
    torch.testing.assert_close(loss, kl_by_hand(teacher, student, temperature))
    (grad,) = torch.autograd.grad(loss, student)
    p_s, p_t = (torch.softmax(z.detach() / temperature, -1) for z in (student, teacher))
    torch.testing.assert_close(grad, (p_s - p_t) / (temperature * 5))  # d KL / d z_s, per sample, batch mean
    assert distillation_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-12)


def test_bad_uploads_are_refused_before_the_global_model_changes(tiny_vit, tmp_path):
    fed, client, w, _ = one_batch_client("Ditto", tiny_vit, tmp_path, {})
    upload = client.train(1)
    upload["head"] = {k: torch.full_like(t, float("nan")) for k, t in upload["head"].items()}
    before = fed.server.global_state
    with pytest.raises(ValueError, match="client 0 head update"):
        fed.server.aggregate({0: upload})
    assert fed.server.global_state is before


def flat(state):
    return torch.cat([state[part][k].reshape(-1) for part in ("lora", "head") for k in sorted(state[part])])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ditto", "perada"])
def test_recipe_runs_end_to_end_with_distinct_personal_models_and_reproducibly(name, tiny_vit, tmp_path):
    fed, _, metrics = run_shipped_recipe(name, tiny_vit, tmp_path, "a")
    assert_every_client_evaluated(metrics)
    assert len(metrics["train"]) == 40 and all(math.isfinite(r["personal_train_loss"]) for r in metrics["train"])
    personal = torch.stack([flat(c.personal) for c in fed.clients])
    global_model = flat(fed.server.global_state)
    assert torch.isfinite(personal).all()
    assert all(not torch.equal(personal[i], personal[j]) for i in range(20) for j in range(i + 1, 20))
    assert all(not torch.allclose(p, global_model) for p in personal)
    assert run_shipped_recipe(name, tiny_vit, tmp_path, "b")[2]["eval"] == metrics["eval"]  # same seed, same numbers


@pytest.mark.parametrize("method, args, key", [
    ("Ditto", {"ditto_lambda": -1.0}, "ditto_lambda must be >= 0"),
    ("Ditto", {"ditto_personal_epochs": 0}, "ditto_personal_epochs must be >= 1"),
    ("Ditto", {"perada_lambda": 1.0}, "unknown key 'perada_lambda'"),
    ("PerAda", {"perada_lambda": -0.5}, "perada_lambda must be >= 0"),
    ("PerAda", {"perada_kd_weight": -1.0}, "perada_kd_weight must be >= 0"),
    ("PerAda", {"perada_kd_temperature": 0.0}, "perada_kd_temperature must be > 0"),
    ("PerAda", {"perada_personal_epochs": 0}, "perada_personal_epochs must be >= 1"),
])
def test_bad_algorithm_args_are_refused_naming_the_key(method, args, key):
    with pytest.raises(RecipeError, match=key):
        parse_recipe({"train_args": {"federated_optimizer": method}, "algorithm_args": args})
