"""Do a run's client updates show its clusters, and do pFedSeq's calibrations follow them?

The rotated-clusters scenario (recipes/grids/rotated.yaml) gives client i the image transform
``data_args.cluster_transforms[i % K]``. A calibration can only personalize along a structure that the updates it
reads carry. This reruns one finished grid cell (its saved recipe.yaml, so the same seeded run) in memory and, at
every round, measures the mean cosine between clients' LoRA updates Delta_i for pairs in the same cluster and for
pairs in different clusters, raw and centred (the mean update over clients removed, as pFedSeq's centred
calibrations are); for pFedSeq also between its calibrations xi_i = payload_i - theta_g. At the end: the mean test
accuracy per cluster and, for APPLE, the mean weight a client gives a peer of its own cluster and of another.

    python benchmarks/cluster_structure.py runs/rotated/cifar10_rotated/pFedSeq_proximal/seed_0 \
        --out runs/cluster_structure/pFedSeq_proximal_seed0

Writes ``rounds.csv`` (one row per round), ``summary.json`` (the rows and the per-cluster accuracies) and prints a
table. Nothing is written into the cell.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import torch

from fedml_pfedseq.config import load_recipe
from fedml_pfedseq.data.transforms import cluster_of
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.results import format_table
from fedml_pfedseq.simulation import run_federation


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[key].reshape(-1).float() for key in sorted(state)])


def cluster_cosines(vectors: torch.Tensor, clusters: torch.Tensor) -> tuple[float, float]:
    """Mean cosine over pairs of rows of ``vectors`` [N, D] in the same cluster (i != j), and across clusters."""
    unit = torch.nn.functional.normalize(vectors, dim=1)
    similarity = unit @ unit.T  # [N, N]
    same = clusters[:, None] == clusters[None, :]
    off_diagonal = ~torch.eye(len(clusters), dtype=torch.bool)
    return float(similarity[same & off_diagonal].mean()), float(similarity[~same].mean())


def structure(vectors: torch.Tensor, clusters: torch.Tensor, name: str) -> dict[str, float]:
    """Within- and across-cluster cosines of ``vectors``, raw and centred."""
    within, across = cluster_cosines(vectors, clusters)
    within_c, across_c = cluster_cosines(vectors - vectors.mean(0, keepdim=True), clusters)
    return {f"{name}_within": within, f"{name}_across": across,
            f"{name}_centred_within": within_c, f"{name}_centred_across": across_c}


def measure(cell: Path) -> dict:
    recipe = load_recipe(cell / "recipe.yaml")
    names = recipe.data_args.cluster_transforms
    fed = build_federation(recipe)
    server, rows = fed.server, []
    aggregate = server.aggregate

    def recording(uploads):
        order = sorted(uploads)
        clusters = torch.tensor([cluster_of(names, i) for i in order])
        row = {"round": len(rows) + 1,
               **structure(torch.stack([flat(uploads[i]["lora"]) for i in order]), clusters, "update")}
        payloads = aggregate(uploads)
        xi = torch.stack([flat(payloads[i]["lora"]) for i in order]) - flat(server.global_state["lora"])
        if getattr(server, "global_adapter", False) and float(xi.norm()) > 0:  # a calibration was sent
            row.update(structure(xi, clusters, "calibration"))
        rows.append(row)
        return payloads

    server.aggregate = recording
    log = run_federation(fed, progress=True)
    final = [r for r in log.rows if r["round"] == recipe.train_args.comm_round]
    accuracy = {name: statistics.fmean(r["test_accuracy"] for r in final if cluster_of(names, r["client"]) == c)
                for c, name in enumerate(names or ["all"])}
    return {"cell": str(cell), "method": recipe.train_args.federated_optimizer, "clusters": names, "rounds": rows,
            "test_accuracy_per_cluster": accuracy, **mixing_weights(fed.clients, names)}


def mixing_weights(clients: list, names: list[str] | None) -> dict:
    """For methods whose clients learn a weight per peer (APPLE's p_i), the mean weight a client gives a peer of
    its own cluster and a peer of another one, after the last round; nothing for the other methods."""
    if not all(getattr(c, "p", None) is not None for c in clients):
        return {}
    same, other = [], []
    for i, client in enumerate(clients):
        for j, weight in enumerate(client.p.tolist()):
            if j != i:
                (same if cluster_of(names, j) == cluster_of(names, i) else other).append(weight)
    return {"mixing_weight_per_peer": {"same_cluster": statistics.fmean(same), "other_cluster": statistics.fmean(other),
                                       "self": statistics.fmean(float(c.p[i]) for i, c in enumerate(clients))}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cell", type=Path, help="a finished grid cell (a folder with its recipe.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="folder for rounds.csv and summary.json")
    args = parser.parse_args(argv)
    result = measure(args.cell)
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(key for row in result["rounds"] for key in row))
    with open(args.out / "rounds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(result["rounds"])
    (args.out / "summary.json").write_text(json.dumps(result, indent=2))
    print(format_table(keys, [[row["round"], *(f"{row[key]:.3f}" if key in row else "" for key in keys[1:])]
                              for row in result["rounds"]]))
    print("test accuracy per cluster:", {c: round(a, 4) for c, a in result["test_accuracy_per_cluster"].items()})
    if "mixing_weight_per_peer" in result:
        print("mixing weight per peer:", {key: round(w, 4) for key, w in result["mixing_weight_per_peer"].items()})
    return result


if __name__ == "__main__":
    main()
