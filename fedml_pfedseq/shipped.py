"""What ships inside the package, in ``fedml_pfedseq/assets/``: the bundled backbone (``hf_models``), the embedded
Omniglot data (``data``), the recipes with their suites and grids (``recipes``) and the model-card templates
(``cards``). They are found through ``importlib.resources``, so an installed wheel finds them wherever it is
installed; in a source checkout those four folders are links to the checkout's own, which stay where they are.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

ASSETS = Path(str(importlib.resources.files("fedml_pfedseq") / "assets"))
MODELS_DIR = ASSETS / "hf_models"
DATA_DIR = ASSETS / "data"
RECIPES_DIR = ASSETS / "recipes"
CARD_TEMPLATES_DIR = ASSETS / "cards" / "templates"


def shipped_recipes() -> dict[str, Path]:
    """Every shipped recipe, suite and grid by its name: ``omniglot_pfedseq``, ``suites/default``,
    ``grids/rotated``, ``grids/paper_scale/table1``."""
    return {path.relative_to(RECIPES_DIR).with_suffix("").as_posix(): path
            for path in sorted(RECIPES_DIR.rglob("*.yaml"))}


def resolve_recipe(path: str | Path) -> Path:
    """``path`` where it exists; else the shipped recipe it names, with or without ``.yaml`` and a leading
    ``recipes/`` (so ``pfedseq run omniglot_pfedseq`` and the docs' ``recipes/omniglot_pfedseq.yaml`` work from any
    folder); else ``path`` unchanged, for the caller to report as missing."""
    path = Path(path)
    if path.exists():
        return path
    name = path.as_posix().removesuffix(".yaml").removeprefix("recipes/")
    return shipped_recipes().get(name, path)
