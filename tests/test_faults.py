"""Real-world federations in the simulator: K of N clients per round, and bad updates left out of the round with
their reason, never reaching the aggregate, pFedSeq's history or its learner."""
from __future__ import annotations

import collections
import copy
import logging

import pytest
import torch
from conftest import small_recipe, three_clients

from fedml_pfedseq.config import RecipeError
from fedml_pfedseq.federation import build_federation, participants
from fedml_pfedseq.round_close import RoundError
from fedml_pfedseq.simulation import run_federation


def small_federation(method: str, tiny_vit, tmp_path, rounds: int = 2, per_round: int | None = None,
                     **algorithm_args):
    """``three_clients`` with 30 drawings per drawer, ``rounds`` rounds, ``per_round`` clients a round."""
    return three_clients(method, tiny_vit, tmp_path, algorithm_args=algorithm_args,
                         data_args={"samples_per_client": 30},
                         train_args={"client_num_per_round": per_round, "comm_round": rounds})


def recording(server):
    """Wrap ``server.aggregate`` to keep each round's uploads and the state it started from."""
    rounds = []
    aggregate = server.aggregate

    def wrapped(uploads):
        rounds.append({"uploads": uploads, "sent": dict(server.sent)})
        return aggregate(uploads)

    server.aggregate = wrapped
    return rounds


# --- sampling K of N -------------------------------------------------------------------------------------------

def test_participants_are_k_distinct_clients_seeded_by_round_and_uniform(tiny_vit, tmp_path):
    recipe = small_federation("FedAvg", tiny_vit, tmp_path, per_round=2)
    draws = [participants(recipe, 10, t) for t in range(1, 2001)]
    assert all(len(d) == 2 and d == sorted(set(d)) and all(0 <= i < 10 for i in d) for d in draws)
    assert draws == [participants(recipe, 10, t) for t in range(1, 2001)]  # the same in every engine and resume
    counts = collections.Counter(i for d in draws for i in d)
    expected = 2000 * 2 / 10  # each client's share K/N of the rounds; binomial sd ~ 17.9
    assert all(abs(counts[i] - expected) < 5 * 17.9 for i in range(10))
    assert participants(small_federation("FedAvg", tiny_vit, tmp_path), 10, 1) == list(range(10))


def test_fedavg_with_two_of_three_aggregates_only_the_sampled_clients(tiny_vit, tmp_path):
    recipe = small_federation("FedAvg", tiny_vit, tmp_path, rounds=3, per_round=2)
    fed = build_federation(recipe)
    rounds = recording(fed.server)
    log = run_federation(fed, progress=False)
    for t, record in enumerate(rounds, start=1):
        sampled = participants(recipe, 3, t)
        assert sorted(record["uploads"]) == sampled
        assert sorted(r["client"] for r in log.train_rows if r["round"] == t) == sampled
        assert sorted(r["client"] for r in log.rows if r["round"] == t - 1) == sampled  # evaluated on arrival
    # the last round's global state by hand: (n_a (sent_a + d_a) + n_b (sent_b + d_b)) / (n_a + n_b)
    last = rounds[-1]
    (a, ua), (b, ub) = sorted(last["uploads"].items())
    key = next(iter(ua["lora"]))
    by_hand = ((ua["num_samples"] * (last["sent"][a]["lora"][key] + ua["lora"][key])
                + ub["num_samples"] * (last["sent"][b]["lora"][key] + ub["lora"][key]))
               / (ua["num_samples"] + ub["num_samples"]))
    assert torch.allclose(fed.server.global_state["lora"][key], by_hand, atol=1e-6)
    assert [row["participants"] for row in log.server_rows] == [2, 2, 2]
    assert sorted(r["client"] for r in log.rows if r["round"] == 3) == [0, 1, 2]  # the final evaluation: all


