"""Grids: methods x scenarios x seeds, each method tuned on validation first, run cell by cell, resumable, and
summarised as mean +- std over seeds.

    description: paper Table 1 on CPU budget
    methods:                                     # recipe files (paths relative to the grid file), as in suites
      - ../omniglot_fedavg.yaml
      - {recipe: ../omniglot_pfedseq.yaml, name: pfedseq_b, set: [algorithm_args.seq_len=1]}
    scenarios:                                   # name -> overrides applied to every method's recipe
      omniglot: []
      pacs: [data_args.dataset=pacs, data_args.partition_column=domain, train_args.client_num_in_total=4]
    seeds: [0, 1, 2]
    overrides: [train_args.comm_round=12]        # optional, every cell
    tuning:                                      # optional: the same budget for every method
      rounds: 4                                  # each candidate runs this many rounds, at seed `seed`
      seed: 0
      grid: {train_args.learning_rate: [0.05, 0.5]}                 # every method
      grid_chosen_by: FedAvg                     # optional: see below
      methods: {FedRep: {algorithm_args.fedrep_head_epochs: [1, 10]}}  # a method's key hyperparameter
    output_dir: runs/table1

Tuning runs every candidate (the product of the grid's values and the method's own) per (scenario, method) in
``<scenario>/<method>/tune/<candidate>/`` and keeps the one with the best final mean *validation* accuracy (the
first on ties); the test split never takes part. With ``grid_chosen_by: M`` the grid's values are shared, as the
paper shares one learning rate per dataset: method M's runs choose them per scenario first, then every other
method tunes only its own values at those (half the runs of the full product for two values each); a method
with a single candidate is not tuned. The seed cells then run in ``<scenario>/<method>/seed_<k>/`` with the chosen
values. A cell is done when its ``summary.json`` exists, so an interrupted grid resumes with the
cells that are not; a done cell whose saved recipe differs from the grid's is an error, never mixed into a table.
A method's row name is its entry's ``name``, else its method (``train_args.federated_optimizer``); an entry's own
``set`` overrides are applied last, so they win over scenarios and tuning. Overrides given to the command
(``--set``) come after the grid's ``overrides`` and the scenario's, so they win over both (and lose only to an
entry's own ``set`` and to tuning values).

Cells run in parallel with ``workers`` > 1 (one process per cell, ``cores // workers`` torch threads each where
the recipe does not set ``device_args.num_threads``), and several ``pfedseq grid`` processes may share one output
folder, on one machine or on several with a shared file system: a process claims a cell by creating its
``.grid_lock`` (host and pid) before running it, leaves a cell another live process holds to that process and waits
for it, and takes over the cell of a process that died on this host (it resumes from the cell's checkpoint).
Remove a lock by hand only when its process on another host is gone.
"""
from __future__ import annotations

import csv
import itertools
import json
import multiprocessing
import os
import socket
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from fedml_pfedseq.config import ENGINES, Recipe, RecipeError, load_yaml, recipe_changes
from fedml_pfedseq.environment import gpu_ids
from fedml_pfedseq.suite import load_entry

GRID_KEYS = {"description", "methods", "scenarios", "seeds", "overrides", "tuning", "output_dir"}
TUNING_KEYS = {"rounds", "seed", "grid", "grid_chosen_by", "methods"}
OUTPUT_ONLY = ("hub_args", "tracking_args", "common_args.checkpoint", "common_args.output_dir",
               "common_args.engine", "ray_args")  # how a cell's clients run does not change its results
LOCK_FILE = ".grid_lock"  # in a cell's folder while a process runs it: {"host": ..., "pid": ...}


@dataclass
class Cell:
    """One simulator run of the grid: a seed cell, or a tuning candidate (``candidate`` names its values)."""

    scenario: str
    method: str  # the row name
    seed: int
    recipe: Recipe
    output_dir: Path
    candidate: dict[str, object] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return (self.output_dir / "summary.json").is_file()

    def summary(self) -> dict:
        return json.loads((self.output_dir / "summary.json").read_text())

    def check_unchanged(self) -> None:
        """A done cell must have been run with the recipe the grid now builds for it (up to keys that do not
        change results: what is saved or pushed, logging)."""
        saved = yaml.safe_load((self.output_dir / "recipe.yaml").read_text())
        changes = recipe_changes(saved, self.recipe, ignore=OUTPUT_ONLY)
        if changes:
            raise RecipeError(f"cell {self.output_dir} was run with a different recipe than the grid now gives it "
                              f"({'; '.join(changes)}); delete that folder to rerun it, or give the grid another "
                              "output_dir")


