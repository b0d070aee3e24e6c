"""Benchmark: pFedLoRA's communication and computation per client and round, against full-model sharing.

    python benchmarks/pfedlora_cost.py recipes/omniglot_pfedlora.yaml --repeats 2

For one client of each backbone depth in the recipe it measures
- bytes: pFedLoRA's payload (the global adapter) and upload (the adapter's delta), serialised as FedML's transport
  does; and the same messages if the client shared its whole trained model (backbone weights, LoRA and head), as
  FedAvg over full models would;
- seconds of local training: pFedLoRA's round (local-model phase + adapter phase, ``client.train``) and a
  full-model round (every weight trained together for train_args.epochs, at the local model's rate), best of
  ``--repeats``;
- trainable parameters of each.
Then the federation's mean per client (clients weighted by how many have each depth). Prints a table and writes
JSON with ``--out``; nothing is asserted (see README "Measured").
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import torch

from fedml_pfedseq.config import load_recipe
from fedml_pfedseq.federation import build_federation, client_depth
from fedml_pfedseq.training import requires_grad, train_epochs
from fedml_pfedseq.transport import encoded_bytes


def best_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(client, payload: dict, repeats: int) -> dict:
    """One client's bytes and seconds per round, pFedLoRA's and full-model sharing's."""
    recipe, model = client.recipe, client.model
    client.receive(payload)
    upload = client.train(1)
    full_state = {"lora": client.state["lora"], "head": client.state["head"], "backbone": client.state["backbone"]}
    full_upload = {"client_id": client.client_id, "num_samples": client.num_samples, **full_state}

    def pfedlora_round():
        client.receive(payload)
        client.train(1)

    def full_model_round():
        client.receive(payload)
        client.load()
        everything = list(model.parameters())
        with requires_grad(everything, True):
            train_epochs(model, client.round_loader(1), recipe.train_args.epochs,
                         recipe.algorithm_args.pfedlora_model_lr, parameters=everything)

    local_model = [*model.backbone_parameters().values(), *model.head.parameters()]
    return {
        "depth": len(model.backbone.base_model.model.vit.layers),
        "pfedlora_payload_bytes": encoded_bytes(payload),
        "pfedlora_upload_bytes": encoded_bytes(upload),
        "full_payload_bytes": encoded_bytes({"client_id": client.client_id, **full_state}),
        "full_upload_bytes": encoded_bytes(full_upload),
        "pfedlora_train_seconds": best_seconds(pfedlora_round, repeats),
        "full_train_seconds": best_seconds(full_model_round, repeats),
        "pfedlora_trainable_params": {"local_model_phase": sum(p.numel() for p in local_model),
                                      "adapter_phase": sum(p.numel() for p in model.lora_parameters())},
        "full_trainable_params": sum(p.numel() for p in model.parameters()),
        "train_samples": client.num_samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="write the measurements as JSON here")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    fed = build_federation(recipe)
    payloads = fed.server.initial_payloads()
    depth_counts = Counter(client_depth(recipe, i) for i in range(len(fed.clients)))
    rows = []
    for depth, count in sorted(depth_counts.items(), key=lambda kv: -(kv[0] or 0)):
        first = next(c for c in fed.clients if client_depth(recipe, c.client_id) == depth)
        rows.append({**measure(first, payloads[first.client_id], args.repeats), "clients": count})
    print(f"torch threads {torch.get_num_threads()}; one client per depth, {recipe.train_args.epochs} epoch(s); "
          f"bytes per client and round, down + up")
    print("| depth | clients | pFedLoRA bytes | full-model bytes | ratio | pFedLoRA train s | full-model train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ours = r["pfedlora_payload_bytes"] + r["pfedlora_upload_bytes"]
        full = r["full_payload_bytes"] + r["full_upload_bytes"]
        print(f"| {r['depth']} | {r['clients']} | {ours:,} | {full:,} | {full / ours:.1f}x | "
              f"{r['pfedlora_train_seconds']:.2f} | {r['full_train_seconds']:.2f} |")
    n = sum(r["clients"] for r in rows)
    mean = {key: sum(r[key] * r["clients"] for r in rows) / n
            for key in ("pfedlora_payload_bytes", "pfedlora_upload_bytes", "full_payload_bytes", "full_upload_bytes",
                        "pfedlora_train_seconds", "full_train_seconds")}
    ours = mean["pfedlora_payload_bytes"] + mean["pfedlora_upload_bytes"]
    full = mean["full_payload_bytes"] + mean["full_upload_bytes"]
    print(f"| mean per client | {n} | {ours:,.0f} | {full:,.0f} | {full / ours:.1f}x | "
          f"{mean['pfedlora_train_seconds']:.2f} | {mean['full_train_seconds']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"recipe": str(recipe.source), "per_depth": rows, "mean_per_client": mean}, f, indent=2)


if __name__ == "__main__":
    main()
