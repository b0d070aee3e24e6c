"""Grids: methods x scenarios x seeds, run cell by cell, resumable, summarised as mean +- std over seeds.

    description: paper Table 1 on CPU budget
    methods:                                     # recipe files (paths relative to the grid file), as in suites
      - ../omniglot_fedavg.yaml
      - {recipe: ../omniglot_pfedseq.yaml, name: pfedseq_b, set: [algorithm_args.seq_len=1]}
    scenarios:                                   # name -> overrides applied to every method's recipe
      omniglot: []
      pacs: [data_args.dataset=pacs, data_args.partition_column=domain, train_args.client_num_in_total=4]
    seeds: [0, 1, 2]
    overrides: [train_args.comm_round=12]        # optional, every cell
    output_dir: runs/table1

Each cell (scenario, method, seed) is one simulator run in ``output_dir/<scenario>/<method>/seed_<seed>/``. A cell
counts as done when its ``summary.json`` exists; an interrupted grid resumes by running only the cells that are
not done. A done cell whose saved recipe differs from the grid's is an error, never silently mixed into a table.
A method's row name is its entry's ``name``, else its method (``train_args.federated_optimizer``).
"""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from fedml_pfedseq.config import Recipe, RecipeError, load_yaml
from fedml_pfedseq.results import format_table
from fedml_pfedseq.simulation import run_recipe
from fedml_pfedseq.suite import load_entry

GRID_KEYS = {"description", "methods", "scenarios", "seeds", "overrides", "output_dir"}


@dataclass
class Cell:
    scenario: str
    method: str  # the row name
    seed: int
    recipe: Recipe
    output_dir: Path

    @property
    def done(self) -> bool:
        return (self.output_dir / "summary.json").is_file()

    def check_unchanged(self) -> None:
        """A done cell must have been run with the recipe the grid now builds for it."""
        saved = yaml.safe_load((self.output_dir / "recipe.yaml").read_text())
        if saved != yaml.safe_load(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False)):
            raise RecipeError(f"cell {self.scenario}/{self.method}/seed {self.seed} in {self.output_dir} was run "
                              "with a different recipe than the grid now gives it; delete that folder to rerun it, "
                              "or give the grid another output_dir")


def _string_list(raw, key: str, where: str) -> list[str]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{where}: {key} must be a list of section.key=value strings, got {value!r}")
    return value


def load_grid(path: str | Path, extra_overrides: list[str] | None = None,
              output_dir: Path | None = None) -> tuple[list[Cell], Path]:
    """Every cell of the grid and its output folder; each recipe is loaded and validated up front, so a typo fails
    before any run."""
    path = Path(path)
    raw = load_yaml(path)
    where = str(path)
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a grid is a mapping with keys {sorted(GRID_KEYS)}")
    unknown = set(raw) - GRID_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown grid key(s) {sorted(unknown)}; allowed: {sorted(GRID_KEYS)}")
    methods, scenarios, seeds = raw.get("methods"), raw.get("scenarios"), raw.get("seeds", [0])
    if not isinstance(methods, list) or not methods:
        raise RecipeError(f"{where}: methods must be a non-empty list of recipes")
    if not isinstance(scenarios, dict) or not scenarios:
        raise RecipeError(f"{where}: scenarios must be a non-empty mapping of name -> list of overrides")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds) or len(set(seeds)) != len(seeds):
        raise RecipeError(f"{where}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    common = _string_list(raw, "overrides", where) + list(extra_overrides or [])
    root = Path(output_dir or raw.get("output_dir") or f"runs/{path.stem}")
    cells = []
    for scenario, scenario_overrides in scenarios.items():
        scenario_overrides = _string_list(scenarios, scenario, f"{where}: scenarios")
        names = []
        for index, entry in enumerate(methods):
            for seed in seeds:
                recipe = load_entry(path, index, entry, [*common, *scenario_overrides,
                                                         f"common_args.random_seed={seed}"])
                name = entry.get("name") if isinstance(entry, dict) and entry.get("name") else \
                    recipe.train_args.federated_optimizer
                recipe.label = f"{scenario}_{name}_seed{seed}"
                cells.append(Cell(scenario, name, seed, recipe, root / scenario / name / f"seed_{seed}"))
            names.append(name)
        if len(set(names)) != len(names):
            raise RecipeError(f"{where}: two methods share the row name in {names}; give variants a 'name'")
    return cells, root


def run_grid(path: str | Path, extra_overrides: list[str] | None = None, output_dir: Path | None = None,
             progress: bool = True) -> dict:
    """Run every cell that is not done yet, then write the summary; returns it (see ``summarize``)."""
    cells, root = load_grid(path, extra_overrides, output_dir)
    for cell in cells:
        if cell.done:
            cell.check_unchanged()
    todo = [cell for cell in cells if not cell.done]
    for cell in tqdm(todo, desc=f"grid {Path(path).stem}", disable=not progress):
        run_recipe(cell.recipe, cell.output_dir, progress=False)
    return summarize(cells, root)


def summarize(cells: list[Cell], root: Path) -> dict:
    """Per (scenario, method): final mean test and validation accuracy over clients, then mean and std over seeds.

    Writes ``grid_cells.csv`` (one row per cell), ``grid_summary.json`` and ``grid_table.md`` (rows: methods,
    columns: scenarios, "mean +- std (seeds)")."""
    rows, groups = [], {}
    for cell in cells:
        summary = json.loads((cell.output_dir / "summary.json").read_text())
        row = {"scenario": cell.scenario, "method": cell.method, "seed": cell.seed,
               "test_accuracy": summary["final_test_accuracy_mean"],
               "validation_accuracy": summary["final_validation_accuracy_mean"],
               "round_seconds": summary["mean_round_seconds"]}
        rows.append(row)
        groups.setdefault((cell.scenario, cell.method), []).append(row)
    table = {}
    for (scenario, method), group in groups.items():
        test = [r["test_accuracy"] for r in group]
        table.setdefault(method, {})[scenario] = {
            "test_mean": statistics.fmean(test), "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
            "validation_mean": statistics.fmean(r["validation_accuracy"] for r in group), "seeds": len(group)}
    scenarios = list(dict.fromkeys(cell.scenario for cell in cells))
    lines = [[method] + [f"{by[s]['test_mean']:.4f} +- {by[s]['test_std']:.4f} ({by[s]['seeds']})" for s in scenarios]
             for method, by in table.items()]
    markdown = format_table(["method"] + scenarios, lines)
    root.mkdir(parents=True, exist_ok=True)
    with (root / "grid_cells.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (root / "grid_summary.json").write_text(json.dumps({"table": table, "cells": rows}, indent=2))
    (root / "grid_table.md").write_text("Mean local test accuracy after the last round: mean +- std over seeds "
                                        "(number of seeds)\n\n" + markdown + "\n")
    return {"table": table, "cells": rows, "markdown": markdown}
