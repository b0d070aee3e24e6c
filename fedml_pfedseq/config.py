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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, the key and what is wrong."""


@dataclass
class CommonArgs:
    training_type: str = "simulation"  # "simulation" (our in-process simulator) or "cross_silo" (FedML)
    random_seed: int = 0
    output_dir: str = "runs/{recipe}"  # {recipe} is replaced by the recipe's file stem
    checkpoint: bool = True  # save the whole federation after every round (<output_dir>/checkpoint.safetensors),
    # so `pfedseq run --resume` continues an interrupted run, or extends a finished one (a larger comm_round)
    federated_scenario: str = ""  # free text for reports, e.g. "real-world (Omniglot drawers)"; FedML keeps
    # "scenario" for its own horizontal|hierarchical switch


@dataclass
class DataArgs:
    dataset: str = "omniglot"
    dataset_split: str = "train"  # the split federated (CIFAR-10: "test", the images the backbone never saw)
    data_dir: str | None = None  # None: $PFEDSEQ_DATA_DIR, else ../shared/data, then the embedded data/
    hub_id: str | None = None  # a Hub dataset id, for machines with a network
    label_column: str | None = None  # None: the dataset's own label column
    partition_method: str = "column"  # "column", "dirichlet", or "silo": each client's data is its own file
    partition_column: str | None = "drawer"
    partition_alpha: float = 0.1
    partition_min_size: int = 10
    partition_max_retries: int = 100
    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train / validation / test
    samples_per_client: int | None = None  # keep a seeded random subset of each client's data (fast runs)
    data_files: list[str] | None = None  # "silo": client k's own parquet file (image + integer label columns), on
    # the machine of client k's party; a party reads only its own
    label_names: list[str] | None = None  # "silo": the label space every client's integer labels index


@dataclass
class ModelArgs:
    model: str = "vit-small-cifar10"  # a directory, a name under hf_models/, or a Hub ViT id
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    client_depths: list[int] | None = None  # model heterogeneity (pFedLoRA): client i keeps the first
    # client_depths[i % len] encoder layers, and LoRA goes on the first min(client_depths) layers (one adapter
    # shape for all); null: every client has the whole backbone, with LoRA on every layer


@dataclass
class TrainArgs:
    federated_optimizer: str = "FedAvg"  # the method; see fedml_pfedseq.strategies.METHODS
    client_num_in_total: int | None = None  # None: as many as the partition makes
    client_num_per_round: int | None = None  # K: clients sampled each round (None: all N)
    min_uploads_per_round: int = 1  # fewer valid uploads in a round (after rejecting bad ones) stop the run
    comm_round: int = 10
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    client_optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class ValidationArgs:
    frequency_of_the_test: int = 1  # evaluate every k rounds (the final round is always evaluated)
    eval_batch_size: int = 256


@dataclass
class DeviceArgs:
    using_gpu: bool = True  # use an accelerator when accelerate finds one
    num_threads: int | None = None  # torch threads; None: torch's default


@dataclass
class CommArgs:
    """Cross-silo deployments only (``pfedseq party`` / ``pfedseq deploy``); the simulator ignores them."""

    backend: str = "GRPC"  # FedML's transport; GRPC is the one patched (no busy-wait) and tested
    grpc_ipconfig_path: str | None = None  # FedML's CSV: eid,rank,grpc_server_ip,grpc_server_port (deploy writes one)
    round_timeout: float = 900.0  # seconds a party waits for a round before stopping with an error
    startup_timeout: float = 300.0  # seconds for the server to listen, then for every client to connect
    upload_timeout: float | None = None  # seconds after a round's payloads go out until the server aggregates the
    # uploads that arrived (at least train_args.min_uploads_per_round); None: wait for every client


@dataclass
class TrackingArgs:
    enable_tracking: bool = False
    log_level: str = "INFO"


@dataclass
class HubArgs:
    """Sharing a run: its personalized adapters on disk, and (opt-in) the run pushed to a Hugging Face Hub repo."""

    save_adapters: bool = True  # write <output_dir>/adapters/ (PEFT format) at the end of a simulator run
    push_to_hub: bool = False  # push the run folder to hub_repo_id once the run ends (HF_ENDPOINT, HF_TOKEN)
    hub_repo_id: str | None = None  # "owner/name" of the model repo to push to
    hub_private: bool = True  # create the repo private (ignored if it already exists)
    hub_push_every: int | None = None  # also push a checkpoint every K rounds during the run (null: only at the end)
    push_checkpoint: bool = False  # also push checkpoint.safetensors (every client's state), so that
    # `pfedseq run --resume-from REPO` continues the run elsewhere
    hub_learner_init: str | None = None  # pFedSeq: a repo id or run folder whose seq_learner/ the learner starts
    # from (its weights only, for a new run; `pfedseq run --resume-from` continues a run exactly)


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
}


@dataclass
class Recipe:
    common_args: CommonArgs = field(default_factory=CommonArgs)
    data_args: DataArgs = field(default_factory=DataArgs)
    model_args: ModelArgs = field(default_factory=ModelArgs)
    train_args: TrainArgs = field(default_factory=TrainArgs)
    validation_args: ValidationArgs = field(default_factory=ValidationArgs)
    device_args: DeviceArgs = field(default_factory=DeviceArgs)
    comm_args: CommArgs = field(default_factory=CommArgs)
    tracking_args: TrackingArgs = field(default_factory=TrackingArgs)
    hub_args: HubArgs = field(default_factory=HubArgs)
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


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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
    if annotation is Any:
        return value
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise RecipeError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def build_section(cls: type, values: dict | None, where: str):
    """Build dataclass ``cls`` from a YAML mapping, naming unknown keys and wrong types."""
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


def _validate(recipe: Recipe, where: str) -> None:
    c, d, t, v = recipe.common_args, recipe.data_args, recipe.train_args, recipe.validation_args

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise RecipeError(f"{where}: {key} {message}")

    require(c.training_type in ("simulation", "cross_silo"), "common_args.training_type",
            f"must be 'simulation' or 'cross_silo', got {c.training_type!r}")
    require(d.partition_method in ("column", "dirichlet", "silo"), "data_args.partition_method",
            f"must be 'column', 'dirichlet' or 'silo', got {d.partition_method!r}")
    silo = d.partition_method == "silo"
    require(not silo or (bool(d.data_files) and all(bool(f) for f in d.data_files)), "data_args.data_files",
            "must list one parquet file per client when partition_method is 'silo'")
    require(silo or d.data_files is None, "data_args.data_files", "is only read with partition_method 'silo'")
    require(not silo or (bool(d.label_names) and len(set(d.label_names)) == len(d.label_names)),
            "data_args.label_names", "must list the distinct label names every silo's integer labels index when "
            "partition_method is 'silo' (the server holds no data to read them from)")
    require(not silo or t.client_num_in_total in (None, len(d.data_files or [])), "train_args.client_num_in_total",
            f"is {t.client_num_in_total} but data_args.data_files lists {len(d.data_files or [])} silos")
    require(not silo or d.hub_id is None, "data_args.hub_id", "cannot be combined with partition_method 'silo'")
    require(d.partition_method != "column" or bool(d.partition_column), "data_args.partition_column",
            "is required when partition_method is 'column'")
    require(d.partition_alpha > 0, "data_args.partition_alpha", f"must be > 0, got {d.partition_alpha}")
    require(d.partition_min_size >= 0, "data_args.partition_min_size", "must be >= 0")
    require(d.partition_max_retries >= 1, "data_args.partition_max_retries", "must be >= 1")
    require(len(d.split_fractions) == 3 and all(f >= 0 for f in d.split_fractions)
            and abs(sum(d.split_fractions) - 1.0) < 1e-6 and d.split_fractions[0] > 0,
            "data_args.split_fractions", f"must be three non-negative fractions (train > 0) summing to 1, "
            f"got {d.split_fractions}")
    require(d.samples_per_client is None or d.samples_per_client > 0, "data_args.samples_per_client",
            "must be positive")
    require(recipe.model_args.lora_r > 0, "model_args.lora_r", "must be positive")
    require(bool(recipe.model_args.lora_target_modules), "model_args.lora_target_modules", "must not be empty")
    require(recipe.model_args.client_depths is None or (bool(recipe.model_args.client_depths)
                                                        and min(recipe.model_args.client_depths) >= 1),
            "model_args.client_depths", f"must be null or a non-empty list of layer counts >= 1, "
            f"got {recipe.model_args.client_depths}")
    require(t.comm_round >= 1, "train_args.comm_round", f"must be >= 1, got {t.comm_round}")
    require(t.epochs >= 1, "train_args.epochs", f"must be >= 1, got {t.epochs}")
    require(t.batch_size >= 1, "train_args.batch_size", f"must be >= 1, got {t.batch_size}")
    require(t.learning_rate > 0, "train_args.learning_rate", f"must be > 0, got {t.learning_rate}")
    require(t.client_optimizer in ("sgd",), "train_args.client_optimizer",
            f"must be 'sgd' (the paper's), got {t.client_optimizer!r}")
    require(t.client_num_in_total is None or t.client_num_in_total >= 1, "train_args.client_num_in_total",
            "must be >= 1")
    require(t.client_num_per_round is None or t.client_num_per_round >= 1, "train_args.client_num_per_round",
            "must be >= 1")
    if t.client_num_in_total and t.client_num_per_round:
        require(t.client_num_per_round <= t.client_num_in_total, "train_args.client_num_per_round",
                f"({t.client_num_per_round}) exceeds client_num_in_total ({t.client_num_in_total})")
    require(t.min_uploads_per_round >= 1, "train_args.min_uploads_per_round", "must be >= 1")
    require(t.client_num_per_round is None or t.min_uploads_per_round <= t.client_num_per_round,
            "train_args.min_uploads_per_round", f"({t.min_uploads_per_round}) exceeds client_num_per_round "
            f"({t.client_num_per_round})")
    require(recipe.comm_args.backend == "GRPC", "comm_args.backend",
            f"must be 'GRPC' (FedML's gRPC transport, the one this plugin patches and tests), "
            f"got {recipe.comm_args.backend!r}")
    require(recipe.comm_args.round_timeout > 0, "comm_args.round_timeout", "must be > 0 seconds")
    require(recipe.comm_args.startup_timeout > 0, "comm_args.startup_timeout", "must be > 0 seconds")
    u = recipe.comm_args.upload_timeout
    require(u is None or 0 < u < recipe.comm_args.round_timeout, "comm_args.upload_timeout",
            f"must be null or > 0 seconds and below comm_args.round_timeout ({recipe.comm_args.round_timeout}, after "
            f"which a waiting party stops), got {u}")
    require(v.frequency_of_the_test >= 1, "validation_args.frequency_of_the_test", "must be >= 1")
    require(recipe.device_args.num_threads is None or recipe.device_args.num_threads >= 1,
            "device_args.num_threads", "must be >= 1")
    h = recipe.hub_args
    require(h.hub_learner_init is None or t.federated_optimizer.lower() == "pfedseq", "hub_args.hub_learner_init",
            f"warm-starts pFedSeq's SeqLearner; method {t.federated_optimizer!r} has none")
    require(h.hub_push_every is None or h.push_to_hub, "hub_args.hub_push_every", "needs push_to_hub: true")
    if h.push_to_hub:
        require(bool(h.hub_repo_id) and h.hub_repo_id.count("/") == 1 and all(h.hub_repo_id.split("/")),
                "hub_args.hub_repo_id", f"must be 'owner/name' when push_to_hub is true, got {h.hub_repo_id!r}")
        require(h.save_adapters, "hub_args.save_adapters", "must be true when push_to_hub is true (the push "
                "uploads the adapters the run writes)")
        require(h.hub_push_every is None or (h.hub_push_every >= 1 and h.hub_push_every % v.frequency_of_the_test
                                              == 0), "hub_args.hub_push_every",
                f"must be null or a multiple >= 1 of validation_args.frequency_of_the_test "
                f"({v.frequency_of_the_test}): a checkpoint holds the models evaluated at its round, "
                f"got {h.hub_push_every}")


def parse_recipe(raw: Any, where: str = "recipe", source: Path | None = None) -> Recipe:
    """Build and validate a :class:`Recipe` from an already-parsed YAML mapping."""
    from fedml_pfedseq.strategies import method_class  # strategies declare their own algorithm_args

    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of sections, got {type(raw).__name__}")
    allowed = set(SECTIONS) | {"algorithm_args"}
    for section in raw:
        if section not in allowed:
            raise RecipeError(f"{where}: unknown section {section!r}{_suggest(section, allowed)}; "
                              f"allowed: {sorted(allowed)}")
    recipe = Recipe(source=source, **{
        name: build_section(cls, raw.get(name), f"{where}: {name}") for name, cls in SECTIONS.items()})
    try:
        method = method_class(recipe.train_args.federated_optimizer)
    except KeyError as err:
        raise RecipeError(f"{where}: train_args.federated_optimizer {err.args[0]}") from None
    recipe.algorithm_args = build_section(method.Args, raw.get("algorithm_args"), f"{where}: algorithm_args")
    _validate(recipe, where)
    check_with_other_sections = getattr(recipe.algorithm_args, "check_recipe", None)  # a method's cross-section rules
    if check_with_other_sections is not None:
        try:
            check_with_other_sections(recipe)
        except RecipeError as err:
            raise RecipeError(f"{where}: {err}") from None
    return recipe


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

