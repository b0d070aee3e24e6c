"""pFedSeq's server on synthetic LoRA updates (no backbone needed): eqs. 1, 3, 5, 6, warm-up, privacy, variants."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import synthetic_lora

from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.lora_state import add, weighted_average
from fedml_pfedseq.strategies import method_class

N, RANK, HIDDEN = 4, 2, 3  # 4 clients; per layer D = 4 * RANK * HIDDEN = 24


def initial_lora() -> dict[str, torch.Tensor]:
    return synthetic_lora(RANK, HIDDEN)


def make_server(**algorithm_args):
    args = {"warmup_rounds": 1, "seq_len": 3, "state_size": 4, "learner_hidden_size": 8, **algorithm_args}
    recipe = parse_recipe({"train_args": {"federated_optimizer": "pFedSeq"}, "algorithm_args": args,
                           "device_args": {"using_gpu": False}})
    server = method_class("pFedSeq").Server(N, {"lora": initial_lora()}, recipe)
    server.initial_payloads()
    return server


def uploads_for(round_idx: int, scale: float = 1e-3) -> dict[int, dict]:
    """Client i's LoRA update in this round: a client-specific direction plus noise, and its sample count."""
    g = torch.Generator().manual_seed(100 + round_idx)
    out = {}
    for i in range(N):
        delta = {k: scale * (torch.full_like(v, float(i + 1)) + torch.randn(v.shape, generator=g))
                 for k, v in initial_lora().items()}
        out[i] = {"client_id": i, "num_samples": 10 * (i + 1), "lora": delta}
    return out


def run_rounds(server, rounds, start=1):
    return [server.aggregate(uploads_for(t)) for t in range(start, start + rounds)]


def lora_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_global_adapter_is_the_sample_weighted_average_of_trained_adapters():
    server = make_server()
    sent = {i: server.sent[i]["lora"] for i in range(N)}
    uploads = uploads_for(1)
    server.aggregate(uploads)
    trained = [add(sent[i], uploads[i]["lora"]) for i in range(N)]
    expected = weighted_average(trained, [10, 20, 30, 40])
    for k in expected:
        torch.testing.assert_close(server.global_state["lora"][k], expected[k])


def test_warm_up_sends_only_the_global_adapter_then_personalized_ones():
    server = make_server(warmup_rounds=2)
    for t in range(1, 4):
        payloads = server.aggregate(uploads_for(t))
        theta_g = server.global_state["lora"]
        if t <= 2:
            assert all(lora_equal(p["lora"], theta_g) for p in payloads.values()), f"round {t}"
        else:
            for i, p in payloads.items():  # eq. 3: theta_i = theta_g + xi_i
                expected = add(theta_g, server.layout.column(server.calibrations, i))
                assert lora_equal(p["lora"], expected)
            assert not lora_equal(payloads[0]["lora"], payloads[1]["lora"])


def test_calibrations_are_nonzero_and_differ_across_clients_after_warm_up():
    server = make_server()
    run_rounds(server, 2)
    xi = torch.cat(server.calibrations)  # [sum D_l, N]
    assert (xi.norm(dim=0) > 0).all()
    assert all(not torch.allclose(xi[:, i], xi[:, j]) for i in range(N) for j in range(i + 1, N))
    stats = server.last_round_stats
    assert 0 < stats["calibration_to_drift_ratio_min"] <= stats["calibration_to_drift_ratio_max"]


def test_calibration_sizes_are_relative_to_theta_g_drift_and_to_the_rounds_updates_by_hand():
    server = make_server()
    run_rounds(server, 2)  # warm-up 1: round 2 is calibrated; recompute its stats from the server's state
    deltas = server.history[-1].updates
    xi = torch.cat(server.calibrations)  # [sum D_l, N]
    theta_g = torch.cat([t.flatten() for t in server.layout.flatten(server.global_state["lora"])])
    theta_0 = torch.cat([t.flatten() for t in server.layout.flatten(initial_lora())])
    update_norms = [torch.cat([d[:, i] for d in deltas]).norm() for i in range(N)]
    stats = server.last_round_stats
    drift = (theta_g - theta_0).norm()
    assert stats["calibration_to_drift_ratio_mean"] == pytest.approx(float((xi.norm(dim=0) / drift).mean()), rel=1e-5)
    mean_update = sum(update_norms) / N
    assert stats["calibration_to_update_ratio_mean"] == pytest.approx(
        float((xi.norm(dim=0) / mean_update).mean()), rel=1e-5)


