"""Known-answer personalization benchmark: quadratic clients on the real LoRA layout, every method's real server.

Why: accuracy on images cannot say how close a method gets to what each client should have; here that answer is
known. Client i's objective over the LoRA state theta (the dict the servers send as payload["lora"]: PEFT's names,
the tensors and shapes of the recipe's backbone with LoRA as the shipped recipes configure it) is

    L_i(theta) = 0.5 * sum_l ||theta_l - theta*_{i,l}||^2,
    theta*_i   = theta^0 + s * (a * u + c_{i mod K} + b * e_i),      u, c_k, e_i ~ N(0, I) per entry, seeded,

theta^0 being PEFT's init of that recipe's seed (A random, B = 0), so every optimum moves the A and the B entries.
u is what all clients share (what FedAvg can learn), c_k what the K clusters share (what personalization should
learn from the clients with the same optimum), e_i each client's own. Defaults: s = 0.01 per entry, a = 1, b = 0.3,
K = 4: a first local round moves entries by ~1e-3, inside real updates' 1e-4..1e-2 (modeling_seq_learner.py).

Clients are analytic: a "batch" is a gradient theta - theta*_i + sigma z with z ~ N(0, I) seeded by (seed, client,
round, batch), sigma = noise * s; a local epoch is ``batches`` such steps at train_args.learning_rate. They receive
and upload exactly what the method's real client does (its ``shared_parts``): LoRA deltas from training and, where
the head travels, zero head deltas (the problem has no head loss, so heads never move). Methods whose real client
is FedAvg's (FedAvg, FedAvgLocalHead, Local, pFedSeq, pFedHN, pFedLA, FedSA-LoRA) share one analytic client, which
keeps its own entries of the LoRA factors its method does not send (FedSA-LoRA's B); Ditto, pFedMe, Per-FedAvg (FO),
APPLE and FFA-LoRA (steps on the B entries only) get their client rule with L_i in place of the cross-entropy (same
batches, same steps, same kept state as their module says). Methods whose personalization needs images or a head
loss are listed as not run, with the reason. Everything on the server side is the method's own: servers are built by
``federation.build_server`` from the shipped ``recipes/omniglot_<method>.yaml`` (its algorithm_args, LoRA settings;
two adjusted, see ``benchmark_defaults``) with this benchmark's train_args, and driven as the simulator drives
them: ``initial_payloads``, the sampled clients of ``federation.participants``, ``round_close.screen`` and
``aggregate``. No method sees theta*: it only receives the uploads.

Measured per round t (0 = the initial payloads): the mean over all N clients of L_i at the adapter client i would
evaluate after receiving its latest payload (the payload's adapter; Ditto's and pFedMe's personal model; Per-FedAvg's
adapted model; APPLE's mix), and relative to the same seed's FedAvg and oracle (every client at theta*_i):
(L - L_oracle) / (L_FedAvg - L_oracle), 0 = oracle, 1 = FedAvg. For pFedSeq after warm-up, with xi_i = payload_i
- theta_g (theta_g: the server's global_state) and the ideal calibration theta*_i - theta_g, the means over clients
of ||xi_i|| / ||theta*_i - theta_g|| and cos(xi_i, theta*_i - theta_g).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import torch
from tqdm.auto import tqdm

from fedml_pfedseq.adapter_model import AdapterModel
from fedml_pfedseq.config import Recipe, RecipeError, apply_overrides, load_yaml, parse_recipe, warn_about
from fedml_pfedseq.data.federated import client_seed
from fedml_pfedseq.federation import build_model, build_server, participants
from fedml_pfedseq.lora_state import LayerLayout, StateDict, lora_factors
from fedml_pfedseq.results import format_table, write_csv
from fedml_pfedseq.round_close import screen
from fedml_pfedseq.shipped import RECIPES_DIR
from fedml_pfedseq.strategies import METHODS, method_class
from fedml_pfedseq.strategies.apple import initial_p, proximal_coefficient
from fedml_pfedseq.strategies.fedavg import Payload, Upload
from fedml_pfedseq.strategies.pfedseq import PFedSeqServer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NUM_LABELS = 10  # the head's size: it only travels (as zero deltas), the problem has no head loss
NUM_SAMPLES = 100  # every client's n_i: equal weights in every average
PROBLEM_PURPOSE, NOISE_PURPOSE, BATCH_SLOTS = 9001, 10**7, 10**5  # client_seed purposes (others use < 10^4)
EVAL_BATCH = BATCH_SLOTS - 1  # Per-FedAvg's adaptation batch at evaluation
TABLE_ROUND = 12
SET_BY_OPTIONS = {  # recipe keys the benchmark sets from its own options
    "train_args.federated_optimizer": "--methods", "train_args.client_num_in_total": "--clients",
    "train_args.client_num_per_round": "--per-round", "train_args.comm_round": "--rounds",
    "train_args.learning_rate": "--lr", "common_args.random_seed": "--seeds", "model_args.model": "--model"}
DEFAULT_NOT_RUN = "no analytic client for its client's upload format"  # a method not in ANALYTIC_CLIENTS
NOT_RUN = {  # why a registered method has no analytic client here, where more can be said than DEFAULT_NOT_RUN
    "fedrep": "personalization is client-side (a head fitted on images; no head loss here)",
    "perada": "personalization is client-side (it distils the global model's logits on images)",
    "fedala": "personalization is client-side (ALA's weights are learnt on images, by default over the head)",
    "pefll": "the client computes its descriptor from its images",
    "pfedlora": "personalization is client-side (its own backbone weights, trained on images)",
    "flora": "its global model is the merged product B A, which a loss on the LoRA entries does not see",
    "feddpa": "it mixes two adapters' outputs per instance by feature similarity; the problem has no instances",
}


@dataclass(frozen=True)
class Settings:
    """One instance of the problem and how its clients train (see the module docstring)."""

    clients: int = 8
    rounds: int = 40
    clusters: int = 4  # K
    scale: float = 0.01  # s: per-entry RMS of a cluster offset
    shared: float = 1.0  # a: RMS of the offset every client shares, in units of s
    spread: float = 0.3  # b: RMS of each client's own offset, in units of s
    noise: float = 0.0  # sigma / s: gradient noise per entry and batch
    lr: float = 0.05  # the clients' SGD rate (train_args.learning_rate)
    batches: int = 2  # gradient steps per local epoch
    per_round: int | None = None  # train_args.client_num_per_round (None: all)
    model: str = "vit-small-cifar10"


@dataclass
class Problem:
    """The clients' optima over the flat LoRA vector [D] (LayerLayout order) and their stochastic gradients."""

    layout: LayerLayout
    theta0: torch.Tensor  # [D]
    optima: torch.Tensor  # [N, D]
    sigma: float
    batches: int
    seed: int

    @property
    def num_clients(self) -> int:
        return self.optima.shape[0]

    def flat(self, state: StateDict) -> torch.Tensor:
        return torch.cat(self.layout.flatten(state))

    def state(self, flat: torch.Tensor) -> StateDict:
        return self.layout.unflatten(list(flat.split(self.layout.sizes)))

    def noise(self, client: int, round_idx: int, batch: int) -> torch.Tensor | float:
        """sigma z of one batch, the same whenever the same batch is drawn."""
        if self.sigma == 0:
            return 0.0
        purpose = NOISE_PURPOSE + round_idx * BATCH_SLOTS + batch
        generator = torch.Generator().manual_seed(client_seed(self.seed, client, purpose=purpose))
        return self.sigma * torch.randn(self.theta0.shape, generator=generator)

    def mean_loss(self, adapters: torch.Tensor) -> float:
        """mean_i L_i(adapters[i]), adapters [N, D], in float64."""
        return float(0.5 * (adapters.double() - self.optima.double()).pow(2).sum(1).mean())


