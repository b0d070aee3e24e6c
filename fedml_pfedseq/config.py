"""Recipes: one federated run described in FedML's YAML config format, checked before anything starts.

A recipe has FedML's sections (``common_args``, ``data_args``, ``model_args``, ``train_args``,
``validation_args``, ``device_args``, ``comm_args``, ``tracking_args``), ``hub_args`` (saving and pushing the
run's adapters) and ``algorithm_args`` for the keys of the method named by ``train_args.federated_optimizer``.
FedML flattens all sections into one ``args`` namespace, so every key name is unique across sections. Unknown or
mistyped keys, missing files and impossible values raise :class:`RecipeError` naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedml_pfedseq.data.transforms import CLUSTER_TRANSFORMS
from fedml_pfedseq.errors import UserError


class RecipeError(UserError, ValueError):
    """A recipe that cannot run; the message names the file, the key and what is wrong."""


def recipe_key(default: Any, meaning: str):
    """A recipe key: its default and what it means, which ``pfedseq keys`` prints (a list default is copied per
    recipe, as ``default_factory`` does)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": meaning})
    return field(default=default, metadata={"help": meaning})


def require(ok: bool, key: str, message: str) -> None:
    """A recipe rule: ``key`` (section.key) ``message`` unless ``ok``; parse_recipe adds the recipe's name."""
    if not ok:
        raise RecipeError(f"{key} {message}")


ENGINES = ("local", "ray")  # common_args.engine: simulation.py's LocalEngine, ray_engine.py's RayEngine


@dataclass
class CommonArgs:
    training_type: str = recipe_key("simulation", "'simulation' (our in-process simulator) or 'cross_silo' (FedML)")
    random_seed: int = recipe_key(0, "seeds the partition, the splits, the initial adapter and every client's training")
    output_dir: str = recipe_key("runs/{recipe}", "{recipe} is replaced by the recipe's file stem")
    checkpoint: bool = recipe_key(True, "save the whole federation after every round "
                                        "(<output_dir>/checkpoint.safetensors), so `pfedseq run --resume` continues an "
                                        "interrupted run, or extends a finished one (a larger comm_round)")
    federated_scenario: str = recipe_key("", "free text for reports, e.g. 'real-world (Omniglot drawers)'; FedML keeps "
                                             "'scenario' for its own horizontal|hierarchical switch")
    engine: str = recipe_key("local", "how the simulator runs a round's clients: 'local' (one after another in this "
                                      "process) or 'ray' (in parallel on Ray actors, see ray_args; pip install .[ray])")

    def __post_init__(self):
        require(self.training_type in ("simulation", "cross_silo"), "common_args.training_type",
                f"must be 'simulation' or 'cross_silo', got {self.training_type!r}")
        require(self.engine in ENGINES, "common_args.engine", f"must be one of {list(ENGINES)}, got {self.engine!r}")