@dataclass
class Grid:
    path: Path
    methods: list  # suite-style entries
    scenarios: dict[str, list[str]]
    seeds: list[int]
    overrides: list[str]  # every cell: the grid file's
    root: Path
    tuning: dict | None
    command_overrides: list[str] = field(default_factory=list)  # every cell, after its scenario's: ``--set``
    names: list[str] = field(default_factory=list)  # each method's row name, set by load_grid

    def recipe(self, scenario: str, index: int, extra: list[str]) -> Recipe:
        """Method ``index``'s recipe in ``scenario`` with ``extra`` overrides."""
        return load_entry(self.path, index, self.methods[index],
                          [*self.overrides, *self.scenarios[scenario], *self.command_overrides, *extra])

    def candidates(self, method: str, shared: dict[str, object] | None = None) -> list[dict[str, object]]:
        """Every tuning candidate of ``method``: {"section.key": value} (one empty candidate without tuning);
        ``shared``: the grid's values chosen by ``grid_chosen_by``, which every other method then takes as they are."""
        if not self.tuning:
            return [{}]
        grid = self.tuning.get("grid") or {}
        if shared is not None and method != self.tuning.get("grid_chosen_by"):
            grid = {key: [shared[key]] for key in grid}
        space = {**grid, **((self.tuning.get("methods") or {}).get(method) or {})}
        keys = list(space)
        return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]

    def tuning_cells(self, only: str | None = None, shared: dict[str, dict] | None = None) -> list[Cell]:
        """The tuning runs (of method ``only``, else of every method), with ``shared[scenario]`` the grid values
        chosen by ``grid_chosen_by`` in that scenario, if any."""
        if not self.tuning:
            return []
        rounds, seed = self.tuning["rounds"], self.tuning.get("seed", 0)
        cells = []
        for scenario in self.scenarios:
            for index, name in enumerate(self.names):
                candidates = self.candidates(name, (shared or {}).get(scenario))
                if (only is not None and name != only) or len(candidates) == 1:
                    continue  # one candidate (a method with no key values, at the shared values): nothing to tune
                for candidate in candidates:
                    label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in candidate.items())
                    extra = [*overrides_of(candidate), f"train_args.comm_round={rounds}",
                             f"common_args.random_seed={seed}"]
                    recipe = self.recipe(scenario, index, extra)
                    recipe.label = f"{scenario}_{name}_tune_{label}"
                    cells.append(Cell(scenario, name, seed, recipe, self.root / scenario / name / "tune" / label,
                                      candidate))
        return cells

    def select(self, rows: list[str] | None) -> set[str]:
        """The row names to run: ``rows`` (each checked to be a row of this grid), else every row."""
        unknown = [row for row in rows or [] if row not in self.names]
        if unknown:
            raise RecipeError(f"{self.path}: {unknown} are not rows of this grid; its rows are {self.names}")
        return set(rows or self.names)

    def select_seeds(self, seeds: list[int] | None) -> set[int]:
        """The seeds to run: ``seeds`` (each checked to be one of this grid's), else every seed."""
        unknown = [seed for seed in seeds or [] if seed not in self.seeds]
        if unknown:
            raise RecipeError(f"{self.path}: {unknown} are not seeds of this grid; its seeds are {self.seeds}")
        return set(seeds or self.seeds)

    def stand_in_choice(self) -> dict[str, dict] | None:
        """With ``grid_chosen_by``, the grid's first values in every scenario, standing in for the choice before
        it is made (to count and validate the runs); else None."""
        if not (self.tuning or {}).get("grid_chosen_by"):
            return None
        first = {key: values[0] for key, values in self.tuning["grid"].items()}
        return {scenario: first for scenario in self.scenarios}

    def planned_tuning_cells(self) -> list[Cell]:
        """As many runs as tuning will make."""
        return self.tuning_cells(shared=self.stand_in_choice())

    def seed_cells(self, chosen: dict[tuple[str, str], dict[str, object]]) -> list[Cell]:
        cells = []
        for scenario in self.scenarios:
            for index, name in enumerate(self.names):
                candidate = chosen.get((scenario, name), {})
                for seed in self.seeds:
                    recipe = self.recipe(scenario, index, [*overrides_of(candidate), f"common_args.random_seed={seed}"])
                    recipe.label = f"{scenario}_{name}_seed{seed}"
                    cells.append(Cell(scenario, name, seed, recipe, self.root / scenario / name / f"seed_{seed}",
                                      candidate))
        return cells


def overrides_of(candidate: dict[str, object]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in candidate.items()]