def make_problem(theta0: StateDict, settings: Settings, seed: int) -> Problem:
    layout = LayerLayout.of(theta0)
    base = torch.cat(layout.flatten(theta0))  # [D]
    generator = torch.Generator().manual_seed(client_seed(seed, 0, purpose=PROBLEM_PURPOSE))
    n, k, d = settings.clients, settings.clusters, base.numel()
    shared = settings.shared * torch.randn(d, generator=generator)
    clusters = torch.randn(k, d, generator=generator)
    own = settings.spread * torch.randn(n, d, generator=generator)
    optima = base + settings.scale * (shared + clusters[torch.arange(n) % k] + own)  # [N, D]
    return Problem(layout, base, optima, settings.noise * settings.scale, settings.batches, seed)


class QuadraticClient:
    """FedAvgClient's protocol with L_i for the cross-entropy: holds the adapter it received (its own, where the
    method keeps the LoRA local; its own entries of the LoRA factors that do not travel), takes plain gradient steps
    and uploads the deltas of the parts its method shares."""

    def __init__(self, client_id: int, problem: Problem, recipe: Recipe):
        self.client_id, self.problem, self.recipe = client_id, problem, recipe
        self.shared_parts = method_class(recipe.train_args.federated_optimizer).Client.shared_parts
        self.adapter = problem.theta0.clone()  # [D]
        self.received: dict[str, StateDict] = {}

    def merged(self, lora: StateDict) -> torch.Tensor:
        """The adapter [D] with the entries ``lora`` holds replaced (all of them, unless some factors stay here)."""
        return self.problem.flat({**self.problem.state(self.adapter), **lora})

    @property
    def steps(self) -> int:
        """Batches per round: train_args.epochs local epochs of ``batches`` each."""
        return self.recipe.train_args.epochs * self.problem.batches

    def gradient(self, theta: torch.Tensor, round_idx: int, batch: int) -> torch.Tensor:
        return theta - self.problem.optima[self.client_id] + self.problem.noise(self.client_id, round_idx, batch)

    def sgd(self, theta: torch.Tensor, round_idx: int, steps: int, pull=None) -> torch.Tensor:
        """``steps`` SGD steps on L_i (+ a penalty whose gradient is ``pull(theta)``) over this round's batches."""
        lr = self.recipe.train_args.learning_rate
        for batch in range(steps):
            grad = self.gradient(theta, round_idx, batch)
            theta = theta - lr * (grad if pull is None else grad + pull(theta))
        return theta

    def receive(self, payload: Payload) -> None:
        self.received = {part: payload[part] for part in self.shared_parts}
        if "lora" in self.received:
            self.adapter = self.merged(self.received["lora"])

    def evaluated(self, payload: Payload, round_idx: int) -> torch.Tensor:
        """The adapter [D] this client evaluates once it receives ``payload`` (left as it is: pure)."""
        return self.merged(payload["lora"]) if "lora" in self.shared_parts else self.adapter

    def train(self, round_idx: int) -> Upload:
        self.adapter = self.sgd(self.adapter, round_idx, self.steps)
        return self.upload()

    def upload(self) -> Upload:
        """The shared parts' deltas w.r.t. what was received (zeros for the head) and n_i."""
        deltas = {part: {k: torch.zeros_like(v) for k, v in state.items()} for part, state in self.received.items()}
        if "lora" in self.received:
            trained = self.problem.state(self.adapter)
            deltas["lora"] = {k: trained[k] - sent for k, sent in self.received["lora"].items()}
        return {"client_id": self.client_id, "num_samples": NUM_SAMPLES, **deltas}


