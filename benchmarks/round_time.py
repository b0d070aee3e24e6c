"""Benchmark: wall time of federated rounds on a recipe, split into local training and evaluation.

    python benchmarks/round_time.py recipes/omniglot_fedavg.yaml --rounds 2 --set data_args.samples_per_client=null

Runs the simulator's own round loop and prints the timings it records per round, with images per second;
nothing is asserted (see README "Measured").
"""
from __future__ import annotations

import argparse
import time

import torch

from fedml_pfedseq.config import load_recipe
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.simulation import run_federation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides + [f"train_args.comm_round={args.rounds}",
                                                        "validation_args.frequency_of_the_test=1"])
    started = time.perf_counter()
    fed = build_federation(recipe)
    trained = sum(c.num_samples for c in fed.clients)
    print(f"build: {time.perf_counter() - started:.1f} s; {len(fed.clients)} clients, {trained} training images "
          f"per round, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    log = run_federation(fed, progress=False)
    for t, (total, train_s, eval_s) in enumerate(zip(log.round_seconds, log.train_seconds, log.eval_seconds), 1):
        evaluated = sum(r["validation_samples"] + r["test_samples"] for r in log.at(t - 1))
        print(f"round {t}: {total:.1f} s = train {train_s:.1f} s ({trained / train_s:.0f} img/s) "
              f"+ eval {eval_s:.1f} s ({evaluated / eval_s:.0f} img/s) + aggregate and rest "
              f"{total - train_s - eval_s:.2f} s")
    if torch.cuda.is_available():
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