def test_pfedseq_history_masks_absent_clients_and_every_client_gets_its_calibration(tiny_vit, tmp_path):
    recipe = small_federation("pFedSeq", tiny_vit, tmp_path, rounds=4, per_round=2, warmup_rounds=1, seq_len=3)
    fed = build_federation(recipe)
    rounds = recording(fed.server)
    run_federation(fed, progress=False)
    server = fed.server
    for entry, record in zip(server.history, rounds[1:]):
        present = sorted(record["uploads"])
        assert entry.present == [i in present for i in range(3)]
        for layer, update in enumerate(entry.updates):
            for i in range(3):
                column = update[:, i]
                if i in present:
                    assert torch.equal(column, server.layout.flatten(record["uploads"][i]["lora"])[layer])
                else:
                    assert not column.any()  # absent: a zero column, no term in the learner's gradient
    # the normaliser reads the reported columns only (bias-corrected running mean of their mean square)
    beta, mean_square = recipe.algorithm_args.norm_momentum, torch.zeros(len(server.layout.layers),
                                                                         dtype=torch.float64)
    for record in rounds:
        present = sorted(record["uploads"])
        flat = [server.layout.flatten(record["uploads"][i]["lora"]) for i in present]
        current = torch.tensor([float(torch.stack([f[l] for f in flat]).double().pow(2).mean())
                                for l in range(len(server.layout.layers))], dtype=torch.float64)
        mean_square = beta * mean_square + (1 - beta) * current
    assert server.history[-1].scales == pytest.approx((mean_square / (1 - beta ** 4)).sqrt().tolist())
    # after warm-up every client, sampled or not, has theta_g + xi_i waiting, xi_i its own column
    for i in range(3):
        expected = {k: server.global_state["lora"][k] + v
                    for k, v in server.layout.column(server.calibrations, i).items()}
        assert all(torch.allclose(server.sent[i]["lora"][k], expected[k]) for k in expected)
    assert not torch.equal(server.calibrations[0][:, 0], server.calibrations[0][:, 1])


def synthetic_round(server, present, seed=0):
    """Small random LoRA updates from the clients in ``present`` (what the server sent them, moved a little)."""
    g = torch.Generator().manual_seed(seed)
    return {i: {"client_id": i, "num_samples": 10 + i,
                "lora": {k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in server.sent[i]["lora"].items()}}
            for i in present}


def test_pfedhn_treats_an_absent_client_as_a_zero_update(tiny_vit, tmp_path):
    """pFedHN's step is on sum_i <theta_i, -Delta_i>: an absent client adds nothing; its embedding does not move
    (zero gradient, and zero moments: round 1's input gradients are zero), the others' do."""
    server = build_federation(small_federation("pFedHN", tiny_vit, tmp_path, per_round=2)).server
    server.initial_payloads()
    server.aggregate(synthetic_round(server, [0, 1, 2]))  # the heads start at zero: inputs get gradients from round 2
    twin = copy.deepcopy(server)
    uploads = synthetic_round(server, [0, 2], seed=1)
    embeddings = server.networks["client_embeddings"].weight.detach().clone()
    server.aggregate(uploads)
    zero = {"client_id": 1, "num_samples": 11, "lora": {k: torch.zeros_like(v) for k, v in uploads[0]["lora"].items()}}
    twin.aggregate({**uploads, 1: zero})
    assert all(torch.equal(a, b) for a, b in zip(server.networks.parameters(), twin.networks.parameters()))
    moved = server.networks["client_embeddings"].weight.detach()
    assert torch.equal(moved[1], embeddings[1]) and not torch.equal(moved[0], embeddings[0])


def test_pfedla_steps_only_the_sampled_clients_and_keeps_the_others_adapters(tiny_vit, tmp_path):
    server = build_federation(small_federation("pFedLA", tiny_vit, tmp_path, per_round=2)).server
    server.initial_payloads()
    server.aggregate(synthetic_round(server, [0, 1, 2]))  # round 1: everyone; the hypernetworks start stepping next
    kept = [adapter[:, 1].clone() for adapter in server.adapters]
    before = [[p.detach().clone() for p in net.parameters()] for net in server.hypernetworks]
    server.aggregate(synthetic_round(server, [0, 2], seed=1))
    after = [[p.detach() for p in net.parameters()] for net in server.hypernetworks]
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1]))  # client 1's hypernetwork: no step
    assert not all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert all(torch.equal(adapter[:, 1], k) for adapter, k in zip(server.adapters, kept))


@pytest.mark.parametrize("method", ["pFedHN", "pFedLA", "APPLE", "PeFLL"])
def test_personalized_servers_run_with_two_of_small_federation(method, tiny_vit, tmp_path):
    log = run_federation(build_federation(small_federation(method, tiny_vit, tmp_path, rounds=3, per_round=2)),
                         progress=False)
    assert [row["aggregated"] for row in log.server_rows] == [2, 2, 2]
    assert sorted(r["client"] for r in log.rows if r["round"] == 3) == [0, 1, 2]