@dataclass
class DataArgs:
    dataset: str = recipe_key("omniglot", "a known dataset (omniglot, cifar10, pacs) read from parquet; see data_dir "
                                          "and hub_id")
    dataset_split: str = recipe_key("train", "the split federated (CIFAR-10: 'test', the images the backbone never "
                                             "saw)")
    data_dir: str | None = recipe_key(None, "None: $PFEDSEQ_DATA_DIR, else ../shared/data, then the embedded data/")
    hub_id: str | None = recipe_key(None, "a Hub dataset id (or a local folder in the Hub's layout), read with "
                                          "datasets.load_dataset instead of the parquet file of `dataset`")
    image_column: str | None = recipe_key(None, "None: the dataset's own image column ('image'; CIFAR-10 on the Hub, "
                                                "uoft-cs/cifar10, names it 'img')")
    label_column: str | None = recipe_key(None, "None: the dataset's own label column")
    partition_method: str = recipe_key("column", "'column', 'dirichlet', or 'silo': each client's data is its own file")
    partition_column: str | None = recipe_key("drawer", "'column': one client per value of this column (Omniglot's "
                                                        "drawer, PACS's domain)")
    partition_splits: int = recipe_key(1, "'column': split each value's rows at random into this many clients "
                                          "(several silos of one domain: value v's j-th silo is client v * k + j)")
    partition_alpha: float = recipe_key(0.1, "'dirichlet': the concentration of each client's label distribution "
                                             "(smaller: more skew)")
    partition_min_size: int = recipe_key(10, "'dirichlet': redraw until every client holds at least this many samples")
    partition_max_retries: int = recipe_key(100, "'dirichlet': draws tried before the partition is refused")
    split_fractions: list[float] = recipe_key([0.7, 0.1, 0.2], "train / validation / test")
    samples_per_client: int | None = recipe_key(None, "keep a seeded random subset of each client's data (fast runs)")
    data_files: list[str] | None = recipe_key(None, "'silo': client k's own parquet file (image + integer label "
                                                    "columns), on the machine of client k's party; a party reads only "
                                                    "its own")
    label_names: list[str] | None = recipe_key(None, "'silo': the label space every client's integer labels index")
    cluster_transforms: list[str] | None = recipe_key(None, "a covariate shift per cluster of clients: client i's "
                                                            "images pass through cluster_transforms[i % K] (identity, "
                                                            "rot90, rot180, rot270, hflip, vflip, invert); null: none")
    preprocess: bool = recipe_key(True, "run each client's image transform (cluster shift, resize, normalise) once "
                                        "and keep the tensors (datasets' on-disk cache, keyed by the rows, the "
                                        "transform and the processor's config, reused by later runs) instead of on "
                                        "every epoch; the same tensors either way")

    def __post_init__(self):
        require(self.partition_method in ("column", "dirichlet", "silo"), "data_args.partition_method",
                f"must be 'column', 'dirichlet' or 'silo', got {self.partition_method!r}")
        silo = self.partition_method == "silo"
        require(not silo or (bool(self.data_files) and all(bool(f) for f in self.data_files)),
                "data_args.data_files", "must list one parquet file per client when partition_method is 'silo'")
        require(silo or self.data_files is None, "data_args.data_files", "is only read with partition_method 'silo'")
        require(not silo or (bool(self.label_names) and len(set(self.label_names)) == len(self.label_names)),
                "data_args.label_names", "must list the distinct label names every silo's integer labels index when "
                "partition_method is 'silo' (the server holds no data to read them from)")
        require(not silo or self.hub_id is None, "data_args.hub_id", "cannot be combined with partition_method 'silo'")
        require(self.partition_method != "column" or bool(self.partition_column), "data_args.partition_column",
                "is required when partition_method is 'column'")
        require(self.partition_splits >= 1 and (self.partition_splits == 1 or self.partition_method == "column"),
                "data_args.partition_splits", f"must be >= 1, and above 1 only with partition_method 'column'; got "
                f"{self.partition_splits} with {self.partition_method!r}")
        require(self.partition_alpha > 0, "data_args.partition_alpha", f"must be > 0, got {self.partition_alpha}")
        require(self.partition_min_size >= 0, "data_args.partition_min_size", "must be >= 0")
        require(self.partition_max_retries >= 1, "data_args.partition_max_retries", "must be >= 1")
        fractions = self.split_fractions
        require(len(fractions) == 3 and all(f >= 0 for f in fractions) and abs(sum(fractions) - 1.0) < 1e-6
                and fractions[0] > 0, "data_args.split_fractions",
                f"must be three non-negative fractions (train > 0) summing to 1, got {fractions}")
        require(self.samples_per_client is None or self.samples_per_client > 0, "data_args.samples_per_client",
                "must be positive")
        unknown = [name for name in self.cluster_transforms or [] if name not in CLUSTER_TRANSFORMS]
        require(self.cluster_transforms is None or (bool(self.cluster_transforms) and not unknown),
                "data_args.cluster_transforms", f"must be null or a non-empty list of {sorted(CLUSTER_TRANSFORMS)}, "
                f"got {self.cluster_transforms}" + (f" (unknown: {unknown})" if unknown else ""))