def test_each_payload_holds_only_its_own_client_adapter():
    server = make_server()
    payloads = run_rounds(server, 3)[-1]
    for i, payload in payloads.items():
        assert set(payload) == {"client_id", "lora"} and payload["client_id"] == i
        assert payload["lora"].keys() == initial_lora().keys()
        mine = server.layout.flatten(payload["lora"])
        for j in range(N):  # client i's tensors carry xi_i, never another client's calibration
            others = server.layout.flatten(add(server.global_state["lora"],
                                                   server.layout.column(server.calibrations, j)))
            assert all(torch.equal(a, b) for a, b in zip(mine, others)) == (i == j)


def test_history_keeps_the_last_L_rounds_with_their_normalisers():
    server = make_server(seq_len=3)
    run_rounds(server, 5)
    assert [entry.round for entry in server.history] == [3, 4, 5]
    assert all(len(entry.scales) == 2 and min(entry.scales) > 0 for entry in server.history)
    assert server._window(0).shape == (24, 3, N)


@pytest.mark.parametrize("memory", [False, True], ids=["window only", "with memory"])
def test_recomputed_calibrations_equal_what_clients_received(memory):
    """Step 3 recomputes xi^{t-1} from the stored window and normalisers (and, with memory, the xi^{t-2} it read)
    before psi moves: exactly what was sent."""
    server = make_server(learner_memory=memory)
    run_rounds(server, 3)
    sent = server.calibrations
    server.aggregate(uploads_for(4))
    for recomputed, xi in zip(server.recomputed, sent):
        assert torch.equal(recomputed, xi)


def assert_one_adam_step(server, reference, loss, uploads) -> None:
    """The server's learner after aggregating ``uploads`` equals ``reference`` (a copy taken before) after one Adam
    step on ``loss`` (computed with ``reference``), from the server's optimizer state."""
    optimizer = torch.optim.Adam(reference.parameters(), lr=server.args.learner_lr)
    optimizer.load_state_dict(copy.deepcopy(server.optimizer.state_dict()))
    loss.backward()
    optimizer.step()
    server.aggregate(uploads)
    for (name, p), q in zip(server.learner.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_learner_step_is_adam_on_the_surrogate_gradient():
    """The server's step equals an Adam step on -sum_l <xi_l^{t-1}, Delta_l^t> / s_l^2, by plain backward."""
    server = make_server()
    run_rounds(server, 2)
    reference = copy.deepcopy(server.learner)
    windows = [server._window(l) for l in range(2)]
    scales = server.history[-1].scales
    uploads = uploads_for(3)
    deltas = server.layout.stack([uploads[i]["lora"] for i in range(N)])
    surrogate = -sum((scales[l] * reference(windows[l] / scales[l], l) * deltas[l]).sum() / scales[l] ** 2
                     for l in range(2))
    assert_one_adam_step(server, reference, surrogate, uploads)


def test_a_small_learner_step_moves_calibrations_along_the_updates():
    """After one Adam step with a small lr, <xi_new - xi_old, Delta> > 0 on the window that made xi_old."""
    server = make_server(learner_lr=1e-5)
    run_rounds(server, 2)
    windows = [server._window(l) for l in range(2)]
    scales = server.history[-1].scales
    uploads = uploads_for(3)
    server.aggregate(uploads)
    deltas = server.layout.stack([uploads[i]["lora"] for i in range(N)])
    gain = sum(float(((server.learner.calibrate(windows[l], scales[l], l) - server.recomputed[l]) * deltas[l]).sum())
               for l in range(2))
    assert gain > 0


def test_bad_uploads_are_refused_without_touching_the_server_state():
    server = make_server()
    run_rounds(server, 2)
    before = (server.round, [e.round for e in server.history], copy.deepcopy(server.learner.state_dict()))
    bad = uploads_for(3)
    bad[2]["lora"][next(iter(bad[2]["lora"]))][0, 0] = float("nan")
    with pytest.raises(ValueError, match="client 2 lora update"):
        server.aggregate(bad)
    assert (server.round, [e.round for e in server.history]) == before[:2]
    assert all(torch.equal(v, before[2][k]) for k, v in server.learner.state_dict().items())


def test_variant_a_sends_learner_outputs_as_adapters_and_own_adapters_in_warm_up():
    server = make_server(global_aggregation=False, warmup_rounds=1)
    sent = {i: server.sent[i]["lora"] for i in range(N)}
    uploads = uploads_for(1)
    payloads = server.aggregate(uploads)
    for i in range(N):  # warm-up: nothing shared, each client gets back what it trained
        assert lora_equal(payloads[i]["lora"], add(sent[i], uploads[i]["lora"]))
    payloads = server.aggregate(uploads_for(2))
    for i in range(N):  # theta_i = xi_i, no global adapter added
        assert lora_equal(payloads[i]["lora"], server.layout.column(server.calibrations, i))


def test_variant_b_reads_only_the_latest_round():
    server = make_server(seq_len=1)
    run_rounds(server, 3)
    assert [e.round for e in server.history] == [3] and server._window(1).shape == (24, 1, N)


def test_variants_c_d_e_configure_the_learner():
    assert make_server(cross_client=False).learner.config.num_channels == 1
    assert type(make_server(learner_architecture="mlp").learner.learners[0]).__name__ == "MLPLearner"
    assert type(make_server(learner_architecture="lstm").learner.learners[0]).__name__ == "LSTMLearner"
    for variant in [{"cross_client": False}, {"learner_architecture": "mlp"}, {"learner_architecture": "lstm"}]:
        server = make_server(**variant)
        payloads = run_rounds(server, 2)[-1]
        assert not lora_equal(payloads[0]["lora"], payloads[1]["lora"]), variant


def test_learner_is_reproducible_from_the_seed():
    a, b = make_server(), make_server()
    run_rounds(a, 3), run_rounds(b, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.calibrations, b.calibrations))


