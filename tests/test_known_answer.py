"""The known-answer benchmark against hand-computed values on tiny instances (the 2-layer test ViT's LoRA layout)."""
import math

import pytest
import torch

from fedml_pfedseq import known_answer as ka
from fedml_pfedseq.config import RecipeError
from fedml_pfedseq.federation import build_model, participants
from fedml_pfedseq.strategies import METHODS, method_class
from fedml_pfedseq.strategies.fedavg import FedAvgClient


def hand_problem(tiny_vit, method: str, offsets: list[float], **settings):
    """A recipe, its model and a problem whose client i's optimum is theta^0 + offsets[i] in every entry."""
    settings = ka.Settings(clients=len(offsets), model=tiny_vit, **settings)
    recipe = ka.method_recipe(method, settings, seed=0, overrides=[])
    model = build_model(recipe, ka.NUM_LABELS)
    theta0 = model.get_lora_state()
    layout = ka.LayerLayout.of(theta0)
    base = torch.cat(layout.flatten(theta0))
    optima = torch.stack([base + offset for offset in offsets])
    return recipe, model, ka.Problem(layout, base, optima, sigma=0.0, batches=settings.batches, seed=0)


def test_oracle_is_zero_and_fedavg_matches_the_closed_form(tiny_vit):
    # optima theta^0 + 0.1 and theta^0 + 0.3 in each of D entries; 2 steps of lr 0.5 per round contract the distance
    # to a client's optimum by q = 0.25, so FedAvg's adapter is theta^0 + 0.2 (1 - q^t) and the mean loss is
    # 0.5 D ((0.1 - 0.2 q^t)^2 + (0.1 + 0.2 q^t)^2) / 2 = 0.5 D (0.01 + 0.04 q^(2t))
    recipe, model, problem = hand_problem(tiny_vit, "FedAvg", [0.1, 0.3], rounds=2, lr=0.5, batches=2)
    d = problem.theta0.numel()
    assert d == 2 * 2 * 2 * 8 * 32  # 2 layers x (q, v) x (A [8, 32], B [32, 8])
    assert problem.mean_loss(problem.optima) == 0.0
    run = ka.run_method(recipe, model, problem)
    assert run.losses == pytest.approx([d / 40, 0.5 * d * 0.0125, 0.5 * d * (0.01 + 0.04 / 256)], rel=1e-5)
    assert run.trained == [[0, 1], [0, 1]]


@pytest.mark.parametrize("method, kept, frozen", [("FedSA-LoRA", 0.09, 0.0), ("FFA-LoRA", 0.04, 0.05)])
def test_the_lora_factor_methods_match_their_closed_forms(tiny_vit, method, kept, frozen):
    # the case above, D/2 entries in A factors and D/2 in B: FedSA-LoRA averages the A entries as FedAvg does
    # (0.01 + 0.04 q^2t per entry) and each client trains its own B entries (mean of (0.1 q^t)^2 and (0.3 q^t)^2 =
    # 0.05 q^2t); FFA-LoRA averages the B entries as FedAvg and leaves A at theta^0 (0.05 per entry, every round):
    # 0.25 D (0.01 + kept q^2t + frozen)
    recipe, model, problem = hand_problem(tiny_vit, method, [0.1, 0.3], rounds=2, lr=0.5, batches=2)
    d = problem.theta0.numel()
    run = ka.run_method(recipe, model, problem)
    assert run.losses == pytest.approx([0.25 * d * (0.01 + kept * 0.25 ** (2 * t) + frozen) for t in range(3)],
                                       rel=1e-5)