@dataclass
class ModelArgs:
    model: str = recipe_key("vit-small-cifar10", "a directory, a name under hf_models/, or a Hub ViT id")
    lora_r: int = recipe_key(8, "LoRA rank r of every adapted projection")
    lora_alpha: int = recipe_key(16, "LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = recipe_key(0.0, "dropout on LoRA's input")
    lora_target_modules: list[str] = recipe_key(["q_proj", "v_proj"], "the attention projections that carry LoRA "
                                                                      "(PEFT target_modules)")
    client_depths: list[int] | None = recipe_key(None, "model heterogeneity (pFedLoRA): client i keeps the first "
                                                       "client_depths[i % len] encoder layers, and LoRA goes on the "
                                                       "first min(client_depths) layers (one adapter shape for all); "
                                                       "null: every client has the whole backbone, with LoRA on every "
                                                       "layer")

    def __post_init__(self):
        require(self.lora_r > 0, "model_args.lora_r", "must be positive")
        require(bool(self.lora_target_modules), "model_args.lora_target_modules", "must not be empty")
        require(self.client_depths is None or (bool(self.client_depths) and min(self.client_depths) >= 1),
                "model_args.client_depths", f"must be null or a non-empty list of layer counts >= 1, "
                f"got {self.client_depths}")


@dataclass
class TrainArgs:
    federated_optimizer: str = recipe_key("FedAvg", "the method; see fedml_pfedseq.strategies.METHODS")
    client_num_in_total: int | None = recipe_key(None, "None: as many as the partition makes")
    client_num_per_round: int | None = recipe_key(None, "K: clients sampled each round (None: all N)")
    min_uploads_per_round: int = recipe_key(1, "fewer valid uploads in a round (after rejecting bad ones) stop the run")
    comm_round: int = recipe_key(10, "communication rounds T")
    epochs: int = recipe_key(1, "local epochs per round")
    batch_size: int = recipe_key(32, "local training batch size")
    learning_rate: float = recipe_key(0.05, "the clients' SGD learning rate")
    client_optimizer: str = recipe_key("sgd", "the clients' optimiser (only 'sgd', the paper's)")
    momentum: float = recipe_key(0.0, "the clients' SGD momentum")
    weight_decay: float = recipe_key(0.0, "the clients' SGD weight decay")

    def __post_init__(self):
        require(self.comm_round >= 1, "train_args.comm_round", f"must be >= 1, got {self.comm_round}")
        require(self.epochs >= 1, "train_args.epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "train_args.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.learning_rate > 0, "train_args.learning_rate", f"must be > 0, got {self.learning_rate}")
        require(self.client_optimizer in ("sgd",), "train_args.client_optimizer",
                f"must be 'sgd' (the paper's), got {self.client_optimizer!r}")
        total, per_round = self.client_num_in_total, self.client_num_per_round
        require(total is None or total >= 1, "train_args.client_num_in_total", "must be >= 1")
        require(per_round is None or per_round >= 1, "train_args.client_num_per_round", "must be >= 1")
        require(not (total and per_round) or per_round <= total, "train_args.client_num_per_round",
                f"({per_round}) exceeds client_num_in_total ({total})")
        require(self.min_uploads_per_round >= 1, "train_args.min_uploads_per_round", "must be >= 1")
        require(per_round is None or self.min_uploads_per_round <= per_round, "train_args.min_uploads_per_round",
                f"({self.min_uploads_per_round}) exceeds client_num_per_round ({per_round})")


@dataclass
class ValidationArgs:
    frequency_of_the_test: int = recipe_key(1, "evaluate every k rounds (the final round is always evaluated)")
    eval_batch_size: int = recipe_key(256, "batch size of evaluation")

    def __post_init__(self):
        require(self.frequency_of_the_test >= 1, "validation_args.frequency_of_the_test", "must be >= 1")


PRECISIONS = ("fp32", "bf16", "fp16")  # device_args.mixed_precision ("no", accelerate's word, is False in YAML)


@dataclass
class DeviceArgs:
    using_gpu: bool = recipe_key(True, "use an accelerator when accelerate finds one")
    num_threads: int | None = recipe_key(None, "torch threads; None: torch's default")
    mixed_precision: str = recipe_key("fp32", "'fp32', 'bf16' or 'fp16': the client model's forward (and so its "
                                            "backward) under autocast in that type, weights, optimiser and loss in "
                                            "fp32; fp16 scales the loss (torch.amp.GradScaler) and is refused by the "
                                            "methods with gradient steps of their own (FedALA, PerFedAvg, pFedMe). "
                                            "The server's networks (pFedSeq's learner, hypernetworks) always run in "
                                            "fp32")
    loader_workers: int | None = recipe_key(None, "DataLoader worker processes per client loader; None: 4 where a "
                                                  "CUDA device trains (capped by the cores), else 0 (the batches are "
                                                  "the same either way)")
    tf32: bool = recipe_key(True, "on a CUDA device, let fp32 matrix products use TF32 tensor cores (Ampere and "
                                  "later; about 3 significant digits fewer in each product)")

    def __post_init__(self):
        require(self.num_threads is None or self.num_threads >= 1, "device_args.num_threads", "must be >= 1")
        require(self.loader_workers is None or self.loader_workers >= 0, "device_args.loader_workers", "must be >= 0")
        require(self.mixed_precision in PRECISIONS, "device_args.mixed_precision",
                f"must be one of {list(PRECISIONS)}, got {self.mixed_precision!r}")


@dataclass
class CommArgs:
    """Cross-silo deployments only (``pfedseq party`` / ``pfedseq deploy``); the simulator ignores them."""

    backend: str = recipe_key("GRPC", "FedML's transport; GRPC is the one patched (no busy-wait) and tested")
    grpc_ipconfig_path: str | None = recipe_key(None, "FedML's CSV: eid,rank,grpc_server_ip,grpc_server_port (deploy "
                                                      "writes one)")
    round_timeout: float = recipe_key(900.0, "seconds a party waits for a round before stopping with an error")
    startup_timeout: float = recipe_key(300.0, "seconds for the server to listen, then for every client to connect")
    upload_timeout: float | None = recipe_key(None, "seconds after a round's payloads go out until the server "
                                                    "aggregates the uploads that arrived (at least "
                                                    "train_args.min_uploads_per_round); None: wait for every client")
    tls: bool = recipe_key(True, "mutual TLS between parties: each proves its rank with a certificate signed by the "
                                 "federation's CA (docs/security.md); false: plaintext, warned about by every party")
    ca_cert: str | None = recipe_key(None, "the federation CA's certificate (PEM); `pfedseq certs` issues one, "
                                           "`pfedseq deploy` a throw-away one when unset")
    party_cert: str | None = recipe_key(None, "this party's certificate (PEM), signed by the CA; {rank} is replaced by "
                                              "the party's rank, e.g. certs/party-{rank}.crt")
    party_key: str | None = recipe_key(None, "this party's private key (PEM); {rank} as in party_cert")
    max_message_mb: float | None = recipe_key(None, "the largest message a party sends or accepts; None: from the "
                                                    "payload size (the adapter and head times the method's states "
                                                    "per message, plus 1 MiB)")

    def __post_init__(self):
        require(self.backend == "GRPC", "comm_args.backend", f"must be 'GRPC' (FedML's gRPC transport, the one this "
                f"plugin patches and tests), got {self.backend!r}")
        require(self.round_timeout > 0, "comm_args.round_timeout", "must be > 0 seconds")
        require(self.startup_timeout > 0, "comm_args.startup_timeout", "must be > 0 seconds")
        u = self.upload_timeout
        require(u is None or 0 < u < self.round_timeout, "comm_args.upload_timeout",
                f"must be null or > 0 seconds and below comm_args.round_timeout ({self.round_timeout}, after which a "
                f"waiting party stops), got {u}")
        require(self.max_message_mb is None or self.max_message_mb > 0, "comm_args.max_message_mb",
                "must be null or > 0")
        if self.tls and any(p is not None for p in (self.ca_cert, self.party_cert, self.party_key)):
            for key in ("ca_cert", "party_cert", "party_key"):
                require(getattr(self, key) is not None, f"comm_args.{key}",
                        "must be set with the other two (ca_cert, party_cert, party_key), or all three left unset "
                        "for `pfedseq deploy` to issue throw-away certificates")


REPORTERS = ("tensorboard", "wandb")  # tracking_args.report_to's backends (fedml_pfedseq/tracking.py)


@dataclass
class TrackingArgs:
    report_to: list[str] = recipe_key([], "where each round's metrics also go, as transformers' report_to reads it: "
                                          "tensorboard (event files in <output_dir>/tensorboard), wandb (an offline "
                                          "run in <output_dir>/wandb; nothing is uploaded), all, or none")
    enable_tracking: bool = recipe_key(False, "FedML's experiment tracking (off: nothing leaves the machine)")
    log_level: str = recipe_key("INFO", "logging level of cross-silo parties")

    def __post_init__(self):
        unknown = [name for name in self.report_to if name not in (*REPORTERS, "all", "none")]
        require(not unknown, "tracking_args.report_to", f"names {unknown}; it takes {[*REPORTERS, 'all', 'none']}")

    @property
    def reporters(self) -> list[str]:
        """The backends that ``report_to`` asks for ("all": every one; "none" or nothing: none)."""
        return list(REPORTERS) if "all" in self.report_to else [r for r in REPORTERS if r in self.report_to]


@dataclass
class HubArgs:
    """Sharing a run: its personalized adapters on disk, and (opt-in) the run pushed to a Hugging Face Hub repo."""

    save_adapters: bool = recipe_key(True, "write <output_dir>/adapters/ (PEFT format) at the end of a simulator run")
    push_to_hub: bool = recipe_key(False, "push the run folder to hub_repo_id once the run ends (HF_ENDPOINT, "
                                          "HF_TOKEN)")
    hub_repo_id: str | None = recipe_key(None, "'owner/name' of the model repo to push to")
    hub_private: bool = recipe_key(True, "create the repo private (ignored if it already exists)")
    hub_push_every: int | None = recipe_key(None, "also push a checkpoint every K rounds during the run (null: only at "
                                                  "the end)")
    push_checkpoint: bool = recipe_key(False, "also push checkpoint.safetensors (every client's state), so that "
                                              "`pfedseq run --resume-from REPO` continues the run elsewhere")
    hub_learner_init: str | None = recipe_key(None, "pFedSeq: a repo id or run folder whose seq_learner/ the learner "
                                                    "starts from (its weights only, for a new run; `pfedseq run "
                                                    "--resume-from` continues a run exactly)")

    def __post_init__(self):
        require(self.hub_push_every is None or self.push_to_hub, "hub_args.hub_push_every", "needs push_to_hub: true")
        if self.push_to_hub:
            repo = self.hub_repo_id
            require(bool(repo) and repo.count("/") == 1 and all(repo.split("/")), "hub_args.hub_repo_id",
                    f"must be 'owner/name' when push_to_hub is true, got {repo!r}")
            require(self.save_adapters, "hub_args.save_adapters", "must be true when push_to_hub is true (the push "
                    "uploads the adapters the run writes)")


@dataclass
class RayArgs:
    """``common_args.engine: ray`` only (and ``pfedseq grid --engine ray``): where Ray runs and how many workers."""

    ray_address: str | None = recipe_key(None, "None: start a Ray instance on this machine for the run; else an "
                                               "existing cluster's address for ray.init(address=...) ('auto': the one "
                                               "this node belongs to); its nodes need the recipe's data and backbone")
    num_workers: int | None = recipe_key(None, "Ray actors that train clients, each holding the data and backbone "
                                               "once; None: one per GPU where the recipe uses GPUs and Ray has "
                                               "them, else one per threads_per_worker CPUs")
    threads_per_worker: int = recipe_key(1, "CPUs each worker reserves, and its torch threads where "
                                            "device_args.num_threads is not set")
    object_store_mib: int | None = recipe_key(None, "a local Ray's object store in MiB (None: Ray's default, about 30% "
                                                    "of RAM in /dev/shm)")
    ray_temp_dir: str | None = recipe_key(None, "a local Ray's session folder (logs, sockets, auth token); None: a "
                                                "fresh folder under the system's temp folder, removed at the end")
    worker_retries: int = recipe_key(1, "times a client's training is retried on a restarted worker after its worker "
                                        "died; then the client is left out of the round (as a rejected upload)")
    worker_timeout: float = recipe_key(900.0, "seconds a round waits for its workers; a client not back by then is "
                                              "left out of the round and its worker restarted")

    def __post_init__(self):
        require(self.num_workers is None or self.num_workers >= 1, "ray_args.num_workers", "must be null or >= 1")
        require(self.threads_per_worker >= 1, "ray_args.threads_per_worker", "must be >= 1")
        require(self.object_store_mib is None or self.object_store_mib >= 80, "ray_args.object_store_mib",
                "must be null or >= 80 (Ray's minimum object store)")
        require(self.worker_retries >= 0, "ray_args.worker_retries", "must be >= 0")
        require(self.worker_timeout > 0, "ray_args.worker_timeout", "must be > 0 seconds")


SECTIONS: dict[str, type] = {
    "common_args": CommonArgs,
    "data_args": DataArgs,
    "model_args": ModelArgs,
    "train_args": TrainArgs,
    "validation_args": ValidationArgs,
    "device_args": DeviceArgs,
    "comm_args": CommArgs,
    "tracking_args": TrackingArgs,
    "hub_args": HubArgs,
    "ray_args": RayArgs,
}


@dataclass
class Recipe:
    """One run as its YAML describes it: FedML's sections, ``hub_args`` and the method's ``algorithm_args``, each a
    dataclass that checked its own keys (``load_recipe`` builds and cross-checks them)."""

    common_args: CommonArgs = field(default_factory=CommonArgs)
    data_args: DataArgs = field(default_factory=DataArgs)
    model_args: ModelArgs = field(default_factory=ModelArgs)
    train_args: TrainArgs = field(default_factory=TrainArgs)
    validation_args: ValidationArgs = field(default_factory=ValidationArgs)
    device_args: DeviceArgs = field(default_factory=DeviceArgs)
    comm_args: CommArgs = field(default_factory=CommArgs)
    tracking_args: TrackingArgs = field(default_factory=TrackingArgs)
    hub_args: HubArgs = field(default_factory=HubArgs)
    ray_args: RayArgs = field(default_factory=RayArgs)
    algorithm_args: Any = None  # the method's own dataclass, filled by load_recipe
    source: Path | None = None
    label: str | None = None  # a name for this run other than the file's stem (a suite's variant of a recipe)

    @property
    def name(self) -> str:
        return self.label or (self.source.stem if self.source else "recipe")

    @property
    def output_dir(self) -> Path:
        return Path(self.common_args.output_dir.format(recipe=self.name))

    def to_dict(self) -> dict:
        """The recipe as YAML-ready sections (what ``load_recipe`` reads back)."""
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["algorithm_args"] = dataclasses.asdict(self.algorithm_args) if self.algorithm_args else {}
        return out


def recipe_key_reference(method: str | None = None, markdown: bool = False) -> str:
    """Every recipe key with its type, default and meaning, read from the dataclasses (``pfedseq keys``): the
    sections, then ``algorithm_args`` of ``method`` (default: of every method)."""
    from fedml_pfedseq.algorithm_args import ALGORITHM_ARGS, method_name  # not at the top: it imports this module

    try:
        names = [method_name(method)] if method else list(ALGORITHM_ARGS)
    except KeyError as err:
        raise RecipeError(f"--method {err.args[0]}") from None
    groups = list(SECTIONS.items()) + [(f"algorithm_args ({name})", ALGORITHM_ARGS[name]) for name in names
                                       if dataclasses.fields(ALGORITHM_ARGS[name])]
    hints = {cls: typing.get_type_hints(cls) for _, cls in groups}
    out = []
    for title, cls in groups:
        rows = [(f.name, _type_name(hints[cls][f.name]), json.dumps(_default(f)), f.metadata.get("help", ""))
                for f in dataclasses.fields(cls)]
        if markdown:
            out += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
            out += [f"| `{k}` | `{t.replace('|', '&#124;')}` | `{d}` | {m.replace('|', '&#124;')} |"
                    for k, t, d, m in rows] + [""]
        else:
            out.append(f"{title}:")
            out += [f"  {k}: {t} = {d}\n      {m}" for k, t, d, m in rows] + [""]
    return "\n".join(out).rstrip() + "\n"


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "") if typing.get_origin(annotation) else annotation.__name__


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


