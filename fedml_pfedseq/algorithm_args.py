"""The ``algorithm_args`` section of a recipe: one dataclass per method with settings of its own.

Apart from the strategies (as transformers keeps a model's configuration apart from its modeling code), so that
reading and checking a recipe (``pfedseq check``, ``pfedseq keys``) imports no torch. The strategy files stay the one
list of methods: ``ALGORITHM_ARGS`` is read from each one's ``METHOD = Method("Name", Server, Client, Args=...)``
line without importing it (``registered_methods``).
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, is_dataclass
from pathlib import Path

from fedml_pfedseq.config import Recipe, RecipeError, recipe_key

SCHEDULERS = ("cosine", "exponential")  # APPLE's lambda(r)
CORE_INITS = ("distinct", "shared")  # APPLE's cores
# pFedSeq's learner: fedml_pfedseq.models.seq_learner.ARCHITECTURES, which imports transformers (a test keeps the
# two equal)
LEARNER_ARCHITECTURES = ("mamba", "mlp", "lstm")
# pFedSeq's recipe key -> the SeqLearnerConfig argument it sets (the model package cannot import recipes; a test keeps
# each default equal to the config's)
LEARNER_CONFIG_KEYS = {
    "seq_len": "max_seq_len", "learner_architecture": "architecture", "cross_client": "cross_client",
    "num_blocks": "num_blocks", "state_size": "state_size", "expand": "expand", "conv_kernel": "conv_kernel",
    "learner_hidden_size": "hidden_size", "output_scale_init": "output_scale_init",
    "learner_magnitude_preserving": "magnitude_preserving", "client_mixing_rank": "mixing_rank",
    "learner_memory": "memory", "learner_memory_decay": "memory_decay",
}
LEARNER_OBJECTIVES = ("proxy", "proximal")


@dataclass
class AppleArgs:
    """``algorithm_args`` of APPLE; the core model's learning rate is train_args.learning_rate."""

    apple_p_lr: float = recipe_key(0.001, "learning rate of the DR vector p_i (official lr_coef)")
    apple_mu: float = recipe_key(0.1, "mu of the proximal term on p_i (official mu; penalty lambda mu ||p - p0||^2)")
    apple_scheduler: str = recipe_key("exponential", "shape of lambda(r): 'cosine' or 'exponential' (official default)")
    apple_reg_rounds_fraction: float = recipe_key(0.1, "lambda > 0 in the first int(comm_round * this) rounds "
                                                       "(official)")
    apple_core_init: str = recipe_key("distinct", "'distinct': one fresh core per client (official); 'shared': theta^0 "
                                                  "for all")

    def __post_init__(self):
        checks = {
            "apple_p_lr": (math.isfinite(self.apple_p_lr) and self.apple_p_lr > 0, "must be a finite number > 0"),
            "apple_mu": (math.isfinite(self.apple_mu) and self.apple_mu >= 0, "must be a finite number >= 0"),
            "apple_scheduler": (self.apple_scheduler in SCHEDULERS, f"must be one of {list(SCHEDULERS)}"),
            "apple_reg_rounds_fraction": (0 <= self.apple_reg_rounds_fraction <= 1, "must be in [0, 1]"),
            "apple_core_init": (self.apple_core_init in CORE_INITS, f"must be one of {list(CORE_INITS)}"),
        }
        for key, (ok, rule) in checks.items():
            if not ok:
                raise RecipeError(f"algorithm_args.{key} {rule}, got {getattr(self, key)!r}")


def check_at_least_one(args, keys: tuple[str, ...]) -> None:
    """Keys that count something (layers, widths, rounds) are >= 1."""
    for key in keys:
        if getattr(args, key) < 1:
            raise RecipeError(f"algorithm_args.{key} must be >= 1, got {getattr(args, key)}")


def check_personal_args(args, prefix: str) -> None:
    """The keys Ditto and PerAda share: ``<prefix>_lambda`` >= 0, ``<prefix>_personal_epochs`` >= 1 or null."""
    lam, epochs = getattr(args, f"{prefix}_lambda"), getattr(args, f"{prefix}_personal_epochs")
    if lam < 0:
        raise RecipeError(f"algorithm_args.{prefix}_lambda must be >= 0, got {lam}")
    if epochs is not None and epochs < 1:
        raise RecipeError(f"algorithm_args.{prefix}_personal_epochs must be >= 1 or null, got {epochs}")


