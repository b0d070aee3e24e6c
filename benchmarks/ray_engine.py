"""Benchmark: rounds of the default Omniglot recipe on the local engine and on Ray with 1 and 2 workers.

    PFEDSEQ_DATA_DIR=../shared/data python benchmarks/ray_engine.py                # recipes/omniglot_pfedseq.yaml
    python benchmarks/ray_engine.py --rounds 2 --set data_args.samples_per_client=100

Prints, per engine: worker start-up, seconds per round and per client (each round after the first too), the ratio
to the local engine, Ray's overhead per round (the round's wall time minus the slowest worker's evaluating and
training, which the workers time themselves: serialisation of payloads, state and uploads, scheduling, the
driver's loading of the states) as a fraction of the round, and each worker's resident memory. Asserts nothing
(docs/benchmarks.md holds the figures measured).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import psutil

from fedml_pfedseq.config import load_recipe
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.ray_engine import RayEngine, RaySession
from fedml_pfedseq.simulation import LocalEngine, run_federation

REPO = Path(__file__).resolve().parents[1]


def measure(recipe, engine_class) -> dict:
    fed = build_federation(recipe)
    started = time.perf_counter()
    with engine_class(fed) as engine:
        startup = time.perf_counter() - started
        memory = ([w["rss_mib"] for w in engine.session.ray.get([w.process.remote() for w in engine.workers])]
                  if isinstance(engine, RayEngine) else [])
        per_worker = []  # per round: the slowest worker's evaluating + training seconds

        real_visit = engine.visit

        def timed_visit(round_idx, payloads, evaluate, after_evaluation=None):
            visits, lost = real_visit(round_idx, payloads, evaluate, after_evaluation)
            count = len(getattr(engine, "workers", [])) or 1
            busy = [0.0] * count
            for j, visit in enumerate(visits.values()):
                busy[j % count] += visit.eval_s + visit.train_s
            per_worker.append(max(busy))
            return visits, lost

        engine.visit = timed_visit
        log = run_federation(fed, progress=False, engine=engine)
    return {"startup": startup, "rounds": log.round_seconds, "busy": per_worker, "memory": memory,
            "clients": len(fed.clients)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "omniglot_pfedseq.yaml")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    base = [f"train_args.comm_round={args.rounds}", "common_args.checkpoint=false", *args.overrides]
    runs = {"local": load_recipe(args.recipe, [*base, f"device_args.num_threads={cores}"])}
    for workers in (1, 2):
        runs[f"ray, {workers} worker(s)"] = load_recipe(args.recipe, [
            *base, "common_args.engine=ray", f"ray_args.num_workers={workers}",
            f"ray_args.threads_per_worker={max(1, cores // workers)}", "device_args.num_threads=null"])
    print(f"{args.recipe.name}, {args.rounds} round(s), {cores} cores; driver resident memory before: "
          f"{psutil.Process().memory_info().rss / 2 ** 20:.0f} MiB")
    print("| engine | start-up s | s/round (each) | s/client | vs local | Ray overhead/round | worker RSS MiB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    local = measure(runs.pop("local"), LocalEngine)
    show("local", local, local["rounds"])
    with RaySession(next(iter(runs.values())).ray_args):  # one Ray for both: a second start can time out
        for name, recipe in runs.items():
            show(name, measure(recipe, RayEngine), local["rounds"])
    print(f"driver resident memory after: {psutil.Process().memory_info().rss / 2 ** 20:.0f} MiB")


def show(name: str, r: dict, local: list[float]) -> None:
    """One row of the table: the last round's figures (every round's seconds), against the local engine's."""
    overhead = [round_s - busy for round_s, busy in zip(r["rounds"], r["busy"])]
    print(f"| {name} | {r['startup']:.1f} | {' / '.join(f'{s:.1f}' for s in r['rounds'])} | "
          f"{r['rounds'][-1] / r['clients']:.2f} | {local[-1] / r['rounds'][-1]:.2f}x | "
          + (f"{overhead[-1]:.2f} s ({overhead[-1] / r['rounds'][-1]:.0%})" if name != "local" else "-")
          + f" | {' / '.join(f'{m:.0f}' for m in r['memory']) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