def test_benchmark_references_on_a_generated_instance(tiny_vit):
    settings = ka.Settings(clients=3, rounds=2, clusters=2, lr=0.5, batches=1, model=tiny_vit)
    bench = ka.run_benchmark(settings, ["FedAvg"], seeds=[0], progress=False)
    recipe = ka.method_recipe("FedAvg", settings, 0, [])
    problem = ka.make_problem(build_model(recipe, ka.NUM_LABELS).get_lora_state(), settings, 0)
    # FedAvg with one step of lr 0.5 (q = 0.5): theta_g^t = m + q^t (theta^0 - m), m the mean optimum
    m = problem.optima.double().mean(0)
    expected = [float(0.5 * (m + 0.5**t * (problem.theta0.double() - m) - problem.optima.double()).pow(2).sum(1).mean())
                for t in range(3)]
    assert bench.run_of("FedAvg", 0).losses == pytest.approx(expected, rel=1e-5)
    assert bench.run_of("oracle", 0).losses == [0.0, 0.0, 0.0]
    assert bench.relative(bench.run_of("FedAvg", 0)) == [1.0, 1.0, 1.0]
    # the offsets: shared + cluster (i mod K) + own, RMS s = 0.01 per entry for a cluster offset
    assert (problem.optima - problem.theta0).pow(2).mean().sqrt() == pytest.approx(0.01 * math.sqrt(1 + 1 + 0.09),
                                                                                    rel=0.05)


def test_sampling_is_honoured(tiny_vit):
    # Local: client i's distance to theta*_i shrinks by q = 0.5 each round it is sampled, and only then
    recipe, model, problem = hand_problem(tiny_vit, "Local", [0.1, 0.2, 0.3], rounds=4, lr=0.5, batches=1,
                                          per_round=1)
    run = ka.run_method(recipe, model, problem)
    sampled = [participants(recipe, 3, t) for t in range(1, 5)]
    assert run.trained == sampled and all(len(s) == 1 for s in sampled)
    d = problem.theta0.numel()
    for t in range(5):
        counts = [sum(i in s for s in sampled[:t]) for i in range(3)]
        expected = sum(0.5 * d * (off * 0.5**k) ** 2 for off, k in zip([0.1, 0.2, 0.3], counts)) / 3
        assert run.losses[t] == pytest.approx(expected, rel=1e-5)


def test_calibration_stats_on_a_constructed_case():
    xi = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ideal = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    ratio, cos = ka.calibration_stats(xi, ideal)  # client 0: 1/sqrt(2), 1/sqrt(2); client 1: 2, 1
    assert ratio == pytest.approx((2**-0.5 + 2) / 2)
    assert cos == pytest.approx((2**-0.5 + 1) / 2)


def test_pfedseq_row_is_finite_and_outputs_are_written(tiny_vit, tmp_path):
    settings = ka.Settings(clients=3, rounds=3, model=tiny_vit, noise=1.0)
    bench = ka.run_benchmark(settings, ["pFedSeq", "FedRep"], seeds=[0], progress=False,
                             overrides=["algorithm_args.warmup_rounds=1", "algorithm_args.seq_len=2"])
    run = bench.run_of("pFedSeq", 0)
    assert run.xi_ratio[:2] == [None, None]  # the initial payloads and warm-up: no calibration
    assert all(math.isfinite(v) for v in run.xi_ratio[2:] + run.xi_cos[2:] + bench.relative(run))
    assert -1 <= run.xi_cos[-1] <= 1 and run.xi_ratio[-1] > 0
    text = ka.write_outputs(bench, tmp_path)
    assert "| pFedSeq" in text and "not run: personalization is client-side" in text
    assert {p.name for p in tmp_path.iterdir()} == {"table.md", "metrics.json", "metrics.csv", "known_answer.png"}


def test_every_analytic_client_runs_its_method(tiny_vit):
    settings = ka.Settings(clients=3, rounds=2, model=tiny_vit, noise=1.0)
    bench = ka.run_benchmark(settings, None, seeds=[0], progress=False, overrides=["algorithm_args.warmup_rounds=1"])
    assert set(bench.methods) | set(bench.not_run) == {m.name for m in METHODS.values()}
    for method in bench.methods:
        assert all(math.isfinite(v) and v >= 0 for v in bench.relative(bench.run_of(method, 0))), method