YAML11_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _check_type(where: str, value: Any, annotation: Any) -> Any:
    """Coerce ints to floats where a float is expected; reject values of the wrong type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(where, value, inner[0])
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_check_type(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and YAML11_EXPONENT.match(value):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-3 (no dot) as a string; every reader means the number
    if annotation is Any:
        return value
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise RecipeError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def build_section(cls: type, values: dict | None, where: str):
    """Build dataclass ``cls`` (the section ``where``) from a YAML mapping, naming unknown keys and wrong types;
    the section's ``__post_init__`` checks its own rules."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise RecipeError(f"{where}: unknown key {key!r}{_suggest(key, names)}; allowed: {sorted(names)}")
        kwargs[key] = _check_type(f"{where}.{key}", value, hints[key])
    return cls(**kwargs)


def check_across_sections(recipe: Recipe) -> None:
    """The rules that read two sections (each section checks its own keys in ``__post_init__``)."""
    c, d, t, v, h = recipe.common_args, recipe.data_args, recipe.train_args, recipe.validation_args, recipe.hub_args
    silos = len(d.data_files or [])
    require(d.partition_method != "silo" or t.client_num_in_total in (None, silos), "train_args.client_num_in_total",
            f"is {t.client_num_in_total} but data_args.data_files lists {silos} silos")
    require(c.engine != "ray" or not h.hub_push_every, "hub_args.hub_push_every",
            "needs common_args.engine: local (its checkpoints save the models as each client was evaluated, which "
            "on Ray happens in a worker)")
    require(h.hub_learner_init is None or t.federated_optimizer.lower() == "pfedseq", "hub_args.hub_learner_init",
            f"warm-starts pFedSeq's SeqLearner; method {t.federated_optimizer!r} has none")
    every = h.hub_push_every
    require(every is None or (every >= 1 and every % v.frequency_of_the_test == 0), "hub_args.hub_push_every",
            f"must be null or a multiple >= 1 of validation_args.frequency_of_the_test ({v.frequency_of_the_test}): "
            f"a checkpoint holds the models evaluated at its round, got {every}")
    check_with_other_sections = getattr(recipe.algorithm_args, "check_recipe", None)  # a method's cross-section rules
    if check_with_other_sections is not None:
        check_with_other_sections(recipe)