class FrozenAQuadraticClient(QuadraticClient):
    """FFA-LoRA (ffa_lora.py): the plain steps move the B entries only; the A entries stay at theta^0's."""

    def __init__(self, client_id: int, problem: Problem, recipe: Recipe):
        super().__init__(client_id, problem, recipe)
        theta0 = problem.state(problem.theta0)
        trained = lora_factors(theta0, ("B",))
        self.trainable = problem.flat({k: torch.full_like(v, float(k in trained)) for k, v in theta0.items()})  # [D]

    def gradient(self, theta: torch.Tensor, round_idx: int, batch: int) -> torch.Tensor:
        return self.trainable * super().gradient(theta, round_idx, batch)


class PersonalQuadraticClient(QuadraticClient):
    """A client that keeps a personal model beside the copy it uploads (personal_model.py): it starts as the first
    adapter received and is what the client evaluates."""

    personal: torch.Tensor | None = None

    def receive(self, payload: Payload) -> None:
        super().receive(payload)
        if self.personal is None:
            self.personal = self.adapter

    def evaluated(self, payload: Payload, round_idx: int) -> torch.Tensor:
        return super().evaluated(payload, round_idx) if self.personal is None else self.personal


class DittoQuadraticClient(PersonalQuadraticClient):
    """Ditto (ditto.py): the global copy by plain steps (uploaded), then the personal model by steps on
    L_i(v) + mu/2 ||v - w^t||^2 over the same batches, anchored at the w^t received."""

    def train(self, round_idx: int) -> Upload:
        anchor, args = self.adapter, self.recipe.algorithm_args
        upload = super().train(round_idx)
        steps = (args.personal_epochs or self.recipe.train_args.epochs) * self.problem.batches
        self.personal = self.sgd(self.personal, round_idx, steps, pull=lambda v: args.proximal_mu * (v - anchor))
        return upload