@dataclass
class DittoArgs:
    """``algorithm_args`` of Ditto."""

    ditto_lambda: float = recipe_key(1.0, "lambda of the proximal term (official scripts: 1; the paper tunes it per "
                                          "data set)")
    ditto_personal_epochs: int | None = recipe_key(None, "passes of the personal model per round; null: "
                                                         "train_args.epochs")

    def __post_init__(self):
        check_personal_args(self, "ditto")

    @property
    def proximal_mu(self) -> float:
        """``proximal_term``'s mu: Ditto's penalty is lambda/2 ||v - w||^2, its gradient lambda (v - w)."""
        return self.ditto_lambda

    @property
    def personal_epochs(self) -> int | None:
        return self.ditto_personal_epochs


class OwnGradientSteps:
    """Args of a method whose client also takes gradient steps of its own (``torch.autograd.grad``) outside the
    shared training loop, which alone scales the loss for fp16: such a method refuses fp16 (bf16 needs no scaling)."""

    def check_recipe(self, recipe: Recipe) -> None:
        if recipe.device_args.mixed_precision == "fp16":
            raise RecipeError(f"device_args.mixed_precision fp16 needs loss scaling, which "
                              f"{recipe.train_args.federated_optimizer}'s own gradient steps do not do; use bf16 (same "
                              "speed where the GPU has it) or fp32")


@dataclass
class FedALAArgs(OwnGradientSteps):
    """``algorithm_args`` of FedALA (defaults: the official code's, except the start-phase bound)."""

    fedala_eta: float = recipe_key(1.0, "learning rate of W")
    fedala_rand_percent: float = recipe_key(80.0, "% of the training samples that W is learned on, each round")
    fedala_layer_idx: int = recipe_key(2, "trainable tensors from the end that ALA mixes (2: the head's weight and "
                                          "bias)")
    fedala_threshold: float = recipe_key(0.1, "start phase ends when the std of the recent epoch losses is below this")
    fedala_num_pre_loss: int = recipe_key(10, "how many recent epoch losses that std is over")
    fedala_max_start_epochs: int = recipe_key(100, "bound on the start phase's epochs (ours; the official loop has "
                                                   "none)")

    def __post_init__(self):
        checks = {
            "fedala_eta": (self.fedala_eta > 0, "must be > 0"),
            "fedala_rand_percent": (0 < self.fedala_rand_percent <= 100, "must be in (0, 100]"),
            "fedala_layer_idx": (self.fedala_layer_idx >= 1, "must be >= 1"),
            "fedala_threshold": (self.fedala_threshold >= 0, "must be >= 0"),
            "fedala_num_pre_loss": (self.fedala_num_pre_loss >= 1, "must be >= 1"),
            "fedala_max_start_epochs": (self.fedala_max_start_epochs >= 1, "must be >= 1"),
        }
        for key, (ok, rule) in checks.items():
            if not ok:
                raise RecipeError(f"algorithm_args.{key} {rule}, got {getattr(self, key)}")


@dataclass
class NoArgs:
    """This method has no algorithm_args."""


@dataclass
class FedAvgLocalHeadArgs:
    """``algorithm_args`` of FedAvg with local heads (pFedSeq's no-calibration control)."""

    oracle_clusters: bool = recipe_key(False, "average the adapter only within each data cluster (client i in "
                                              "cluster i mod K of data_args.cluster_transforms): an oracle told the "
                                              "clusters, a reference for cluster-level adapter personalization; not "
                                              "a method of the paper")

    def check_recipe(self, recipe: Recipe) -> None:
        if self.oracle_clusters and not recipe.data_args.cluster_transforms:
            raise RecipeError("algorithm_args.oracle_clusters needs data_args.cluster_transforms (the clusters it is "
                              "told)")