@pytest.mark.parametrize("key, value", [("warmup_rounds", -1), ("seq_len", 0), ("learner_architecture", "gru"),
                                        ("learner_lr", 0.0), ("norm_momentum", 1.0), ("d_chunk", 0),
                                        ("client_mixing_rank", 0), ("learner_memory_decay", 0.0),
                                        ("learner_memory_decay", 0.5)])
def test_bad_algorithm_args_are_named(key, value):
    with pytest.raises(RecipeError, match=key):
        make_server(**{key: value})


def learner_state(server) -> list[torch.Tensor]:
    return [p.detach().clone() for p in server.learner.parameters()]


def states_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_without_warm_up_training_the_learner_waits_for_a_sent_calibration():
    """train_during_warmup: false leaves psi alone until a round whose xi^{t-1} reached the clients (W=2: the
    first calibration is sent in round 3, so round 4 is the first step); the paper's schedule trains from round 2."""
    paper, waiting = make_server(warmup_rounds=2), make_server(warmup_rounds=2, train_during_warmup=False)
    initial = learner_state(waiting)
    for t in range(1, 5):
        paper.aggregate(uploads_for(t)), waiting.aggregate(uploads_for(t))
        assert states_equal(learner_state(waiting), initial) == (t <= 3), f"round {t}"
        assert states_equal(learner_state(paper), initial) == (t == 1), f"round {t}"


def test_the_proximal_objective_has_eq5s_gradient_after_a_sent_round():
    """Regressing xi^{t-1}(psi) onto xi sent + Delta: at psi where xi^{t-1} is what was sent, the gradient is eq. 5's.
    Without warm-up training every step is such a step, so the two objectives give the same learner; with it, the
    warm-up steps (xi not sent: target Delta alone) differ."""
    proxy = make_server(train_during_warmup=False)
    proximal = make_server(train_during_warmup=False, learner_objective="proximal")
    run_rounds(proxy, 4), run_rounds(proximal, 4)
    for p, q in zip(learner_state(proxy), learner_state(proximal)):
        torch.testing.assert_close(p, q)
    assert not states_equal(learner_state(proxy), learner_state(make_server()))  # it did train
    a, b = make_server(warmup_rounds=2), make_server(warmup_rounds=2, learner_objective="proximal")
    run_rounds(a, 2), run_rounds(b, 2)
    assert not states_equal(learner_state(a), learner_state(b))


