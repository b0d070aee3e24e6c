"""Load the offline image datasets (Hugging Face parquet) or, where a network exists, a Hub dataset.

The parquet files are looked up in a data directory: the ``data_dir`` a recipe names, else ``$PFEDSEQ_DATA_DIR``,
else ``../shared/data`` beside a source checkout; the package's own data (the embedded Omniglot,
``shipped.DATA_DIR``) is always searched last, so the default run works on a machine without ``shared/``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

from fedml_pfedseq.shipped import DATA_DIR as EMBEDDED_DATA_DIR

CHECKOUT = Path(__file__).resolve().parents[2]  # a source checkout's root (in a wheel: site-packages' parent)
DATA_DIR_ENV = "PFEDSEQ_DATA_DIR"


@dataclass(frozen=True)
class DatasetInfo:
    """Where a known dataset lives and which columns mean what."""

    files: dict[str, str]  # split name -> parquet file name
    label_column: str
    image_column: str = "image"


KNOWN_DATASETS: dict[str, DatasetInfo] = {
    "omniglot": DatasetInfo(files={"train": "omniglot28.parquet"}, label_column="alphabet"),
    "cifar10": DatasetInfo(
        files={"train": "cifar10_train.parquet", "test": "cifar10_test.parquet"}, label_column="label"
    ),
    "pacs": DatasetInfo(files={"train": "pacs112.parquet"}, label_column="label"),
}


def data_search_path(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for parquet files, in order."""
    candidates = []
    if data_dir is not None:
        candidates.append(Path(data_dir))
    elif os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]))
    else:
        candidates.append(CHECKOUT.parent / "shared" / "data")
    candidates.append(EMBEDDED_DATA_DIR)
    return [path.absolute() for path in candidates]  # a relative one means this process's folder, named once


def find_data_file(file_name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Return the first existing ``file_name`` on the search path, or fail naming every place looked at."""
    searched = data_search_path(data_dir)
    for directory in searched:
        if (directory / file_name).is_file():
            return directory / file_name
    places = ", ".join(str(d) for d in searched)
    raise FileNotFoundError(
        f"data file {file_name!r} not found in: {places}. Set data_args.data_dir in the recipe or ${DATA_DIR_ENV}."
    )


def dataset_source(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                   hub_id: str | None = None) -> str:
    """Where ``load_image_dataset`` reads from (the parquet file, or the Hub id), for messages about its content."""
    if hub_id:
        return f"Hub dataset {hub_id!r}"
    try:
        return str(find_data_file(KNOWN_DATASETS[name].files[split], data_dir))
    except (KeyError, FileNotFoundError):
        return f"dataset {name!r}"


def load_image_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    hub_id: str | None = None,
) -> datasets.Dataset:
    """Load one split of a known dataset from parquet, or of ``hub_id`` from the Hub when one is given."""
    import datasets  # here: finding a file (``pfedseq check``) must not pay for importing datasets

    if hub_id:
        return datasets.load_dataset(hub_id, split=split)
    if name not in KNOWN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(KNOWN_DATASETS)} (or give data_args.hub_id)")
    info = KNOWN_DATASETS[name]
    if split not in info.files:
        raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {sorted(info.files)}")
    path = find_data_file(info.files[split], data_dir)
    return datasets.load_dataset("parquet", data_files=str(path), split="train")