class PFedMeQuadraticClient(PersonalQuadraticClient):
    """pFedMe (pfedme.py): per batch, K steps on L_i(theta; batch) + lambda/2 ||theta - w||^2 from the last theta,
    then w <- w - eta lambda (w - theta); theta (kept) is evaluated, w's delta uploaded."""

    def train(self, round_idx: int) -> Upload:
        args, eta = self.recipe.algorithm_args, self.recipe.train_args.learning_rate
        lam, lr = args.pfedme_lambda, args.pfedme_personal_lr
        theta = w = self.adapter
        for batch in range(self.steps):
            noise = self.problem.noise(self.client_id, round_idx, batch)  # one batch for all K inner steps
            for _ in range(args.pfedme_k):
                theta = theta - lr * (theta - self.problem.optima[self.client_id] + noise + lam * (theta - w))
            w = w - eta * lam * (w - theta)
        self.personal, self.adapter = theta, w
        return self.upload()


class PerFedAvgQuadraticClient(QuadraticClient):
    """Per-FedAvg FO (perfedavg.py): ceil(steps / 2) pair-steps temp = theta - alpha g_D(theta),
    theta <- theta - beta g_D'(temp) on the meta-model; evaluates it after one alpha-step on a batch."""

    def evaluated(self, payload: Payload, round_idx: int) -> torch.Tensor:
        theta = super().evaluated(payload, round_idx)
        return theta - self.recipe.algorithm_args.perfedavg_alpha * self.gradient(theta, round_idx, EVAL_BATCH)

    def train(self, round_idx: int) -> Upload:
        alpha, beta = self.recipe.algorithm_args.perfedavg_alpha, self.recipe.train_args.learning_rate
        theta = self.adapter
        for pair in range(math.ceil(self.steps / 2)):
            temp = theta - alpha * self.gradient(theta, round_idx, 2 * pair)
            theta = theta - beta * self.gradient(temp, round_idx, 2 * pair + 1)
        self.adapter = theta
        return self.upload()


class AppleQuadraticClient(QuadraticClient):
    """APPLE (apple.py): SGD on its own core theta_i and its DR vector p_i (kept here) through the personalized
    w_i = sum_j p_ij theta_j, the received peers' cores fixed; uploads its core's delta."""

    def __init__(self, client_id: int, problem: Problem, recipe: Recipe):
        super().__init__(client_id, problem, recipe)
        self.p0 = initial_p(problem.num_clients)  # [N]
        self.p = self.p0.clone()
        self.peers: dict[int, dict] = {}

    def receive(self, payload: Payload) -> None:
        super().receive(payload)
        self.peers = payload["peers"]

    def cores(self, own: torch.Tensor, peers: dict[int, dict]) -> torch.Tensor:
        """[N, D]: row j client j's core, this client's row ``own``."""
        return torch.stack([own if j == self.client_id else self.problem.flat(peers[j]["lora"])
                            for j in range(self.problem.num_clients)])

    def evaluated(self, payload: Payload, round_idx: int) -> torch.Tensor:
        return self.p @ self.cores(self.problem.flat(payload["lora"]), payload["peers"])

    def train(self, round_idx: int) -> Upload:
        args, lr, i = self.recipe.algorithm_args, self.recipe.train_args.learning_rate, self.client_id
        coef = proximal_coefficient(round_idx, self.recipe.train_args.comm_round, args)
        cores = self.cores(self.adapter, self.peers)
        for batch in range(self.steps):
            grad = self.gradient(self.p @ cores, round_idx, batch)  # g at w_i [D]
            own = cores[i] - lr * self.p[i] * grad
            self.p = self.p - args.apple_p_lr * (cores @ grad + 2 * coef * (self.p - self.p0))
            cores[i] = own
        self.adapter = cores[i].clone()
        return self.upload()