def choose(tuning: list[Cell]) -> tuple[dict[tuple[str, str], dict[str, object]], list[dict]]:
    """Per (scenario, method), the candidate with the best final mean validation accuracy (first on ties), and a
    row per candidate for the record."""
    best, rows = {}, []
    for cell in tuning:
        validation = cell.summary()["final_validation_accuracy_mean"]
        rows.append({"scenario": cell.scenario, "method": cell.method, "candidate": cell.candidate,
                     "validation_accuracy": validation})
        key = (cell.scenario, cell.method)
        if key not in best or validation > best[key][1]:
            best[key] = (cell.candidate, validation)
    return {key: candidate for key, (candidate, _) in best.items()}, rows


def _string_list(value, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{where} must be a list of section.key=value strings, got {value!r}")
    return value


def _check_tuning(tuning, where: str) -> None:
    if not isinstance(tuning, dict) or set(tuning) - TUNING_KEYS or "rounds" not in tuning:
        raise RecipeError(f"{where}: tuning must be a mapping with 'rounds' and optional {sorted(TUNING_KEYS)}")
    if not isinstance(tuning["rounds"], int) or tuning["rounds"] < 1:
        raise RecipeError(f"{where}: tuning.rounds must be an integer >= 1, got {tuning['rounds']!r}")
    spaces = [("tuning.grid", tuning.get("grid") or {})]
    methods = tuning.get("methods") or {}
    if not isinstance(methods, dict):
        raise RecipeError(f"{where}: tuning.methods must map a method's row name to its {{section.key: [values]}}")
    spaces += [(f"tuning.methods.{m}", space or {}) for m, space in methods.items()]
    for label, space in spaces:
        if not isinstance(space, dict) or not all("." in k and isinstance(v, list) and v for k, v in space.items()):
            raise RecipeError(f"{where}: {label} must map section.key to a non-empty list of values, got {space!r}")


def load_grid(path: str | Path, extra_overrides: list[str] | None = None, output_dir: Path | None = None) -> Grid:
    """The grid, with every recipe it will run loaded and validated up front (a typo fails before any run)."""
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
    if raw.get("tuning") is not None:
        _check_tuning(raw["tuning"], where)
    grid = Grid(path, methods, {name: _string_list(o, f"{where}: scenarios.{name}") for name, o in scenarios.items()},
                seeds, _string_list(raw.get("overrides"), f"{where}: overrides"),
                Path(output_dir or raw.get("output_dir") or f"runs/{path.stem}"), raw.get("tuning"),
                list(extra_overrides or []))
    first = next(iter(grid.scenarios))
    names = [entry["name"] if isinstance(entry, dict) and entry.get("name") else
             grid.recipe(first, i, []).train_args.federated_optimizer for i, entry in enumerate(methods)]
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}: two methods share the row name in {names}; give variants a 'name'")
    unknown_methods = set((grid.tuning or {}).get("methods") or {}) - set(names)
    if unknown_methods:
        raise RecipeError(f"{where}: tuning.methods names {sorted(unknown_methods)}, not rows of this grid {names}")
    chooser = (grid.tuning or {}).get("grid_chosen_by")
    if chooser is not None and (chooser not in names or not grid.tuning.get("grid")):
        raise RecipeError(f"{where}: tuning.grid_chosen_by must name a row of this grid {names} and needs "
                          f"tuning.grid, got {chooser!r}")
    grid.names = names
    shared = grid.stand_in_choice() or {}
    for scenario in grid.scenarios:  # every candidate's recipe validates (single ones, not run, too)...
        for index, name in enumerate(names):
            for candidate in grid.candidates(name, shared.get(scenario)):
                grid.recipe(scenario, index, overrides_of(candidate))
    grid.seed_cells({})  # ...and every seed cell's
    return grid


def holder_is_alive(lock: Path) -> bool:
    """Whether the process named in ``lock`` may still run its cell: on another host it is assumed so; on this
    host, while its pid lives. A lock that cannot be read (its writer died writing it) holds nothing."""
    try:
        holder = json.loads(lock.read_text())
        host, pid = holder["host"], int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def claim(cell: Cell) -> bool:
    """Take ``cell`` for this process: create its lock (atomically), replacing a lock whose process died on this
    host; False when another live process holds it or it finished meanwhile."""
    lock = cell.output_dir / LOCK_FILE
    cell.output_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if holder_is_alive(lock):
                return False
            lock.unlink(missing_ok=True)  # its process is gone: the cell resumes from its checkpoint
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
        if cell.done:
            release(cell)
            return False
        return True
    return False


def release(cell: Cell) -> None:
    (cell.output_dir / LOCK_FILE).unlink(missing_ok=True)


