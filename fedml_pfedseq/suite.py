"""Suites: a YAML list of recipes run one after another, compared in one table and one plot.

    recipes:                                   # paths relative to the suite file
      - ../omniglot_local.yaml
      - {recipe: ../omniglot_pfedseq.yaml, name: variant_b, set: [algorithm_args.seq_len=1]}  # a variant
    overrides: ["train_args.comm_round=3"]     # optional, applied to every recipe
    output_dir: runs/default                   # each run writes to output_dir/<name>
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from fedml_pfedseq.config import RecipeError, load_recipe, load_yaml

SUITE_KEYS = {"recipes", "overrides", "output_dir", "description"}
ENTRY_KEYS = {"recipe", "name", "set"}


def load_entry(suite: Path, index: int, entry, overrides: list[str]):
    """A suite entry: a recipe path, or {recipe: path, name: run name, set: [overrides of this run only]}."""
    if isinstance(entry, str):
        return load_recipe(suite.parent / entry, overrides)
    where = f"{suite}: recipes[{index}]"
    if not isinstance(entry, dict) or "recipe" not in entry or set(entry) - ENTRY_KEYS:
        raise RecipeError(f"{where}: expected a path or a mapping with keys {sorted(ENTRY_KEYS)} "
                          f"('recipe' required), got {entry!r}")
    extra = entry.get("set") or []
    if not isinstance(extra, list):
        raise RecipeError(f"{where}: 'set' must be a list of section.key=value overrides, got {extra!r}")
    return load_recipe(suite.parent / entry["recipe"], overrides + extra, label=entry.get("name"))


def load_suite(path: str | Path, extra_overrides: list[str] | None = None) -> tuple[list, Path]:
    """Every recipe of the suite, loaded and validated up front (so a typo in the last one fails at once)."""
    path = Path(path)
    raw = load_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("recipes"), list) or not raw["recipes"]:
        raise RecipeError(f"{path}: a suite is a mapping with a non-empty list 'recipes'")
    unknown = set(raw) - SUITE_KEYS
    if unknown:
        raise RecipeError(f"{path}: unknown suite key(s) {sorted(unknown)}; allowed: {sorted(SUITE_KEYS)}")
    overrides = list(raw.get("overrides") or []) + list(extra_overrides or [])
    recipes = [load_entry(path, i, entry, overrides) for i, entry in enumerate(raw["recipes"])]
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise RecipeError(f"{path}: two runs share a name in {names}; give variants a 'name'")
    return recipes, Path(raw.get("output_dir") or f"runs/{path.stem}")


def run_suite(path: str | Path, extra_overrides: list[str] | None = None, output_dir: Path | None = None,
              progress: bool = True) -> list[dict]:
    """Run every recipe of the suite at ``path`` (each with ``extra_overrides``), then write and print one comparison
    table and learning-curve plot; returns the runs' summaries."""
    # here, not at the top: loading a suite (`pfedseq check`) needs neither torch nor matplotlib
    from fedml_pfedseq.results import format_table, plot_suite
    from fedml_pfedseq.simulation import run_recipe

    recipes, default_dir = load_suite(path, extra_overrides)
    output_dir = Path(output_dir or default_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summaries, run_dirs = [], {}
    for recipe in recipes:
        run_dirs[recipe.name] = output_dir / recipe.name
        summaries.append(run_recipe(recipe, run_dirs[recipe.name], progress=progress))
    headers = ["recipe", "method", "rounds", "clients", "test acc (mean)", "test acc (std)", "val acc (mean)",
               "s/round"]
    rows = [[s["recipe"], s["method"], s["rounds"], s["clients"], s["final_test_accuracy_mean"],
             s["final_test_accuracy_std"], s["final_validation_accuracy_mean"], f"{s['mean_round_seconds']:.1f}"]
            for s in summaries]
    table = format_table(headers, rows)
    (output_dir / "suite_summary.md").write_text(table + "\n")
    with (output_dir / "suite_summary.csv").open("w", newline="") as f:
        csv.writer(f).writerows([headers] + rows)
    curves = {name: json.loads((d / "metrics.json").read_text())["eval"] for name, d in run_dirs.items()}
    plot_suite(curves, f"suite {Path(path).stem}", output_dir / "suite_learning_curves.png")
    print(f"\nsuite {Path(path).stem} ({output_dir}):\n{table}")
    return summaries
