"""Where a recipe's inputs are, found without loading them: its backbone and its data file. ``pfedseq check`` asks
``missing_inputs`` so that a machine that lacks one is told before any run starts (torch-free, like the check)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from fedml_pfedseq.data.loading import KNOWN_DATASETS, find_data_file
from fedml_pfedseq.shipped import MODELS_DIR


def bundled_models() -> list[str]:
    return sorted(p.parent.name for p in MODELS_DIR.glob("*/config.json"))


def resolve_backbone(name: str) -> str:
    """A local directory, a model bundled in the package (``shipped.MODELS_DIR``), or a Hub id ``owner/name``
    (returned unchanged).

    A bare name that is neither a directory nor bundled fails here, rather than after minutes of Hub retries.
    """
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise FileNotFoundError(f"backbone directory {name!r} has no config.json")
        return str(Path(name))
    if (MODELS_DIR / name / "config.json").is_file():
        return str(MODELS_DIR / name)
    if "/" not in name or name.startswith((".", "/")):
        raise FileNotFoundError(f"backbone {name!r} is not a directory, not a model bundled in {MODELS_DIR} "
                                f"(bundled: {bundled_models()}), and not a Hub id of the form owner/name")
    return name


def missing_inputs(recipe) -> tuple[list[str], list[str]]:
    """(what this machine lacks to run ``recipe``, what a run would download): a data file found nowhere on the
    search path, a backbone that is no directory, bundled model or Hub id, Ray where the recipe's engine is Ray; a
    Hub backbone or dataset that is not in the Hugging Face cache. A silo client's own file is its party's to check
    (``pfedseq party``)."""
    from huggingface_hub import try_to_load_from_cache  # light: no torch

    missing, downloads = [], []
    data = recipe.data_args
    if data.hub_id:
        if not Path(data.hub_id).is_dir():  # a local folder in the Hub's layout is read as it is
            downloads.append(f"dataset {data.hub_id!r} from the Hub")
    elif data.partition_method != "silo" and data.dataset in KNOWN_DATASETS and \
            data.dataset_split in KNOWN_DATASETS[data.dataset].files:
        try:
            find_data_file(KNOWN_DATASETS[data.dataset].files[data.dataset_split], data.data_dir)
        except FileNotFoundError as err:
            missing.append(str(err))
    if recipe.common_args.engine == "ray" and importlib.util.find_spec("ray") is None:
        missing.append("Ray, which common_args.engine: ray needs: pip install '.[ray]'")
    try:
        backbone = resolve_backbone(recipe.model_args.model)
    except FileNotFoundError as err:
        missing.append(str(err))
    else:
        if not Path(backbone).is_dir() and not isinstance(try_to_load_from_cache(backbone, "config.json"), str):
            downloads.append(f"backbone {backbone!r} from the Hub (not in this machine's Hugging Face cache)")
    return missing, downloads
