"""APPLE: one local step on (theta_i, p_i) against gradients worked out by hand, the lambda schedule and the
initial p and cores, the server's per-client core slots, args validation, and an end-to-end run from its recipe."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_every_client_evaluated, run_shipped_recipe, small_recipe, synthetic_lora
from torch.func import functional_call

from fedml_pfedseq.algorithm_args import AppleArgs
from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.lora_state import add
from fedml_pfedseq.strategies.apple import AppleServer, proximal_coefficient
from fedml_pfedseq.training import make_loader
from fedml_pfedseq.transport import check_plain

LR, P_LR, MU = 0.3, 0.05, 2.0


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def perturbed(core, seed, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    return {part: {k: t + scale * torch.randn(t.shape, generator=g) for k, t in core[part].items()} for part in core}


def param_name(part: str, key: str) -> str:
    """The model's parameter name of a (LoRA, head) state key, worked out independently of the strategy."""
    if part == "head":
        return f"head.{key}"
    module, _, leaf = key.rpartition(".")
    return f"backbone.{module}.default.{leaf}"


def test_one_local_step_is_sgd_on_theta_i_and_p_i_with_the_hand_worked_gradients(tiny_vit, tmp_path):
    # fraction 1 over 2 rounds: round 1 has lambda = 1, so the penalty is MU ||p - p0||^2; the client's 28 training
    # samples form one batch of 64, so train(1) is exactly one step
    recipe = small_recipe("APPLE", tiny_vit, tmp_path, train_args={"batch_size": 64, "learning_rate": LR},
                          algorithm_args={"apple_p_lr": P_LR, "apple_mu": MU, "apple_reg_rounds_fraction": 1.0},
                          device_args={"num_threads": 1})
    fed = build_federation(recipe)
    i, model = 2, fed.model
    client, n = fed.clients[i], len(fed.clients)
    sent = fed.server.initial_payloads()[i]
    # every core with non-zero LoRA B (so the adapter's gradients matter) and distinct from the others
    cores = [perturbed({"lora": sent["lora"], "head": sent["head"]}, seed=10 + j) for j in range(n)]
    client.receive({"client_id": i, **cores[i], "peers": {j: cores[j] for j in range(n) if j != i}})
    assert client.num_samples == 28
    p0 = torch.full((n,), 1.0 / n)
    torch.testing.assert_close(client.p0, p0, rtol=0, atol=0)
    p = p0 + 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(3))  # away from p0: the penalty acts
    client.p = p.clone()

    # by hand: w = sum_j p_j theta_j per tensor; g = dCE/dw; dp_j = sum <g, theta_j> + 2 MU (p_j - p0_j)
    keys = [(part, key) for part in ("lora", "head") for key in cores[i][part]]
    mixed = {param_name(part, key): sum(p[j] * cores[j][part][key] for j in range(n)).requires_grad_(True)
             for part, key in keys}
    batch = next(iter(make_loader(client.data.train, 64, shuffle=False)))
    model.train()
    loss = F.cross_entropy(functional_call(model, mixed, (batch["pixel_values"],)), batch["labels"])
    g = dict(zip(mixed, torch.autograd.grad(loss, list(mixed.values()))))
    inner = torch.stack([sum((g[param_name(part, key)] * cores[j][part][key]).sum() for part, key in keys)
                         for j in range(n)])
    expected_p = p - P_LR * (inner + 2 * MU * (p - p0))
    expected_own = {part: {key: cores[i][part][key] - LR * p[i] * g[param_name(part, key)]
                           for key in cores[i][part]} for part in ("lora", "head")}
    without_penalty = p - P_LR * inner
    half_penalty = p - P_LR * (inner + MU * (p - p0))  # the mu/2 form with the same mu

    upload = client.train(1)
    torch.testing.assert_close(client.p, expected_p, rtol=1e-5, atol=1e-7)
    for part in expected_own:
        for key in expected_own[part]:
            torch.testing.assert_close(client.state[part][key], expected_own[part][key], rtol=1e-5, atol=1e-7)
    # the penalty's presence and coefficient show well above the tolerance
    assert (client.p - without_penalty).abs().max() > 1e-3
    assert (client.p - half_penalty).abs().max() > 1e-4
    assert client.last_train_stats["proximal_coef"] == MU
    # only the own core was trained: the peers' cores are untouched; the upload is its delta (FedAvg's format)
    assert all(equal(client.peers[j][part], cores[j][part]) for j in client.peers for part in ("lora", "head"))
    assert set(upload) == {"client_id", "num_samples", "lora", "head"} and upload["num_samples"] == 28
    check_plain(upload, "upload")
    for part in ("lora", "head"):
        rebuilt = add(cores[i][part], upload[part])
        assert all(torch.allclose(rebuilt[k], expected_own[part][k], rtol=1e-5, atol=1e-6) for k in rebuilt)
    # evaluation uses the personalized model sum_j p_ij theta_j with the trained p and own core
    mixed_after = {param_name(part, key): sum(client.p[j] * client.cores()[j][part][key] for j in range(n))
                   for part, key in keys}
    val = next(iter(make_loader(client.data.validation, 256, shuffle=False)))
    model.eval()
    with torch.no_grad():
        val_loss = F.cross_entropy(functional_call(model, mixed_after, (val["pixel_values"],)), val["labels"])
    assert client.evaluate(("validation",))["validation_loss"] == pytest.approx(val_loss.item(), rel=1e-5)


