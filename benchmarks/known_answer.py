"""Benchmark: the known-answer personalization problem (fedml_pfedseq/known_answer.py, docs/known-answer.md).

    python benchmarks/known_answer.py --clients 8 --rounds 40 --noise 0.0 --seeds 0 1 2 \\
        --set algorithm_args.learner_lr=0.01 --out runs/known_answer

Prints the table (relative loss: 0 = every client at its optimum, 1 = FedAvg) and writes metrics.json, metrics.csv,
table.md and known_answer.png under --out. Values of --set are YAML, as in `pfedseq --set`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedml_pfedseq.console import quiet_libraries
from fedml_pfedseq.known_answer import Settings, run_benchmark, write_outputs


def main() -> None:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=defaults.clients, help="N")
    parser.add_argument("--rounds", type=int, default=defaults.rounds, help="T")
    parser.add_argument("--clusters", type=int, default=defaults.clusters, help="K: clients i, i+K, ... share c_k")
    parser.add_argument("--scale", type=float, default=defaults.scale, help="s: per-entry RMS of a cluster offset")
    parser.add_argument("--shared", type=float, default=defaults.shared, help="RMS of the common offset, in s")
    parser.add_argument("--spread", type=float, default=defaults.spread, help="RMS of each client's own offset, in s")
    parser.add_argument("--noise", type=float, default=defaults.noise, help="gradient noise per entry, in s")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="the clients' SGD rate")
    parser.add_argument("--batches", type=int, default=defaults.batches, help="gradient steps per local epoch")
    parser.add_argument("--per-round", type=int, default=None, help="clients sampled per round (default: all)")
    parser.add_argument("--model", default=defaults.model, help="the backbone whose LoRA layout is used")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="recipe override; algorithm_args keys go to the methods that have them")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--workers", type=int, default=1, help="seeds run at once, one process and one torch thread "
                        "each (the same numbers as --threads 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/known_answer"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()
    settings = Settings(clients=args.clients, rounds=args.rounds, clusters=args.clusters, scale=args.scale,
                        shared=args.shared, spread=args.spread, noise=args.noise, lr=args.lr, batches=args.batches,
                        per_round=args.per_round, model=args.model)
    bench = run_benchmark(settings, args.methods, args.seeds, args.overrides, workers=args.workers)
    print(write_outputs(bench, args.out))
    print(f"\n{bench.seconds:.0f} s in all; outputs in {args.out}")


if __name__ == "__main__":
    main()
