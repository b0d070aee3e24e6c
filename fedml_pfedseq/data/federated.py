"""Build the federation's data: load, partition into clients, split each client into train/validation/test."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedml_pfedseq.config import DataArgs, RecipeError
from fedml_pfedseq.data.loading import KNOWN_DATASETS, dataset_source, load_image_dataset
from fedml_pfedseq.data.partition import partition_by_column, partition_dirichlet, split_each, split_train_val_test
from fedml_pfedseq.data.transforms import cluster_transform, image_classification_transform

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "validation", "test")


@dataclass
class ClientData:
    """One client's three splits, each yielding {pixel_values, labels} through a lazy transform, and where they came
    from: each split's rows of the data file, the client's value of the partition column (its drawer or domain;
    None for Dirichlet and silo partitions) and the transform its images pass through (``data_args.
    cluster_transforms``), which its saved adapter names so that others can rebuild its data."""

    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    rows: dict[str, list[int]] = field(default_factory=dict)
    partition_value: Any = None
    shift: str = "identity"


@dataclass
class FederatedData:
    clients: list[ClientData]
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def client_seed(seed: int, client: int, purpose: int = 0) -> int:
    """A per-client seed derived from the run seed (stable across runs and processes)."""
    return int(np.random.SeedSequence([seed, client, purpose]).generate_state(1)[0])


def partition_indices(dataset: datasets.Dataset, args: DataArgs, label_column: str,
                      num_clients: int | None, seed: int) -> list[np.ndarray]:
    """Row indices of each client, by the recipe's partition method."""
    if args.partition_method == "column":
        if args.partition_column not in dataset.column_names:
            default = " (the default)" if args.partition_column == DataArgs.partition_column else ""
            raise RecipeError(f"{source(args)} has no column {args.partition_column!r}, which "
                              f"data_args.partition_column{default} names (columns: {dataset.column_names}); set "
                              "data_args.partition_column, or partition_method: dirichlet")
        parts = partition_by_column(dataset.data.column(args.partition_column).to_numpy())
        if num_clients is not None and num_clients != len(parts) * args.partition_splits:
            raise RecipeError(f"train_args.client_num_in_total is {num_clients} but column "
                              f"{args.partition_column!r} has {len(parts)} distinct values "
                              f"({args.partition_splits} client(s) each, data_args.partition_splits)")
        if args.partition_splits > 1:  # each value's rows into k silos, drawn from the run's seed
            parts = split_each(parts, args.partition_splits, client_seed(seed, 0, purpose=7))
        return parts
    if num_clients is None:
        raise RecipeError("train_args.client_num_in_total is required with partition_method 'dirichlet'")
    labels = dataset.data.column(label_column).to_numpy()
    return partition_dirichlet(labels, num_clients, args.partition_alpha, seed,
                               args.partition_min_size, args.partition_max_retries)


def source(args: DataArgs) -> str:
    return dataset_source(args.dataset, args.dataset_split, args.data_dir, args.hub_id)


def columns(args: DataArgs) -> tuple[str, str]:
    """The (image, label) columns: the recipe's, else the known dataset's, else "image" and "label"."""
    info = KNOWN_DATASETS.get(args.dataset)
    return (args.image_column or (info.image_column if info else "image"),
            args.label_column or (info.label_column if info else "label"))


def _load_labelled(args: DataArgs) -> tuple[datasets.Dataset, str, list[str]]:
    """The dataset, its label column and its label names (ClassLabel names, else the sorted distinct values)."""
    dataset = load_image_dataset(args.dataset, split=args.dataset_split, data_dir=args.data_dir, hub_id=args.hub_id)
    image_column, label_column = columns(args)
    for column, key in ((image_column, "data_args.image_column"), (label_column, "data_args.label_column")):
        if column not in dataset.column_names:
            raise RecipeError(f"{source(args)} has no column {column!r} ({key} of dataset {args.dataset!r}; "
                              f"columns: {dataset.column_names})")
    feature = dataset.features[label_column]
    label_names = list(feature.names) if hasattr(feature, "names") else [
        str(v) for v in sorted(set(dataset.data.column(label_column).to_pylist()))]
    return dataset, label_column, label_names


def load_silo(args: DataArgs, client: int) -> tuple[datasets.Dataset, np.ndarray]:
    """Client ``client``'s own file (partition_method "silo") and its labels, checked against ``label_names``."""
    path = Path(args.data_files[client])
    if not path.is_file():
        raise FileNotFoundError(f"data_args.data_files[{client}]: client {client}'s data {path} does not exist (with "
                                "partition_method 'silo' each client's party reads its own file on its machine)")
    import datasets  # here, as in data/loading.py: servers and the GPU check import this module without datasets

    dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
    image_column, label_column = columns(args)
    missing = {image_column, label_column} - set(dataset.column_names)
    if missing:
        raise RecipeError(f"data_args.data_files[{client}]: {path} lacks column(s) {sorted(missing)} (columns: "
                          f"{dataset.column_names}; set data_args.label_column)")
    labels = dataset.data.column(label_column).to_numpy()
    if len(labels) == 0 or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= len(args.label_names):
        raise RecipeError(f"data_args.data_files[{client}]: {path}'s {label_column!r} must hold integer labels in "
                          f"[0, {len(args.label_names)}) indexing data_args.label_names, and at least one row")
    return dataset, labels


