"""``pfedseq grid --engine ray``: each cell of a grid a Ray task, so a grid fills a Ray cluster's cores and GPUs.

The grid's rules stay grid.py's: a cell is done when its ``summary.json`` exists, so a rerun submits only the cells
that are not; a cell runs through ``grid.run_cell``, which resumes from the cell's checkpoint. Ray retries a cell
whose process died (``ray_args.worker_retries`` times: a killed process, a lost node), so it goes on from its last
round; an error inside a cell (a bad recipe, a bug) is not retried. Ray is the only scheduler here: no lock files
(those serve several ``pfedseq grid`` processes sharing a folder without Ray). On a cluster the grid's output folder
must be on a file system every node shares, as the cells write their results there.

Nested parallelism is decided per cell: a cell whose recipe runs its clients in process (``engine: local``) holds
its threads' CPUs (and one GPU where the recipe uses GPUs and Ray has them); a cell whose recipe says ``engine:
ray`` holds no CPU itself, because its workers' placement group reserves theirs, all or none (ray_engine.py), so
cells waiting for workers never hold CPUs those workers need.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from fedml_pfedseq.grid import Cell, run_cell
from fedml_pfedseq.ray_engine import import_ray


def cell_resources(cell: Cell, gpus: float) -> dict:
    """What a cell's task holds while it runs (see the module's docstring)."""
    recipe = cell.recipe
    if recipe.common_args.engine == "ray":
        return {"num_cpus": 0}
    threads = recipe.device_args.num_threads or recipe.ray_args.threads_per_worker
    return {"num_cpus": threads, "num_gpus": 1 if gpus and recipe.device_args.using_gpu else 0}


def run_cells(cells: list[Cell], desc: str, progress: bool) -> None:
    """Run ``cells`` (none done yet) as Ray tasks on the Ray this process is connected to. Every cell runs; the
    first that failed is raised once all are done."""
    ray = import_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    task = ray.remote(run_cell)
    pending = {}  # a cell's task result -> the cell
    for cell in cells:
        resources = cell_resources(cell, gpus)
        threads = resources["num_cpus"] or None
        pending[task.options(max_retries=cell.recipe.ray_args.worker_retries, retry_exceptions=False,
                             **resources).remote(cell.recipe, cell.output_dir, threads)] = cell
    failed: list[BaseException] = []
    with tqdm(total=len(cells), desc=desc, disable=not progress) as bar:
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(finished[0])
            try:
                ray.get(finished[0])
            except Exception as err:  # noqa: BLE001 - Ray's error is also the cell's own type; raised below
                failed.append(err)
                bar.set_postfix_str(f"{cell.output_dir} failed")
                continue
            bar.update()
    if failed:
        raise failed[0]