def run_cell(recipe: Recipe, output_dir: Path, threads: int | None = None, gpu: int | None = None) -> None:
    """Run one cell, from its checkpoint if it was cut short, on CUDA device ``gpu`` where the recipe allows one;
    the summary is what the grid keeps."""
    # here, not at the top: loading a grid (`pfedseq check`) needs no torch
    import torch

    from fedml_pfedseq.checkpoint import CHECKPOINT_FILE
    from fedml_pfedseq.simulation import run_recipe

    if threads and not recipe.device_args.num_threads:
        torch.set_num_threads(threads)
    if gpu is not None and recipe.device_args.using_gpu:
        torch.cuda.set_device(gpu)  # accelerate's single-process device is "cuda": the current one
    checkpoint = output_dir / CHECKPOINT_FILE
    run_recipe(recipe, output_dir, progress=False, resume=checkpoint.is_file())
    checkpoint.unlink(missing_ok=True)


def wait_for_others(seconds: float) -> None:
    """Pause while other processes run the cells that remain."""
    time.sleep(seconds)


def _run(cells: list[Cell], desc: str, progress: bool, workers: int = 1, poll_seconds: float = 10.0,
         engine: str = "local") -> None:
    """Run every cell that is not done, ``workers`` at a time, claiming each first; wait for the cells other
    processes hold. The first cell that fails ends the grid with its error, once the running cells are done.
    ``engine`` "ray": every cell not done as a Ray task instead (ray_grid.py)."""
    for cell in cells:
        if cell.done:
            cell.check_unchanged()
    if engine == "ray":
        from fedml_pfedseq.ray_grid import run_cells

        return run_cells([cell for cell in cells if not cell.done], desc, progress)
    bar = tqdm(total=sum(not c.done for c in cells), desc=desc, disable=not progress)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    threads = max(1, (os.cpu_count() or 1) // workers) if pool else None
    slots = list(range(workers))  # worker slot k runs its cells on GPU k mod the GPUs there are (if any)
    gpus = len(gpu_ids()) if pool else 0
    running: dict[Future, tuple[Cell, int]] = {}  # each running cell and its slot
    try:
        while True:
            busy = {id(c) for c, _ in running.values()}
            waiting = [c for c in cells if not c.done and id(c) not in busy]
            for cell in waiting:
                if len(running) >= workers:
                    break
                if claim(cell):
                    slot = slots.pop(0)
                    running[start(pool, cell, threads, slot % gpus if gpus else None)] = cell, slot
            if not running:
                if not waiting:
                    break
                bar.set_postfix_str(f"waiting for {len(waiting)} cell(s) other processes run")
                wait_for_others(poll_seconds)
                continue
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                cell, slot = running.pop(future)
                release(cell)
                slots.append(slot)
                future.result()  # a failed cell raises here
                bar.update()
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)
        for cell, _ in running.values():
            release(cell)
        bar.close()


def start(pool: ProcessPoolExecutor | None, cell: Cell, threads: int | None, gpu: int | None = None) -> Future:
    """Run ``cell`` in ``pool`` (on GPU ``gpu``), or here and now without one (a future already done)."""
    if pool is not None:
        return pool.submit(run_cell, cell.recipe, cell.output_dir, threads, gpu)
    future = Future()
    try:
        run_cell(cell.recipe, cell.output_dir)
        future.set_result(None)
    except BaseException as err:  # noqa: BLE001 - handed to _run, which raises it once the lock is released
        future.set_exception(err)
    return future


def run_grid(path: str | Path, extra_overrides: list[str] | None = None, output_dir: Path | None = None,
             progress: bool = True, workers: int = 1, rows: list[str] | None = None, engine: str = "local",
             seeds: list[int] | None = None) -> dict:
    """Tune (if the grid says so), run every seed cell that is not done yet (``workers`` at once, or with
    ``engine`` "ray" as Ray tasks on the Ray that the cells' ray_args name), then write the summary (see
    ``summarize``) and return it. ``rows``, ``seeds``: only these methods' and seeds' cells (the grid's values are
    still chosen by ``grid_chosen_by``), in the folders the whole grid uses, so a later full run keeps them: a
    budget that fits one seed of every row first gets paired comparisons first."""
    if workers < 1:
        raise RecipeError(f"workers must be >= 1, got {workers}")
    if engine not in ENGINES:
        raise RecipeError(f"--engine must be one of {list(ENGINES)}, got {engine!r}")
    grid = load_grid(path, extra_overrides, output_dir)
    if engine == "ray":
        from fedml_pfedseq.ray_engine import RaySession

        with RaySession(grid.seed_cells({})[0].recipe.ray_args):
            return _run_grid(grid, rows, seeds, progress, workers, engine)
    return _run_grid(grid, rows, seeds, progress, workers, engine)