def dataset_label_names(args: DataArgs) -> list[str]:
    """The task's label space: what a server needs to build a shared head, without any client's samples."""
    return list(args.label_names) if args.partition_method == "silo" else _load_labelled(args)[2]


def client_splits(dataset: datasets.Dataset, rows: np.ndarray, labels: np.ndarray, args: DataArgs, processor,
                  label_column: str, client: int, seed: int, partition_value: Any = None) -> ClientData:
    """Client ``client``'s rows of ``dataset``, subsampled (``samples_per_client``) and split train/val/test, with
    the backbone's image transform after the client's cluster shift."""
    if args.samples_per_client is not None and len(rows) > args.samples_per_client:
        rng = np.random.default_rng(client_seed(seed, client, purpose=1))
        rows = np.sort(rng.choice(rows, size=args.samples_per_client, replace=False))
    parts = split_train_val_test(labels[rows], tuple(args.split_fractions), client_seed(seed, client, 2))
    shift = cluster_transform(args.cluster_transforms, client)
    transform = image_classification_transform(processor, columns(args)[0], label_column, shift)
    return ClientData(*(transformed(dataset.select(rows[part]), transform, args.preprocess) for part in parts),
                      rows={name: rows[part].tolist() for name, part in zip(SPLITS, parts)},
                      partition_value=partition_value, shift=shift)


def transformed(split: datasets.Dataset, transform, preprocess: bool) -> datasets.Dataset:
    """``split`` yielding {pixel_values, labels}: transformed once and kept as tensors (``preprocess``: datasets'
    ``map``, cached on disk under a fingerprint of the rows and the transform with its processor, so a later run
    of the same data reads the tensors back), or transformed lazily on every access."""
    if not preprocess:
        return split.with_transform(transform)

    def as_arrays(batch: dict) -> dict:
        return {key: value.numpy() for key, value in transform(batch).items()}

    import datasets

    shape = transform(split[:1])["pixel_values"].shape[1:]
    features = datasets.Features({  # fixed-shape arrays: read back as whole blocks, not as nested lists
        "pixel_values": datasets.Array3D(shape=tuple(shape), dtype="float32"), "labels": datasets.Value("int64")})
    return split.map(as_arrays, batched=True, remove_columns=split.column_names, features=features
                     ).with_format("torch")


def silo_client(args: DataArgs, processor, client: int, seed: int) -> ClientData:
    dataset, labels = load_silo(args, client)
    return client_splits(dataset, np.arange(len(dataset)), labels, args, processor, columns(args)[1], client, seed)


def build_federated_data(args: DataArgs, processor, num_clients: int | None, seed: int) -> FederatedData:
    """Load ``args.dataset``, partition it, split each client and attach the backbone's image transform; with
    partition_method "silo", each client's own file instead."""
    if args.partition_method == "silo":
        return FederatedData([silo_client(args, processor, i, seed) for i in range(len(args.data_files))],
                             list(args.label_names))
    dataset, label_column, label_names = _load_labelled(args)
    labels = dataset.data.column(label_column).to_numpy()
    parts = partition_indices(dataset, args, label_column, num_clients, seed)
    values = dataset.data.column(args.partition_column) if partition_column(args) else None  # str or int, as stored
    clients = [client_splits(dataset, rows, labels, args, processor, label_column, i, seed,
                             None if values is None else values[int(rows[0])].as_py())
               for i, rows in enumerate(parts)]
    return FederatedData(clients=clients, label_names=label_names)


def partition_column(args: DataArgs) -> str | None:
    """The column whose value each client holds (partition_method "column"), else None."""
    return args.partition_column if args.partition_method == "column" else None


def load_dataset_args(args: DataArgs, client: int | None = None) -> dict | None:
    """``datasets.load_dataset`` arguments loading the data that client ``client``'s rows index, naming a file by its
    name alone (a card must not name this machine's folders). With "silo" partitions that is the client's own file,
    so there is none for the whole run (``client`` None)."""
    if args.partition_method == "silo":
        return None if client is None else {"path": "parquet", "data_files": Path(args.data_files[client]).name,
                                            "split": "train"}
    if args.hub_id:
        return {"path": args.hub_id, "split": args.dataset_split}
    return {"path": "parquet", "data_files": KNOWN_DATASETS[args.dataset].files[args.dataset_split], "split": "train"}


def build_client_data(args: DataArgs, processor, num_clients: int | None, seed: int,
                      client: int) -> tuple[ClientData, list[str]]:
    """One client's splits and the label space, as ``build_federated_data`` makes them: what a client party needs.
    With partition_method "silo" only that client's own file is read."""
    def check(count: int) -> None:
        if not 0 <= client < count:
            raise RecipeError(f"the recipe's partition has {count} clients; there is no client {client}")

    if args.partition_method == "silo":
        check(len(args.data_files))
        return silo_client(args, processor, client, seed), list(args.label_names)
    data = build_federated_data(args, processor, num_clients, seed)
    check(len(data.clients))
    return data.clients[client], data.label_names