def test_the_proximal_step_is_adam_on_the_regression_loss_of_the_clients_that_reported():
    """Round 3 (W=1, so xi^2 was sent): one Adam step on sum_l 0.5 ||xi_l - (xi sent + Delta)||^2 / s_l^2 over the
    reporting clients (client 3 left out), by plain backward."""
    server = make_server(learner_objective="proximal")
    run_rounds(server, 2)
    reference = copy.deepcopy(server.learner)
    windows, scales, sent = [server._window(l) for l in range(2)], server.history[-1].scales, server.calibrations
    uploads = {i: u for i, u in uploads_for(3).items() if i != 3}
    deltas = server.layout.stack(server.lora_updates(uploads))
    loss = sum(0.5 * (scales[l] * reference(windows[l] / scales[l], l) - sent[l] - deltas[l])[:, :3].pow(2).sum()
               / scales[l] ** 2 for l in range(2))
    assert_one_adam_step(server, reference, loss, uploads)


def test_learner_steps_split_each_layer_into_disjoint_random_parts():
    server = make_server(learner_steps=3)
    run_rounds(server, 2)
    batches = server._row_batches(server.history[-1].updates)
    assert len(batches) == 3
    for layer in range(2):
        rows = torch.cat([batch[layer] for batch in batches])
        assert sorted(rows.tolist()) == list(range(24))  # every row once
    assert server._row_batches(server.history[-1].updates)[0][0].tolist() == batches[0][0].tolist()  # seeded
    assert server.optimizer.state_dict()["state"][0]["step"] == 3  # round 2's three Adam steps
    one_step = make_server()
    run_rounds(one_step, 2)
    assert one_step.optimizer.state_dict()["state"][0]["step"] == 1


def test_centred_calibrations_have_zero_mean_over_clients():
    server = make_server(center_calibrations=True)
    run_rounds(server, 3)
    for xi in server.calibrations:
        torch.testing.assert_close(xi.mean(1), torch.zeros(xi.shape[0]), atol=1e-9, rtol=0)
    plain = make_server()
    run_rounds(plain, 3)
    assert plain.calibrations[0].mean(1).abs().max() > 1e-6


def test_the_calibration_bound_caps_each_clients_rms_per_layer():
    free, bounded = make_server(output_scale_init=5.0), make_server(output_scale_init=5.0, calibration_bound=0.5)
    run_rounds(free, 3), run_rounds(bounded, 3)
    scales = bounded.history[-1].scales
    for l, xi in enumerate(bounded.calibrations):
        assert (xi.pow(2).mean(0).sqrt() <= 0.5 * scales[l] * (1 + 1e-6)).all()
    assert any((xi.pow(2).mean(0).sqrt() > 0.5 * scales[l]).any() for l, xi in enumerate(free.calibrations))


def test_variant_a_emits_adapters_in_the_adapters_own_units():
    """Variant A's output unit is theta^0's RMS per layer, not the updates' (~1e-3 here): xi = rms(theta^0) * f."""
    server = make_server(global_aggregation=False)
    run_rounds(server, 2)
    units = [float(v.pow(2).mean().sqrt()) for v in server.layout.flatten(initial_lora())]
    assert server.output_units == pytest.approx(units)
    scales = server.history[-1].scales
    for l, xi in enumerate(server.calibrations):
        expected = units[l] * server.learner(server._window(l) / scales[l], l).detach()
        torch.testing.assert_close(xi, expected)
    assert make_server().output_units == [None, None]


def test_the_legacy_learner_is_one_switch_away():
    legacy = make_server(learner_magnitude_preserving=False)
    assert not legacy.learner.config.magnitude_preserving
    assert any(type(m).__name__ == "RMSNorm" for m in legacy.learner.modules())
    assert not any(type(m).__name__ == "RMSNorm" for m in make_server().learner.modules())