def test_the_shared_analytic_client_stands_only_for_fedavgs_client():
    """A method driven by the plain quadratic client must have FedAvg's client rule (only its shared parts may
    differ); the benchmark's lists name registered methods only (one it does not list is "not run", with the default
    reason)."""
    for name, client in ka.ANALYTIC_CLIENTS.items():
        real = method_class(name).Client
        if client is ka.QuadraticClient:
            assert all(getattr(real, m) is getattr(FedAvgClient, m) for m in ("receive", "train", "upload", "load",
                                                                             "evaluate")), name
    assert set(ka.ANALYTIC_CLIENTS) <= set(METHODS) and set(ka.NOT_RUN) <= set(METHODS) - set(ka.ANALYTIC_CLIENTS)


def test_overrides_go_to_the_methods_that_have_them(tiny_vit):
    settings = ka.Settings(model=tiny_vit)
    overrides = ["algorithm_args.learner_lr=0.01"]
    ka.check_overrides(overrides, ["FedAvg", "pFedSeq"])
    assert ka.method_recipe("pFedSeq", settings, 0, overrides).algorithm_args.learner_lr == 0.01
    ka.method_recipe("FedAvg", settings, 0, overrides)  # no such key: left out, not refused
    for bad in (["algorithm_args.no_such_key=1"], ["train_args.comm_round=3"], ["train_args.momentum=0.9"]):
        with pytest.raises(RecipeError):
            ka.check_overrides(bad, ["FedAvg", "pFedSeq"])


def test_a_diverging_method_is_a_row_of_the_table_not_a_crash(tiny_vit, tmp_path, monkeypatch):
    """A learner whose calibrations turn NaN in round 2 (the server raises FloatingPointError): its losses are inf
    from round 2 on, the table says which seed diverged where, and the other methods still run."""
    from fedml_pfedseq.strategies.pfedseq import PFedSeqServer

    def nan_in_round_2(self):
        if self.round == 2:
            raise FloatingPointError("NaN")
        return original(self)

    original = PFedSeqServer.calibrate
    monkeypatch.setattr(PFedSeqServer, "calibrate", nan_in_round_2)
    settings = ka.Settings(clients=3, rounds=3, model=tiny_vit)
    bench = ka.run_benchmark(settings, ["pFedSeq"], seeds=[0], progress=False,
                             overrides=["algorithm_args.warmup_rounds=1", "algorithm_args.seq_len=2"])
    run = bench.run_of("pFedSeq", 0)
    assert run.diverged == 2 and math.isfinite(run.losses[1]) and run.losses[2:] == [math.inf, math.inf]
    assert len(run.xi_ratio) == len(run.losses) == 4
    row = next(line for line in ka.write_outputs(bench, tmp_path).splitlines() if line.startswith("| pFedSeq"))
    assert "inf (diverged)" in row and "0: 2" in row
    assert math.isfinite(bench.run_of("FedAvg", 0).losses[-1])


@pytest.mark.slow
def test_seeds_in_worker_processes_give_the_one_process_numbers(tiny_vit):
    settings = ka.Settings(clients=3, rounds=3, clusters=2, lr=0.5, batches=1, model=tiny_vit)
    overrides = ["algorithm_args.warmup_rounds=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each worker runs on
    try:
        alone = ka.run_benchmark(settings, ["pFedSeq"], seeds=[0, 1], progress=False, overrides=overrides)
    finally:
        torch.set_num_threads(threads)
    parallel = ka.run_benchmark(settings, ["pFedSeq"], seeds=[0, 1], progress=False, overrides=overrides, workers=2)
    assert [(r.method, r.seed) for r in parallel.runs] == [(r.method, r.seed) for r in alone.runs]
    for a, b in zip(alone.runs, parallel.runs):
        assert (a.losses, a.xi_ratio, a.xi_cos, a.trained) == (b.losses, b.xi_ratio, b.xi_cos, b.trained)
    assert parallel.run_of("pFedSeq", 1).xi_ratio[-1] is not None  # calibrations were sent after warm-up
    with pytest.raises(RecipeError, match="workers must be >= 1"):
        ka.run_benchmark(settings, ["FedAvg"], seeds=[0], progress=False, workers=0)