def parse_recipe(raw: Any, where: str = "recipe", source: Path | None = None) -> Recipe:
    """Build and validate a :class:`Recipe` from an already-parsed YAML mapping."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of sections, got {type(raw).__name__}")
    allowed = set(SECTIONS) | {"algorithm_args"}
    for section in raw:
        if section not in allowed:
            raise RecipeError(f"{where}: unknown section {section!r}{_suggest(section, allowed)}; "
                              f"allowed: {sorted(allowed)}")
    try:
        recipe = Recipe(source=source, **{
            name: build_section(cls, raw.get(name), name) for name, cls in SECTIONS.items()})
        from fedml_pfedseq.algorithm_args import ALGORITHM_ARGS, method_name  # not at the top: it imports this module

        try:
            args_class = ALGORITHM_ARGS[method_name(recipe.train_args.federated_optimizer)]
        except KeyError as err:
            raise RecipeError(f"train_args.federated_optimizer {err.args[0]}") from None
        recipe.algorithm_args = build_section(args_class, raw.get("algorithm_args"), "algorithm_args")
        check_across_sections(recipe)
    except RecipeError as err:  # every rule names its key; the recipe's name goes in front
        raise RecipeError(f"{where}: {err}") from None
    return recipe


class RecipeWarning(UserWarning):
    """A recipe that runs but will not do what its method is for (``pfedseq check`` prints these too)."""


def recipe_warnings(recipe: Recipe) -> list[str]:
    """What a method says of a valid recipe that will not do what the method is for (``Args.recipe_warnings``)."""
    method_warnings = getattr(recipe.algorithm_args, "recipe_warnings", None)
    return [f"{recipe.name}: {message}" for message in (method_warnings(recipe) if method_warnings else [])]


def warn_about(recipe: Recipe) -> None:
    for message in recipe_warnings(recipe):
        warnings.warn(message, RecipeWarning, stacklevel=2)


def recipe_changes(saved: dict, current: Recipe, ignore: tuple[str, ...] = ()) -> list[str]:
    """The ``section.key`` entries where a recipe saved with a run (``to_dict`` form) differs from ``current``,
    both read with this code's defaults (a key added since the run was saved is not a change); ``ignore`` lists
    keys or whole sections allowed to differ."""
    before, after = parse_recipe(saved, "the saved recipe").to_dict(), current.to_dict()
    return [f"{section}.{key}: {before[section].get(key)!r} -> {after[section].get(key)!r}"
            for section in after for key in sorted(set(before[section]) | set(after[section]))
            if before[section].get(key) != after[section].get(key)
            and section not in ignore and f"{section}.{key}" not in ignore]


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file, turning a missing file or a syntax error into a RecipeError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: malformed YAML: {err}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw recipe mapping."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise RecipeError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise RecipeError(f"override {item!r}: section {section!r} is not a mapping")
        raw[section][key] = yaml.safe_load(value)
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None, label: str | None = None) -> Recipe:
    """Load, override and validate a recipe file (``label`` names the run, else the file's stem)."""
    path = Path(path)
    raw = load_yaml(path)
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [])
    recipe = parse_recipe(raw, where=f"{path}" + (f" ({label})" if label else ""), source=path)
    recipe.label = label
    return recipe