ANALYTIC_CLIENTS: dict[str, type[QuadraticClient]] = {
    **{name: QuadraticClient for name in ("fedavg", "fedavglocalhead", "local", "pfedseq", "pfedhn", "pfedla",
                                           "fedsa-lora")},
    "ditto": DittoQuadraticClient, "pfedme": PFedMeQuadraticClient, "perfedavg": PerFedAvgQuadraticClient,
    "apple": AppleQuadraticClient, "ffa-lora": FrozenAQuadraticClient,
}


def calibration_stats(xi: torch.Tensor, ideal: torch.Tensor) -> tuple[float, float]:
    """Means over clients of ||xi_i|| / ||ideal_i|| and cos(xi_i, ideal_i); xi, ideal [N, D]."""
    xi, ideal = xi.double(), ideal.double()
    ratio = xi.norm(dim=1) / ideal.norm(dim=1)
    cos = (xi * ideal).sum(1) / (xi.norm(dim=1) * ideal.norm(dim=1))
    return float(ratio.mean()), float(cos.mean())


@dataclass
class MethodRun:
    """One method on one seed: per round 0..T the mean client loss (and pFedSeq's calibration stats, None before
    any calibration); per round 1..T the clients that trained."""

    method: str
    seed: int
    losses: list[float] = field(default_factory=list)
    xi_ratio: list[float | None] = field(default_factory=list)
    xi_cos: list[float | None] = field(default_factory=list)
    trained: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    diverged: int | None = None  # the round whose aggregate raised FloatingPointError (losses inf from there on)

    def record(self, problem: Problem, clients: list[QuadraticClient], payloads: dict[int, Payload], server,
               round_idx: int) -> None:
        self.losses.append(problem.mean_loss(torch.stack([c.evaluated(payloads[c.client_id], round_idx)
                                                          for c in clients])))
        calibrated = (isinstance(server, PFedSeqServer) and server.args.global_aggregation
                      and server.calibrations is not None)
        ratio = cos = None
        if calibrated:
            theta_g = problem.flat(server.global_state["lora"])
            xi = torch.stack([problem.flat(payloads[i]["lora"]) for i in range(problem.num_clients)]) - theta_g
            ratio, cos = calibration_stats(xi, problem.optima - theta_g)
        self.xi_ratio.append(ratio)
        self.xi_cos.append(cos)


def run_method(recipe: Recipe, model: AdapterModel, problem: Problem, bar=None) -> MethodRun:
    """The method's real server, built as the simulator builds it, driven round by round as the simulator does."""
    started = time.perf_counter()
    name, n = method_class(recipe.train_args.federated_optimizer).name, problem.num_clients
    server = build_server(recipe, model, n)
    clients = [ANALYTIC_CLIENTS[name.lower()](i, problem, recipe) for i in range(n)]
    run = MethodRun(name, problem.seed)
    payloads = server.initial_payloads()
    run.record(problem, clients, payloads, server, 0)
    for t in range(1, recipe.train_args.comm_round + 1):
        sampled = participants(recipe, n, t)
        uploads = {}
        for i in sampled:
            clients[i].receive(payloads[i])
            uploads[i] = clients[i].train(t)
        uploads, _ = screen(server, uploads, t, recipe.train_args.min_uploads_per_round)
        run.trained.append(sampled)
        try:
            payloads = server.aggregate(uploads)
        except FloatingPointError:  # a diverged method is a result: the table says where
            run.diverged = t
            missing = recipe.train_args.comm_round + 1 - len(run.losses)
            run.losses += [math.inf] * missing
            run.xi_ratio += [None] * missing
            run.xi_cos += [None] * missing
            if bar is not None:
                bar.update(missing)
            break
        run.record(problem, clients, payloads, server, t)
        if bar is not None:
            bar.update()
    run.seconds = time.perf_counter() - started
    return run