def test_lambda_schedule_p_init_and_initial_cores_follow_the_formulas(tiny_vit, tmp_path):
    def coef(r, rounds=20, **kw):
        return proximal_coefficient(r, rounds, AppleArgs(**{"apple_mu": 0.4, "apple_reg_rounds_fraction": 0.5,
                                                            **kw}))

    # R = int(20 * 0.5) = 10 regularized rounds; r = round - 1
    for rnd in range(1, 11):
        r = rnd - 1
        assert coef(rnd, apple_scheduler="cosine") == pytest.approx((math.cos(math.pi * r / 10) + 1) / 2 * 0.4)
        assert coef(rnd, apple_scheduler="exponential") == pytest.approx(0.001 ** (r / 10) * 0.4)
    assert coef(1) == pytest.approx(0.4) and coef(6, apple_scheduler="cosine") == pytest.approx(0.2)
    assert coef(10, apple_scheduler="exponential") == pytest.approx(0.4 * 0.001 ** 0.9)
    assert [coef(r) for r in (11, 12, 20)] == [0.0] * 3  # after R rounds: no penalty
    assert coef(1, apple_mu=0.0) == 0.0
    assert coef(1, rounds=9, apple_reg_rounds_fraction=0.1) == 0.0  # int(0.9) = 0 regularized rounds
    assert coef(1, rounds=12, apple_reg_rounds_fraction=0.1) == pytest.approx(0.4)  # the recipe: round 1 only
    assert coef(2, rounds=12, apple_reg_rounds_fraction=0.1) == 0.0

    fed = build_federation(small_recipe("APPLE", tiny_vit, tmp_path, device_args={"num_threads": 1}))
    n = len(fed.clients)
    heads_drawn_by_clients = [c.state["head"] for c in fed.clients]  # FedAvgClient's own initial heads
    payloads = fed.server.initial_payloads()
    for i, client in enumerate(fed.clients):
        client.receive(payloads[i])
        assert torch.equal(client.p, torch.full((n,), 1.0 / n)) and torch.equal(client.p0, client.p)
    # "distinct": core j = PEFT's init with its own A (B = 0) and the head client j draws for itself
    initial_lora = fed.model.get_lora_state()
    cores = fed.server.cores
    for j, core in enumerate(cores):
        assert equal(core["head"], heads_drawn_by_clients[j])
        for key, value in core["lora"].items():
            if ".lora_B." in key:
                assert torch.equal(value, initial_lora[key]) and not value.any()
            else:
                bound = 1 / math.sqrt(value.shape[1])  # kaiming_uniform(a=sqrt 5): U(-1/sqrt(fan_in), +)
                assert value.abs().max() <= bound and not torch.equal(value, cores[(j + 1) % n]["lora"][key])
    rebuilt = build_federation(small_recipe("APPLE", tiny_vit, tmp_path, device_args={"num_threads": 1}))
    assert all(equal(a[part], b[part]) for a, b in zip(cores, rebuilt.server.cores) for part in a)  # seeded
    # "shared": every core is the server's theta^0
    shared = build_federation(small_recipe("APPLE", tiny_vit, tmp_path, device_args={"num_threads": 1},
                                           algorithm_args={"apple_core_init": "shared"})).server
    assert all(equal(core[part], shared.global_state[part]) for core in shared.cores for part in core)