def test_every_schedule_switch_resumes_from_a_checkpoint(tmp_path):
    """Three rounds, a checkpoint, a fresh server restored from it: round 4 equals the uninterrupted server's."""
    from fedml_pfedseq.checkpoint import load_checkpoint, save_checkpoint

    switches = dict(learner_objective="proximal", learner_steps=3, train_during_warmup=False,
                    center_calibrations=True, calibration_bound=2.0, learner_memory=True, learner_memory_decay=0.7)
    server = make_server(**switches)
    run_rounds(server, 3)
    save_checkpoint(tmp_path / "c.safetensors", {"server": server}, {"round": 3})
    restored = make_server(**switches)
    assert load_checkpoint(tmp_path / "c.safetensors", {"server": restored}) == {"round": 3}
    a, b = server.aggregate(uploads_for(4)), restored.aggregate(uploads_for(4))
    assert all(lora_equal(a[i]["lora"], b[i]["lora"]) for i in range(N))
    assert states_equal(learner_state(server), learner_state(restored))


def test_memory_starts_at_zero_then_adds_to_the_last_calibration():
    """The first calibrated round reads a zero memory with zero weights: the memory-less server's calibrations.
    From the next one xi^t = xi^{t-1} + f(window, xi^{t-1}), where the memory-less server sends f alone."""
    remembering, forgetting = make_server(learner_memory=True), make_server()
    for t in (1, 2):
        remembering.aggregate(uploads_for(t)), forgetting.aggregate(uploads_for(t))
    for a, b in zip(remembering.calibrations, forgetting.calibrations, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    first = remembering.calibrations
    remembering.aggregate(uploads_for(3)), forgetting.aggregate(uploads_for(3))
    assert remembering.memory is first
    scales = remembering.history[-1].scales
    for l, (xi, previous, other) in enumerate(zip(remembering.calibrations, first, forgetting.calibrations)):
        f = remembering.learner.calibrate(remembering._window(l), scales[l], l, previous=previous) - previous
        torch.testing.assert_close(xi - previous, f, rtol=1e-5, atol=1e-12)
        assert (xi - other).abs().max() > 0.5 * other.abs().max()  # memory is what makes the difference


def test_memory_with_a_late_client_and_skipped_rounds():
    """Client 3 joins at round 4, client 1 skips round 4: every client is calibrated every round, an absent one
    from zero updates, its column of memory carried on; the learner still trains on who reported."""
    server = make_server(learner_memory=True, learner_objective="proximal")
    rounds = {t: {i: u for i, u in uploads_for(t).items() if i != 3 or t >= 4} for t in range(1, 4)}
    rounds[4] = {i: u for i, u in uploads_for(4).items() if i != 1}
    columns = []
    for uploads in rounds.values():
        payloads = server.aggregate(uploads)
        assert sorted(payloads) == list(range(N))
        columns.append(server.calibrations[0][:, 3].clone() if server.calibrations else None)
        assert server.history[-1].present == [i in uploads for i in range(N)]
    assert columns[0] is None and all(torch.isfinite(c).all() and c.any() for c in columns[1:])
    assert not torch.equal(columns[1], columns[2])  # the late client's column moves before it reports
    sent = server.calibrations
    server.aggregate(uploads_for(5))
    for recomputed, xi in zip(server.recomputed, sent):
        torch.testing.assert_close(recomputed, xi, rtol=0, atol=0)


SCHEDULES = {"paper's": {}, "proximal, 3 steps": {"learner_objective": "proximal", "learner_steps": 3},
             "chunked, centred": {"d_chunk": 5, "center_calibrations": True},
             "client mixing R = 2": {"client_mixing_rank": 2},
             "proximal with memory": {"learner_objective": "proximal", "learner_memory": True}}


@pytest.mark.parametrize("args", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_server_rounds_with_the_fast_learner_equal_the_reference_implementation(args):
    """Four rounds (warm-up, first sent calibrations, steps on a full history) with the package's learner and with
    reference.py's: the same calibrations, recomputed xi and learner after every round, to float32 rounding."""
    from fedml_pfedseq.models.seq_learner.reference import reference_implementation

    fast, reference = make_server(**args), make_server(**args)
    for t in range(1, 5):
        fast.aggregate(uploads_for(t))
        with reference_implementation():
            reference.aggregate(uploads_for(t))
        for mine, theirs in ((fast.calibrations or [], reference.calibrations or []),
                             (fast.recomputed, reference.recomputed), (learner_state(fast), learner_state(reference))):
            assert len(mine) == len(theirs)
            for a, b in zip(mine, theirs):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg=f"round {t}")
    assert fast.calibrations is not None and fast.recomputed