def test_sampling_is_accepted_by_both_engines_and_the_minimum_fits_k(tiny_vit, tmp_path):
    for engine in ("simulation", "cross_silo"):
        recipe = small_recipe("FedAvg", tiny_vit, tmp_path, common_args={"training_type": engine},
                              train_args={"client_num_in_total": 3, "client_num_per_round": 2})
        assert recipe.train_args.client_num_per_round == 2
    with pytest.raises(RecipeError, match="min_uploads_per_round.*exceeds client_num_per_round"):
        small_recipe("FedAvg", tiny_vit, tmp_path, train_args={"client_num_in_total": 3, "client_num_per_round": 2,
                                                               "min_uploads_per_round": 3})


# --- bad updates ----------------------------------------------------------------------------------------------

def first_key(upload):
    return next(iter(upload["lora"]))


CORRUPTIONS = {
    "NaN": (lambda u: u["lora"][first_key(u)].view(-1).__setitem__(0, float("nan")), "holds NaN or Inf"),
    "Inf": (lambda u: u["lora"][first_key(u)].view(-1).__setitem__(0, float("inf")), "holds NaN or Inf"),
    "unknown key": (lambda u: u["lora"].__setitem__("extra.lora_A.weight", torch.zeros(1)), "keys that differ"),
    "missing part": (lambda u: u.pop("head"), "lacks 'head'"),
    "shape": (lambda u: u["lora"].__setitem__(first_key(u), u["lora"][first_key(u)][:1]), "expected torch.float32"),
    "dtype": (lambda u: u["lora"].__setitem__(first_key(u), u["lora"][first_key(u)].double()), "is torch.float64"),
    "sender": (lambda u: u.__setitem__("client_id", 0), "claims to come from client 0"),
    "sample count": (lambda u: u.__setitem__("num_samples", 0), "num_samples must be a positive int"),
}


def corrupt_client(fed, client: int, round_idx: int, corruption):
    train = fed.clients[client].train

    def bad_train(t):
        upload = train(t)
        if t == round_idx:
            corruption(upload)
        return upload

    fed.clients[client].train = bad_train


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_a_bad_update_is_left_out_with_its_reason_and_the_round_goes_on(kind, tiny_vit, tmp_path, caplog):
    corruption, reason = CORRUPTIONS[kind]
    fed = build_federation(small_federation("FedAvg", tiny_vit, tmp_path))
    corrupt_client(fed, 1, 2, corruption)
    rounds = recording(fed.server)
    with caplog.at_level(logging.WARNING):
        log = run_federation(fed, progress=False)
    assert sorted(rounds[1]["uploads"]) == [0, 2]  # client 1 never reached the aggregate
    assert log.server_rows[1]["aggregated"] == 2 and reason in log.server_rows[1]["left_out"]
    assert log.server_rows[1]["left_out"].startswith("client 1: rejected")
    assert any("client 1's upload left out" in r.message and reason in r.message for r in caplog.records)
    assert all(torch.isfinite(v).all() for part in fed.server.global_state.values() for v in part.values())
    assert log.server_rows[0]["left_out"] == ""


def test_pfedseq_never_puts_a_bad_update_in_its_history_or_learner(tiny_vit, tmp_path):
    fed = build_federation(small_federation("pFedSeq", tiny_vit, tmp_path, rounds=3, warmup_rounds=1, seq_len=3))
    corrupt_client(fed, 1, 2, CORRUPTIONS["NaN"][0])
    run_federation(fed, progress=False)
    round_2 = fed.server.history[1]
    assert round_2.round == 2 and round_2.present == [True, False, True]
    assert all(not update[:, 1].any() for update in round_2.updates)
    assert all(torch.isfinite(p).all() for p in fed.server.learner.parameters())
    assert all(torch.isfinite(c).all() for c in fed.server.calibrations)


def test_too_few_valid_uploads_stop_the_run_naming_them(tiny_vit, tmp_path):
    recipe = small_recipe("FedAvg", tiny_vit, tmp_path, data_args={
        "partition_method": "dirichlet", "partition_alpha": 0.5, "samples_per_client": 30},
        train_args={"client_num_in_total": 3, "min_uploads_per_round": 2, "comm_round": 2},
        device_args={"num_threads": 1})
    fed = build_federation(recipe)
    for i in (0, 2):
        corrupt_client(fed, i, 2, CORRUPTIONS["Inf"][0])
    with pytest.raises(RoundError, match=r"round 2: 1 valid upload\(s\), fewer than "
                                         r"train_args.min_uploads_per_round = 2.*client 0.*NaN or Inf"):
        run_federation(fed, progress=False)