def _run_grid(grid: Grid, rows: list[str] | None, seeds: list[int] | None, progress: bool, workers: int,
              engine: str) -> dict:
    selected, selected_seeds = grid.select(rows), grid.select_seeds(seeds)
    chooser = (grid.tuning or {}).get("grid_chosen_by")
    shared = None
    if chooser is not None:  # first the chooser's runs pick the grid's values per scenario
        first = grid.tuning_cells(only=chooser)
        _run(first, f"tune {grid.path.stem} ({chooser}: {', '.join(grid.tuning['grid'])})", progress, workers,
             engine=engine)
        picked, _ = choose(first)
        shared = {scenario: picked[(scenario, chooser)] for scenario in grid.scenarios}
    tuning = [cell for cell in grid.tuning_cells(shared=shared) if cell.method in selected]
    _run(tuning, f"tune {grid.path.stem}", progress, workers, engine=engine)
    chosen, candidates = choose(tuning)
    for scenario in grid.scenarios:  # methods with a single candidate run with it
        for name in grid.names:
            chosen.setdefault((scenario, name), grid.candidates(name, (shared or {}).get(scenario))[0])
    cells = [cell for cell in grid.seed_cells(chosen) if cell.method in selected and cell.seed in selected_seeds]
    _run(cells, f"grid {grid.path.stem}", progress, workers, engine=engine)
    return summarize(cells, grid.root, candidates)


def summarize(cells: list[Cell], root: Path, candidates: list[dict] | None = None) -> dict:
    """Per (scenario, method): final mean test and validation accuracy over clients, then mean and std over seeds,
    with the tuned values it ran with.

    Writes ``grid_cells.csv`` (one row per seed cell), ``grid_summary.json`` (the table, the cells and every tuning
    candidate's validation accuracy), ``grid_table.md`` (rows: methods, columns: scenarios) and, per scenario,
    ``grid_curves_<scenario>.png``: each method's test accuracy per round, averaged over clients and seeds."""
    from fedml_pfedseq.results import format_table, plot_suite  # here: matplotlib takes a second to import

    rows, groups = [], {}
    for cell in cells:
        summary = cell.summary()
        row = {"scenario": cell.scenario, "method": cell.method, "seed": cell.seed,
               "test_accuracy": summary["final_test_accuracy_mean"],
               "validation_accuracy": summary["final_validation_accuracy_mean"],
               "round_seconds": summary["mean_round_seconds"], "tuned": json.dumps(cell.candidate)}
        rows.append(row)
        groups.setdefault((cell.scenario, cell.method), []).append((row, cell.candidate))
    table = {}
    for (scenario, method), group in groups.items():
        test = [r["test_accuracy"] for r, _ in group]
        table.setdefault(method, {})[scenario] = {
            "test_mean": statistics.fmean(test), "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
            "validation_mean": statistics.fmean(r["validation_accuracy"] for r, _ in group), "seeds": len(group),
            "tuned": group[0][1]}
    scenarios = list(dict.fromkeys(cell.scenario for cell in cells))
    lines = [[method] + [f"{by[s]['test_mean']:.4f} +- {by[s]['test_std']:.4f} ({by[s]['seeds']})" for s in scenarios]
             for method, by in table.items()]
    markdown = format_table(["method"] + scenarios, lines)
    root.mkdir(parents=True, exist_ok=True)
    with (root / "grid_cells.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for scenario in scenarios:
        pooled = {}  # method -> every seed's evaluation rows (equal client counts: the mean of the seed means)
        for cell in cells:
            if cell.scenario == scenario:
                rows_of_cell = json.loads((cell.output_dir / "metrics.json").read_text())["eval"]
                pooled.setdefault(cell.method, []).extend(rows_of_cell)
        plot_suite(pooled, f"{scenario}: mean over clients and seeds", root / f"grid_curves_{scenario}.png")
    (root / "grid_summary.json").write_text(json.dumps({"table": table, "cells": rows,
                                                        "tuning_candidates": candidates or []}, indent=2))
    (root / "grid_table.md").write_text("Mean local test accuracy after the last round: mean +- std over seeds "
                                        "(number of seeds); hyperparameters chosen on validation are in "
                                        "grid_summary.json\n\n" + markdown + "\n")
    return {"table": table, "cells": rows, "tuning_candidates": candidates or [], "markdown": markdown}
