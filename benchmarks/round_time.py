"""Benchmark: wall time of federated rounds on a recipe, split into local training and evaluation.

    python benchmarks/round_time.py recipes/omniglot_fedavg.yaml --rounds 2 --set data_args.samples_per_client=null

Prints seconds per round, per client and images per second; nothing is asserted (see README "Measured").
"""
from __future__ import annotations

import argparse
import time

import torch

from fedml_pfedseq.config import load_recipe
from fedml_pfedseq.simulation import build_federation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    started = time.perf_counter()
    fed = build_federation(recipe)
    print(f"build: {time.perf_counter() - started:.1f} s; {len(fed.clients)} clients, "
          f"{sum(c.num_samples for c in fed.clients)} training images per round, torch threads "
          f"{torch.get_num_threads()}")
    payloads = fed.server.initial_payloads()
    for t in range(1, args.rounds + 1):
        train_s = eval_s = 0.0
        evaluated = 0
        uploads = {}
        for i, client in enumerate(fed.clients):
            client.receive(payloads[i])
            t0 = time.perf_counter()
            metrics = client.evaluate()
            t1 = time.perf_counter()
            uploads[i] = client.train(t)
            t2 = time.perf_counter()
            eval_s, train_s = eval_s + t1 - t0, train_s + t2 - t1
            evaluated += metrics["validation_samples"] + metrics["test_samples"]
        t3 = time.perf_counter()
        payloads = fed.server.aggregate(uploads)
        agg_s = time.perf_counter() - t3
        trained = sum(c.num_samples for c in fed.clients)
        print(f"round {t}: {train_s + eval_s + agg_s:.1f} s = train {train_s:.1f} s ({trained / train_s:.0f} img/s) "
              f"+ eval {eval_s:.1f} s ({evaluated / eval_s:.0f} img/s) + aggregate {agg_s:.2f} s")


if __name__ == "__main__":
    main()