@functools.lru_cache(maxsize=1)
def shipped_recipes() -> dict[str, Path]:
    """recipes/omniglot_*.yaml by method (lower-case name), read once per process (every method and seed asks)."""
    out = {}
    for path in sorted(RECIPES_DIR.glob("omniglot_*.yaml")):
        out.setdefault(load_yaml(path)["train_args"]["federated_optimizer"].lower(), path)
    return out


def check_overrides(overrides: list[str], methods: list[str]) -> None:
    """RecipeError for an override of a key the benchmark's options set, for plain-SGD settings the analytic clients
    would ignore, or for algorithm_args keys no selected method has."""
    for item in overrides:
        dotted = item.split("=", 1)[0]
        if dotted in SET_BY_OPTIONS:
            raise RecipeError(f"--set {item}: the benchmark sets {dotted} from {SET_BY_OPTIONS[dotted]}")
        if dotted in ("train_args.momentum", "train_args.weight_decay"):
            raise RecipeError(f"--set {item}: the analytic clients take plain gradient steps")
        section, _, key = dotted.partition(".")
        if section == "algorithm_args" and not any(key in accepts(m) for m in methods):
            raise RecipeError(f"--set {item}: none of the methods {methods} has algorithm_args.{key}")


def accepts(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(method_class(method).Args)}


def benchmark_defaults(method: str, settings: Settings) -> list[str]:
    """Where a shipped recipe's setting would not mean on this problem what it means on images (--set wins)."""
    return {
        # distinct random cores would start APPLE at another A than theta^0, which the optima are anchored on: that
        # would measure APPLE's starting offset, not its personalization
        "apple": ["algorithm_args.apple_core_init=shared"],
        # the shipped recipe's inner rate is its train_args.learning_rate ("the recipe's SGD rate"): keep the tie
        "pfedme": [f"algorithm_args.pfedme_personal_lr={settings.lr}"],
    }.get(method.lower(), [])


def method_recipe(method: str, settings: Settings, seed: int, overrides: list[str]) -> Recipe:
    """The shipped recipe of ``method`` (algorithm_args, LoRA settings) with this benchmark's train_args, and the
    overrides that apply to it (algorithm_args keys only where the method has them)."""
    name = method_class(method).name
    path = shipped_recipes().get(name.lower())
    raw = load_yaml(path) if path else {}
    ours = [f"train_args.federated_optimizer={name}", f"train_args.client_num_in_total={settings.clients}",
            f"train_args.client_num_per_round={settings.per_round if settings.per_round else 'null'}",
            f"train_args.comm_round={settings.rounds}", f"train_args.learning_rate={settings.lr}",
            f"common_args.random_seed={seed}", f"model_args.model={settings.model}", "device_args.using_gpu=false",
            *benchmark_defaults(name, settings)]
    mine = [o for o in overrides if not o.startswith("algorithm_args.")
            or o.split("=", 1)[0].removeprefix("algorithm_args.") in accepts(name)]
    recipe = parse_recipe(apply_overrides(raw, ours + mine), where=f"known-answer {name} ({path or 'defaults'})")
    recipe.label = f"known-answer {name}"
    warn_about(recipe)
    return recipe