@dataclass
class FedDPAArgs:
    """``algorithm_args`` of FedDPA (defaults: the paper's code, Lydia-yang/FedDPA)."""

    local_weight: float = recipe_key(0.5, "a: the global adapter's weight while the local adapter trains (the local "
                                          "one's is 1 - a)")
    instance_weight_scale: float = recipe_key(0.5, "w: an instance's local weight is w times its mean cosine "
                                                   "similarity to the reference instances")
    reference_instances: int = recipe_key(5, "k: training instances drawn at random for each evaluated instance")

    def __post_init__(self):
        where = "algorithm_args"
        for name in ("local_weight", "instance_weight_scale"):
            if not 0 <= getattr(self, name) <= 1:
                raise RecipeError(f"{where}.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.reference_instances < 1:
            raise RecipeError(f"{where}.reference_instances must be >= 1, got {self.reference_instances}")


@dataclass
class FedRepArgs:
    """``algorithm_args`` of FedRep (the adapter's epochs are train_args.epochs)."""

    fedrep_head_epochs: int = recipe_key(10, "tau_h, head epochs before the adapter epochs (reference code's default)")

    def __post_init__(self):
        if self.fedrep_head_epochs < 1:
            raise RecipeError(f"algorithm_args.fedrep_head_epochs must be >= 1, got {self.fedrep_head_epochs}")


@dataclass
class PFedHNArgs:
    """``algorithm_args`` of pFedHN (official defaults unless noted)."""

    hn_embedding_dim: int = recipe_key(6, "E: the hypernetwork's input per client (official: 1 + N/4, here N = 20)")
    hn_hidden_dim: int = recipe_key(100, "trunk width")
    hn_num_hidden: int = recipe_key(3, "trunk hidden layers (ReLU + Linear each, after the input Linear)")
    hn_lr: float = recipe_key(1e-3, "Adam (pFedSeq paper, for all hypernetwork-based methods)")

    def __post_init__(self):
        check_at_least_one(self, ("hn_embedding_dim", "hn_hidden_dim"))
        if self.hn_num_hidden < 0:
            raise RecipeError(f"algorithm_args.hn_num_hidden must be >= 0, got {self.hn_num_hidden}")
        if not self.hn_lr > 0:
            raise RecipeError(f"algorithm_args.hn_lr must be > 0, got {self.hn_lr}")


@dataclass
class PeFLLArgs(PFedHNArgs):
    """``algorithm_args`` of PeFLL: pFedHN's (hn_embedding_dim is the descriptor's size) plus the embedding
    network's, PeFLL's MLP embedder defaults."""

    pefll_embed_hidden_dim: int = recipe_key(20, "width of the embedding network's hidden layers")
    pefll_embed_layers: int = recipe_key(3, "Linear layers of the embedding network")

    def __post_init__(self):
        super().__post_init__()
        check_at_least_one(self, ("pefll_embed_hidden_dim", "pefll_embed_layers"))


@dataclass
class PerAdaArgs:
    """``algorithm_args`` of PerAda."""

    perada_lambda: float = recipe_key(1.0, "lambda of lambda ||v - w||^2 (official CIFAR-10 / CheXpert scripts)")
    perada_kd_weight: float = recipe_key(1.0, "beta: weight of the distillation term")
    perada_kd_temperature: float = recipe_key(1.0, "T (official default)")
    perada_personal_epochs: int | None = recipe_key(None, "passes of the personal model per round; null: "
                                                          "train_args.epochs")

    def __post_init__(self):
        check_personal_args(self, "perada")
        if self.perada_kd_weight < 0:
            raise RecipeError(f"algorithm_args.perada_kd_weight must be >= 0, got {self.perada_kd_weight}")
        if self.perada_kd_temperature <= 0:
            raise RecipeError(f"algorithm_args.perada_kd_temperature must be > 0, got {self.perada_kd_temperature}")

    @property
    def proximal_mu(self) -> float:
        """``proximal_term``'s mu: PerAda's penalty lambda ||v - w||^2 has gradient 2 lambda (v - w)."""
        return 2 * self.perada_lambda

    @property
    def personal_epochs(self) -> int | None:
        return self.perada_personal_epochs


@dataclass
class PerFedAvgArgs(OwnGradientSteps):
    """``algorithm_args`` of Per-FedAvg (FO); beta, the outer step, is train_args.learning_rate."""

    perfedavg_alpha: float = recipe_key(0.01, "inner (adaptation) step size; FLGo's default")

    def __post_init__(self):
        if not (math.isfinite(self.perfedavg_alpha) and self.perfedavg_alpha > 0):
            raise RecipeError(f"algorithm_args.perfedavg_alpha must be a finite number > 0, got {self.perfedavg_alpha}")


@dataclass
class PFedLAArgs:
    """``algorithm_args`` of pFedLA."""

    pfedla_hn_lr: float = recipe_key(1e-3, "Adam (pFedSeq paper, hypernetwork baselines)")
    pfedla_embedding_dim: int = recipe_key(100, "E, each client's embedding (reference code)")
    pfedla_hidden_dim: int = recipe_key(100, "H, the MLP's width (reference code)")

    def __post_init__(self):
        if not self.pfedla_hn_lr > 0:
            raise RecipeError(f"algorithm_args.pfedla_hn_lr must be > 0, got {self.pfedla_hn_lr}")
        check_at_least_one(self, ("pfedla_embedding_dim", "pfedla_hidden_dim"))


@dataclass
class PFedLoRAArgs:
    """``algorithm_args`` of pFedLoRA; the adapter phase uses train_args.epochs and learning_rate."""

    pfedlora_model_epochs: int = recipe_key(1, "epochs of the local-model phase (adapter frozen)")
    pfedlora_model_lr: float = recipe_key(0.05, "SGD rate of the local-model phase: every backbone weight moves")

    def __post_init__(self):
        if self.pfedlora_model_epochs < 1:
            raise RecipeError(f"algorithm_args.pfedlora_model_epochs must be >= 1, got {self.pfedlora_model_epochs}")
        if not (math.isfinite(self.pfedlora_model_lr) and self.pfedlora_model_lr > 0):
            raise RecipeError(f"algorithm_args.pfedlora_model_lr must be a finite number > 0, "
                              f"got {self.pfedlora_model_lr}")


@dataclass
class PFedMeArgs(OwnGradientSteps):
    """``algorithm_args`` of pFedMe; eta, the rate of the local-model update, is train_args.learning_rate."""

    pfedme_lambda: float = recipe_key(1.0, "lambda of the Moreau envelope (official 15 at eta 0.005; here eta * lambda "
                                           "= 0.5)")
    pfedme_k: int = recipe_key(5, "K, gradient steps on each inner problem (official default)")
    pfedme_personal_lr: float = recipe_key(0.5, "rate of the inner steps (official personal_learning_rate; here the "
                                                "recipe's lr)")
    pfedme_beta: float = recipe_key(1.0, "server mixing: w <- (1 - beta) w + beta avg (official default; FedAvg at 1)")

    def __post_init__(self):
        checks = {
            "pfedme_lambda": (math.isfinite(self.pfedme_lambda) and self.pfedme_lambda > 0, "a finite number > 0"),
            "pfedme_k": (self.pfedme_k >= 1, "an integer >= 1"),
            "pfedme_personal_lr": (math.isfinite(self.pfedme_personal_lr) and self.pfedme_personal_lr > 0,
                                   "a finite number > 0"),
            "pfedme_beta": (math.isfinite(self.pfedme_beta) and self.pfedme_beta > 0, "a finite number > 0"),
        }
        for key, (ok, rule) in checks.items():
            if not ok:
                raise RecipeError(f"algorithm_args.{key} must be {rule}, got {getattr(self, key)}")
        if self.pfedme_personal_lr * self.pfedme_lambda >= 2:
            raise RecipeError(f"algorithm_args.pfedme_personal_lr * pfedme_lambda must be < 2 (the inner steps "
                              f"diverge otherwise), got {self.pfedme_personal_lr} * {self.pfedme_lambda}")

    def check_recipe(self, recipe: Recipe) -> None:
        """What depends on train_args as well (parse_recipe calls this): eta * lambda < 1, and plain gradient steps
        (no momentum, no decay), and no fp16."""
        super().check_recipe(recipe)
        eta, lam = recipe.train_args.learning_rate, self.pfedme_lambda
        if eta * lam >= 1:
            raise RecipeError(f"train_args.learning_rate * algorithm_args.pfedme_lambda must be < 1 (pFedMe's local "
                              f"update w <- w - eta lambda (w - theta) overshoots theta otherwise), got {eta} * {lam}")
        for key in ("momentum", "weight_decay"):
            if getattr(recipe.train_args, key) != 0:
                raise RecipeError(f"train_args.{key} must be 0 for pFedMe (its steps are plain gradient steps), "
                                  f"got {getattr(recipe.train_args, key)}")


@dataclass
class PFedSeqArgs:
    """``algorithm_args`` of pFedSeq. Defaults are the paper's where it states them (W, Adam lr, M, 2 blocks)."""

    warmup_rounds: int = recipe_key(10, "W: rounds that send only the global adapter while the learner trains")
    seq_len: int = recipe_key(10, "L: rounds of history the learner reads (paper tunes 5..30); variant B is 1")
    learner_lr: float = recipe_key(1e-3, "Adam's learning rate of the learner psi")
    learner_architecture: str = recipe_key("mamba", "'mamba' (paper), 'mlp' (variant D), 'lstm' (variant E)")
    global_aggregation: bool = recipe_key(True, "False: variant A, the learner outputs the adapters themselves")
    cross_client: bool = recipe_key(True, "False: variant C, each client's own history only")
    num_blocks: int = recipe_key(2, "Mamba blocks (MLP hidden layers, LSTM layers)")
    state_size: int = recipe_key(16, "M")
    expand: int = recipe_key(2, "E inside a Mamba block")
    conv_kernel: int = recipe_key(4, "width of the Mamba block's causal convolution over rounds")
    learner_hidden_size: int = recipe_key(64, "MLP / LSTM width")
    output_scale_init: float = recipe_key(0.1, "an untrained learner's calibration, as a fraction of an update's RMS")
    norm_momentum: float = recipe_key(0.9, "running mean square of updates per layer (the input normaliser)")
    d_chunk: int | None = recipe_key(2048, "adapter parameters per learner pass (bounds memory; None: a layer at once)")
    # beyond the paper (strategies/pfedseq.py's docstring); the defaults are the paper's
    learner_magnitude_preserving: bool = recipe_key(
        True, "the learner's output scales with its input (false: the channel-normalised learner of older runs)")
    learner_objective: str = recipe_key(
        "proxy", "'proxy' (eq. 5: -<xi, Delta>) or 'proximal' (regress xi onto what was sent + Delta)")
    learner_steps: int = recipe_key(1, "Adam steps per round, each on a random 1/K of every layer's rows")
    client_mixing_rank: int | None = recipe_key(
        None, "R: the learner reads R learned mixtures of the clients' channels (cost ~ N R, for hundreds of "
        "clients); null: one channel per client (the paper's)")
    learner_memory: bool = recipe_key(
        False, "the learner also reads the calibration it output last and adds to it: xi^t = xi^{t-1} + "
        "f(window, xi^{t-1}), a per-entry state across rounds (false: xi^t from the window alone, the paper's)")
    learner_memory_decay: float = recipe_key(
        1.0, "rho in (0, 1]: the memory read is rho xi^{t-1}, so xi^t = rho xi^{t-1} + f(window, rho xi^{t-1}) "
        "forgets at rate rho a round and stays within about f / (1 - rho) (1: keeps all)")
    train_during_warmup: bool = recipe_key(True, "false: train the learner only on rounds whose xi was sent")
    center_calibrations: bool = recipe_key(False, "remove each parameter's mean over clients from xi")
    calibration_bound: float | None = recipe_key(
        None, "cap each client's xi per layer at this RMS, in units of the updates' RMS (null: no cap)")

    def __post_init__(self):
        where = "algorithm_args"
        if self.warmup_rounds < 0:
            raise RecipeError(f"{where}.warmup_rounds must be >= 0, got {self.warmup_rounds}")
        check_at_least_one(self, ("seq_len", "num_blocks", "state_size", "expand", "conv_kernel",
                                  "learner_hidden_size"))
        if self.learner_architecture not in LEARNER_ARCHITECTURES:
            raise RecipeError(f"{where}.learner_architecture must be one of {LEARNER_ARCHITECTURES}, "
                              f"got {self.learner_architecture!r}")
        if self.learner_lr <= 0:
            raise RecipeError(f"{where}.learner_lr must be > 0, got {self.learner_lr}")
        if not 0 <= self.norm_momentum < 1:
            raise RecipeError(f"{where}.norm_momentum must be in [0, 1), got {self.norm_momentum}")
        if self.d_chunk is not None and self.d_chunk < 1:
            raise RecipeError(f"{where}.d_chunk must be >= 1 or null, got {self.d_chunk}")
        if self.learner_objective not in LEARNER_OBJECTIVES:
            raise RecipeError(f"{where}.learner_objective must be one of {LEARNER_OBJECTIVES}, "
                              f"got {self.learner_objective!r}")
        if self.learner_steps < 1:
            raise RecipeError(f"{where}.learner_steps must be >= 1, got {self.learner_steps}")
        if self.client_mixing_rank is not None and (self.client_mixing_rank < 1 or not self.cross_client):
            raise RecipeError(f"{where}.client_mixing_rank must be >= 1 or null, and needs cross_client: true; got "
                              f"{self.client_mixing_rank} with cross_client: {self.cross_client}")
        if not 0 < self.learner_memory_decay <= 1:
            raise RecipeError(f"{where}.learner_memory_decay must be in (0, 1], got {self.learner_memory_decay}")
        if self.learner_memory_decay != 1 and not self.learner_memory:
            raise RecipeError(f"{where}.learner_memory_decay={self.learner_memory_decay} needs "
                              "algorithm_args.learner_memory: true (it is the weight of the memory)")
        if self.calibration_bound is not None and not self.calibration_bound > 0:
            raise RecipeError(f"{where}.calibration_bound must be > 0 or null, got {self.calibration_bound}")
        if not self.global_aggregation and (self.center_calibrations or self.calibration_bound is not None):
            raise RecipeError(f"{where}: center_calibrations and calibration_bound act on a calibration added to "
                              "theta_g; variant A (global_aggregation: false) sends the learner's output as the "
                              "adapter")

    def learner_config(self, num_clients: int, num_adapter_layers: int) -> dict:
        """SeqLearnerConfig's arguments for a federation of ``num_clients`` with that many adapted layers."""
        return {"num_clients": num_clients, "num_adapter_layers": num_adapter_layers,
                **{argument: getattr(self, key) for key, argument in LEARNER_CONFIG_KEYS.items()}}

    def recipe_warnings(self, recipe: Recipe) -> list[str]:
        """A recipe that runs but never does what pFedSeq is for."""
        rounds = recipe.train_args.comm_round
        if rounds > self.warmup_rounds:
            return []
        return [f"train_args.comm_round ({rounds}) <= algorithm_args.warmup_rounds ({self.warmup_rounds}): no round "
                "sends a calibration, so this run is FedAvg with local heads; raise comm_round or lower warmup_rounds"]



STRATEGIES = Path(__file__).parent / "strategies"  # one module per method (fedml_pfedseq.strategies)


def registered_methods(folder: Path = STRATEGIES) -> dict[str, type]:
    """Each strategy module's method name -> its algorithm_args dataclass, in module order, read from the module's
    ``METHOD = Method(...)`` statement without importing it (the strategies import torch); ImportError naming the
    file for a module without one, or one whose name or ``Args`` cannot be read this way."""
    found: dict[str, type] = {}
    for path in sorted(folder.glob("*.py")):
        if path.name == "__init__.py":
            continue
        where = f"fedml_pfedseq/strategies/{path.name}"
        calls = [node.value for node in ast.parse(path.read_text(), str(path)).body
                 if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["METHOD"]
                 and isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "Method"]
        if len(calls) != 1:
            raise ImportError(f"{where} registers no method: a strategy module ends with one "
                              "METHOD = Method(name, Server, Client[, Args=...]) (docs/adding-a-method.md)")
        call = calls[0]
        if not (call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
            raise ImportError(f"{where}: Method's first argument must be the method's name as a string literal")
        name = call.args[0].value
        args = next((k.value for k in call.keywords if k.arg == "Args"), None)
        args_class = NoArgs if args is None else globals().get(ast.unparse(args))
        if not (isinstance(args_class, type) and is_dataclass(args_class)):
            raise ImportError(f"{where}: Args={ast.unparse(args)} is not a dataclass of fedml_pfedseq.algorithm_args, "
                              "where a method's algorithm_args are declared")
        if name.lower() in {known.lower() for known in found}:
            raise ImportError(f"{where} registers the method {name!r} a second time")
        found[name] = args_class
    return found


# train_args.federated_optimizer -> its algorithm_args, in the order `pfedseq keys` lists them
ALGORITHM_ARGS: dict[str, type] = registered_methods()


def method_name(name: str) -> str:
    """The method ``name`` (case-insensitive) as ALGORITHM_ARGS spells it."""
    for known in ALGORITHM_ARGS:
        if known.lower() == name.lower():
            return known
    raise KeyError(f"names an unknown method {name!r}; known: {list(ALGORITHM_ARGS)}")
