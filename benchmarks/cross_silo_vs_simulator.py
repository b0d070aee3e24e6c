"""Benchmark: per-round wall time of a FedML cross-silo deployment vs the in-process simulator, on one recipe.

    python benchmarks/cross_silo_vs_simulator.py recipes/omniglot_pfedseq.yaml --rounds 3

Runs the simulator (one process, all cores) and then ``deploy`` (server + one process per client on this
machine, gRPC on 127.0.0.1), and prints per round the wall time of each, the bytes each client receives and
sends per round (as FedML's transport pickles them), and each party's CPU vs wall time (an idle party waiting
for gRPC should use little CPU). Nothing is asserted (see README "Measured").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from fedml_pfedseq.config import load_recipe
from fedml_pfedseq.cross_silo.launcher import deploy
from fedml_pfedseq.cross_silo.party import party_name
from fedml_pfedseq.results import format_table
from fedml_pfedseq.simulation import run_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--output-dir", type=Path, default=None, help="keep both runs here (default: a temp dir)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides + [f"train_args.comm_round={args.rounds}"])
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="cross_silo_bench_"))
    simulator_recipe = load_recipe(args.recipe, args.overrides + [f"train_args.comm_round={args.rounds}",
                                                                  f"device_args.num_threads={os.cpu_count()}"])
    sim = run_recipe(simulator_recipe, out / "simulator", progress=False)
    cross = deploy(recipe, out / "cross_silo", progress=False)

    def metrics(engine: str) -> dict:
        return json.loads((out / engine / "metrics.json").read_text())

    s, c = metrics("simulator"), metrics("cross_silo")
    rows = [[t + 1, a, b, int(server["payload_bytes_mean"]), int(server["upload_bytes_mean"])]
            for t, (a, b, server) in enumerate(zip(s["round_seconds"], c["round_seconds"], c["server"]))]
    rows.append(["mean", statistics.fmean(s["round_seconds"]), statistics.fmean(c["round_seconds"]), "", ""])
    threads = load_recipe(out / "cross_silo" / "recipe.yaml").device_args.num_threads
    print(f"\n{recipe.name}: {recipe.train_args.client_num_in_total} clients, {os.cpu_count()} cores; simulator "
          f"threads {os.cpu_count()}, threads per cross-silo party {threads}")
    print(format_table(["round", "simulator s", "cross-silo s", "bytes to each client", "bytes from each client"],
                       rows))
    parties = {party_name(rank): json.loads((out / "cross_silo" / "parties" / party_name(rank) / "metrics.json")
                                            .read_text()) for rank in range(recipe.train_args.client_num_in_total + 1)}
    print(format_table(["party", "wall s", "CPU s", "CPU / wall"],
                       [[name, m["wall_seconds"], m["cpu_seconds"], m["cpu_seconds"] / m["wall_seconds"]]
                        for name, m in parties.items()]))
    print(f"final mean test accuracy: simulator {sim['final_test_accuracy_mean']:.4f}, "
          f"cross-silo {cross['final_test_accuracy_mean']:.4f}; whole runs {sim['wall_seconds']} s vs "
          f"{cross['wall_seconds']} s; outputs in {out}")


if __name__ == "__main__":
    main()