@dataclass
class Benchmark:
    settings: Settings
    seeds: list[int]
    overrides: list[str]
    methods: list[str]  # run, FedAvg first
    not_run: dict[str, str]
    runs: list[MethodRun] = field(default_factory=list)  # "oracle" too
    seconds: float = 0.0

    def run_of(self, method: str, seed: int) -> MethodRun:
        return next(r for r in self.runs if r.method == method and r.seed == seed)

    def relative(self, run: MethodRun) -> list[float]:
        """(L - L_oracle) / (L_FedAvg - L_oracle) per round, against the same seed's references."""
        fedavg, oracle = self.run_of("FedAvg", run.seed).losses, self.run_of("oracle", run.seed).losses
        return [(m - o) / (f - o) if f != o else math.nan for m, f, o in zip(run.losses, fedavg, oracle)]


def select_methods(methods: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """(the methods to run, FedAvg first; the others with why they are not run); None: every registered method."""
    names = [method_class(m).name for m in methods] if methods else [m.name for m in METHODS.values()]
    names = ["FedAvg", *dict.fromkeys(n for n in names if n != "FedAvg")]
    run = [n for n in names if n.lower() in ANALYTIC_CLIENTS]
    skipped = {n: NOT_RUN.get(n.lower(), DEFAULT_NOT_RUN)
               for n in names if n not in run}
    return run, skipped


def run_seed(settings: Settings, seed: int, methods: list[str], overrides: list[str], bar=None) -> list[MethodRun]:
    """One seed's instance (shared by all methods): its oracle, then each method's run."""
    recipes = {m: method_recipe(m, settings, seed, overrides) for m in methods}
    layouts = {m: r.model_args for m, r in recipes.items()}
    if any(a != layouts["FedAvg"] for a in layouts.values()):
        raise RecipeError(f"the methods' recipes give different LoRA layouts: {layouts}")
    model = build_model(recipes["FedAvg"], NUM_LABELS)
    problem = make_problem(model.get_lora_state(), settings, seed)
    nothing = [None] * (settings.rounds + 1)
    runs = [MethodRun("oracle", seed, losses=[problem.mean_loss(problem.optima)] * (settings.rounds + 1),
                      xi_ratio=nothing, xi_cos=nothing)]
    for method in methods:
        if bar is not None:
            bar.set_postfix(seed=seed, method=method)
        runs.append(run_method(recipes[method], model, problem, bar))
    return runs


def _run_seed_alone(settings: Settings, seed: int, methods: list[str], overrides: list[str]) -> list[MethodRun]:
    """``run_seed`` in a worker process, on one torch thread (as the benchmark's default ``--threads 1``)."""
    torch.set_num_threads(1)
    return run_seed(settings, seed, methods, overrides)


def run_benchmark(settings: Settings, methods: list[str] | None = None, seeds: list[int] = (0,),
                  overrides: list[str] = (), progress: bool = True, workers: int = 1) -> Benchmark:
    """Every selected method on every seed's instance; with ``workers`` > 1 the seeds run in that many processes
    at once (one torch thread each; the same numbers as one process at one thread)."""
    if workers < 1:
        raise RecipeError(f"workers must be >= 1, got {workers}")
    started = time.perf_counter()
    run, skipped = select_methods(methods)
    overrides = list(overrides)
    check_overrides(overrides, run)
    bench = Benchmark(settings, list(seeds), overrides, run, skipped)
    if workers == 1:
        with tqdm(total=len(seeds) * len(run) * settings.rounds, desc="known-answer", unit="round",
                  disable=not progress) as bar:
            for seed in seeds:
                bench.runs += run_seed(settings, seed, run, overrides, bar)
    else:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state shared with this one
        with ProcessPoolExecutor(workers, mp_context=context) as pool, \
                tqdm(total=len(seeds), desc="known-answer", unit="seed", disable=not progress) as bar:
            futures = [pool.submit(_run_seed_alone, settings, seed, run, overrides) for seed in seeds]
            for future in futures:  # in seed order, whichever finishes first
                bench.runs += future.result()
                bar.update()
    bench.seconds = time.perf_counter() - started
    return bench


def mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return ""
    if any(math.isinf(v) for v in values):
        return "inf (diverged)"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(bench: Benchmark) -> str:
    """Per method, mean ± std over seeds: the relative loss at round 12 and at the last round, its worst round,
    the absolute loss at the last round, pFedSeq's calibration stats at the last round, and seconds per seed."""
    last, early = bench.settings.rounds, min(TABLE_ROUND, bench.settings.rounds)
    headers = ["method", f"relative loss, round {early}", f"relative loss, round {last}", "worst round",
               f"mean loss, round {last}", f"||xi||/||theta*-theta_g||, round {last}",
               f"cos(xi, theta*-theta_g), round {last}", "seconds per seed", "diverged (seed: round)"]
    rows = []
    for method in ["oracle", *bench.methods]:
        runs = [bench.run_of(method, seed) for seed in bench.seeds]
        rel = [bench.relative(r) for r in runs]
        rows.append([method, mean_std([r[early] for r in rel]), mean_std([r[last] for r in rel]),
                     mean_std([max(r[1:]) for r in rel]), mean_std([r.losses[last] for r in runs], 4),
                     mean_std([r.xi_ratio[last] for r in runs]), mean_std([r.xi_cos[last] for r in runs]),
                     mean_std([r.seconds for r in runs], 1),
                     ", ".join(f"{r.seed}: {r.diverged}" for r in runs if r.diverged is not None)])
    rows += [[method, f"not run: {reason}", *[""] * (len(headers) - 2)] for method, reason in bench.not_run.items()]
    return format_table(headers, rows)


def metric_rows(bench: Benchmark) -> list[dict]:
    """One row per (seed, method, round)."""
    rows = []
    for run in bench.runs:
        for t, (loss, rel) in enumerate(zip(run.losses, bench.relative(run))):
            rows.append({"seed": run.seed, "method": run.method, "round": t, "mean_loss": loss, "relative": rel,
                         "xi_ratio": run.xi_ratio[t], "xi_cos": run.xi_cos[t],
                         "trained": len(run.trained[t - 1]) if 0 < t <= len(run.trained) else None})
    return rows


def plot(bench: Benchmark, path: Path) -> None:
    """Relative loss per round (mean over seeds, min-max band), and pFedSeq's calibration stats."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    rounds = list(range(bench.settings.rounds + 1))
    left.axhline(0.0, color="black", linestyle="--", linewidth=1, label="oracle")
    left.axhline(1.0, color="black", linestyle=":", linewidth=1, label="FedAvg")
    colors = iter(plt.get_cmap("tab20").colors)
    for method in bench.methods[1:]:
        curves = torch.tensor([bench.relative(bench.run_of(method, s)) for s in bench.seeds])  # [seeds, T + 1]
        color = next(colors)
        left.plot(rounds, curves.mean(0), label=method, color=color)
        left.fill_between(rounds, curves.min(0).values, curves.max(0).values, color=color, alpha=0.15)
    left.set(xlabel="round", ylabel="(L - L_oracle) / (L_FedAvg - L_oracle)", title="mean client loss, relative")
    left.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    if "pFedSeq" in bench.methods:
        for key, label in (("xi_ratio", "||xi|| / ||theta* - theta_g||"), ("xi_cos", "cos(xi, theta* - theta_g)")):
            curves = [[math.nan if v is None else v for v in getattr(bench.run_of("pFedSeq", s), key)]
                      for s in bench.seeds]
            right.plot(rounds, torch.tensor(curves).mean(0), label=label)
        right.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        right.legend(fontsize="small")
    right.set(xlabel="round", title="pFedSeq's xi vs theta* - theta_g (mean over clients, seeds)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(bench: Benchmark, out: Path) -> str:
    """metrics.json (settings, every run), metrics.csv, table.md and known_answer.png under ``out``; returns the
    table."""
    out.mkdir(parents=True, exist_ok=True)
    text = table(bench)
    (out / "table.md").write_text(text + "\n")
    (out / "metrics.json").write_text(json.dumps({
        "settings": dataclasses.asdict(bench.settings), "seeds": bench.seeds, "overrides": bench.overrides,
        "methods": bench.methods, "not_run": bench.not_run, "seconds": bench.seconds,
        "runs": [dataclasses.asdict(r) for r in bench.runs]}, indent=1))
    write_csv(out / "metrics.csv", metric_rows(bench))
    plot(bench, out / "known_answer.png")
    return text