def test_server_sends_every_client_all_latest_cores_and_an_upload_changes_only_its_slot(tiny_vit, tmp_path):
    n = 4
    initial = {"lora": synthetic_lora(2, 6), "head": {"weight": torch.randn(5, 6), "bias": torch.randn(5)}}
    server = AppleServer(n, initial, small_recipe("APPLE", tiny_vit, tmp_path))

    def check(payloads, cores):
        for i, payload in payloads.items():
            check_plain(payload, f"payload {i}")
            assert payload["client_id"] == i and set(payload["peers"]) == set(range(n)) - {i}
            assert all(equal(payload[part], cores[i][part]) for part in ("lora", "head"))
            assert all(equal(payload["peers"][j][part], cores[j][part]) for j in payload["peers"]
                       for part in ("lora", "head"))

    first = server.initial_payloads()
    cores = [{part: first[j][part] for part in ("lora", "head")} for j in range(n)]
    check(first, cores)
    uploads = {i: {"client_id": i, "num_samples": 10 + i, **perturbed(cores[i], seed=i)} for i in range(n)}
    trained = [{part: add(cores[i][part], uploads[i][part]) for part in ("lora", "head")} for i in range(n)]
    second = server.aggregate(uploads)
    check(second, trained)  # each client's latest core, not an average
    assert not equal(second[0]["lora"], second[1]["lora"])

    before = [{part: dict(server.cores[j][part]) for part in ("lora", "head")} for j in range(n)]
    upload = {"client_id": 1, "num_samples": 11, **perturbed(trained[1], seed=99)}
    third = server.aggregate({1: upload})
    latest = [before[j] if j != 1 else {part: add(trained[1][part], upload[part]) for part in ("lora", "head")}
              for j in range(n)]
    check(third, latest)
    assert all(server.cores[j][part][k] is before[j][part][k] for j in (0, 2, 3) for part in ("lora", "head")
               for k in before[j][part])  # the other slots are the very tensors they were
    bad = {"client_id": 2, "num_samples": 1, **perturbed(latest[2], seed=5)}
    bad["head"]["bias"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        server.aggregate({2: bad})
    assert all(server.cores[j][part][k] is third[j][part][k] for j in range(n) for part in ("lora", "head")
               for k in third[j][part])  # refused before any slot changed


@pytest.mark.parametrize("key, value", [
    ("apple_p_lr", 0.0), ("apple_p_lr", float("nan")), ("apple_mu", -0.1), ("apple_mu", float("inf")),
    ("apple_scheduler", "linear"), ("apple_reg_rounds_fraction", -0.1), ("apple_reg_rounds_fraction", 1.5),
    ("apple_core_init", "random")])
def test_bad_algorithm_args_are_refused_naming_the_key(key, value):
    with pytest.raises(RecipeError, match=f"algorithm_args.{key}"):
        parse_recipe({"train_args": {"federated_optimizer": "APPLE"}, "algorithm_args": {key: value}})


@pytest.mark.slow
def test_recipe_runs_end_to_end_and_p_moves_from_its_init(tiny_vit, tmp_path):
    fed, summary, metrics = run_shipped_recipe("apple", tiny_vit, tmp_path)
    assert summary["clients"] == 20 and summary["rounds"] == 2
    assert_every_client_evaluated(metrics)
    for client in fed.clients:
        assert torch.isfinite(client.p).all() and (client.p - client.p0).abs().max() > 1e-6
        assert all(equal(client.state[part], fed.server.cores[client.client_id][part]) for part in ("lora", "head"))
    assert not torch.equal(fed.clients[0].p, fed.clients[1].p)
    assert all(r["p_shift"] > 0 and math.isfinite(r["train_loss"]) for r in metrics["train"])
    for row in metrics["server"]:  # each client downloads all 20 cores, uploads one core's delta
        assert row["payload_bytes_mean"] > 15 * row["upload_bytes_mean"]
