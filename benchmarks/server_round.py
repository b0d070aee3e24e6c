"""Benchmark: one pFedSeq server round, the learner's fast path against its reference implementation in the same run,
beside one client's local epoch (prints numbers, asserts nothing).

A round is ``PFedSeqServer.aggregate`` once the history holds L rounds and calibrations are being sent: the learner
step (eq. 5, or the proximal schedule's steps), the history update and the inference that calibrates every client.
The server is brought there with the fast path on synthetic LoRA updates; the timed round then runs from copies of
that state, once under ``reference_implementation()`` (the learner as first written) and, after one untimed round
that frees the reference's memory, once as the package computes; the two rounds' calibrations are compared.
Absolute times drift on a shared machine, so the ratio is the figure (medians of ``--repeat`` such triples). The
fused CPU kernels' one-time build is timed apart.

    python benchmarks/server_round.py                   # the default recipe's shapes, both schedules, client epochs
    python benchmarks/server_round.py --shapes paper --schedules paper --repeat 1 --no-client-epochs  # ViT-B/16's
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch

from fedml_pfedseq.config import load_recipe
from fedml_pfedseq.models.seq_learner import cpu_kernels
from fedml_pfedseq.models.seq_learner.reference import reference_implementation
from fedml_pfedseq.strategies import method_class

# backbone layers with LoRA on q and v (D per layer = 4 * rank * hidden), clients N, window L
SHAPES = {"ours": {"layers": 6, "hidden": 192, "rank": 8, "clients": 20, "seq_len": 6},  # vit-small-cifar10
          "paper": {"layers": 12, "hidden": 768, "rank": 8, "clients": 20, "seq_len": 15}}  # ViT-B/16
SCHEDULES = {"paper": "recipes/omniglot_pfedseq.yaml",  # eq. 5, one step a round
             "proximal": "recipes/omniglot_pfedseq_proximal.yaml"}  # 10 steps a round


def synthetic_lora(layers: int, hidden: int, rank: int, scale: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """PEFT-named LoRA tensors for q and v of each layer: randn * scale (0: the zero state)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(layers):
        for proj in ("query", "value"):
            prefix = f"base_model.model.vit.encoder.layer.{layer}.attention.attention.{proj}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=g) * scale
            state[f"{prefix}.lora_B.weight"] = torch.randn(hidden, rank, generator=g) * scale
    return state


def uploads(shape: dict, round_idx: int) -> dict[int, dict]:
    """Every client's update of this round: update-sized noise around a client-specific offset."""
    out = {}
    for i in range(shape["clients"]):
        noise = synthetic_lora(shape["layers"], shape["hidden"], shape["rank"], 1e-3, seed=1000 * round_idx + i)
        out[i] = {"client_id": i, "num_samples": 100 + i,
                  "lora": {k: v + 1e-3 * (i + 1) / shape["clients"] for k, v in noise.items()}}
    return out


def warm_server(recipe_path: str, shape: dict):
    """A pFedSeq server whose history is full and whose last round sent calibrations, and the next round's uploads."""
    recipe = load_recipe(recipe_path, [f"train_args.client_num_in_total={shape['clients']}",
                                       f"train_args.client_num_per_round={shape['clients']}",
                                       f"algorithm_args.seq_len={shape['seq_len']}"])
    server = method_class("pFedSeq").Server(
        shape["clients"], {"lora": synthetic_lora(shape["layers"], shape["hidden"], shape["rank"], 0.02)}, recipe)
    server.initial_payloads()
    rounds = max(shape["seq_len"], recipe.algorithm_args.warmup_rounds) + 1
    for t in range(1, rounds + 1):
        server.aggregate(uploads(shape, t))
    return server, uploads(shape, rounds + 1)


def timed_round(server, round_uploads) -> tuple[float, list[torch.Tensor]]:
    server = copy.deepcopy(server)
    gc.collect()  # the previous round's garbage is not this round's cost
    started = time.perf_counter()
    server.aggregate(round_uploads)
    return time.perf_counter() - started, server.calibrations


def max_relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, b))


def client_epoch(recipe_path: str, samples_per_client: int | None) -> tuple[float, int]:
    """Seconds of client 0's first local epoch on the recipe's backbone, and its training images."""
    import datasets

    from fedml_pfedseq.federation import build_federation

    datasets.disable_progress_bars()

    recipe = load_recipe(recipe_path, [f"data_args.samples_per_client={samples_per_client or 'null'}"])
    fed = build_federation(recipe)
    client = fed.clients[0]
    client.receive(fed.server.initial_payloads()[0])
    started = time.perf_counter()
    client.train(1)
    return time.perf_counter() - started, client.num_samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=SHAPES, default="ours")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds of each, alternating; medians reported")
    parser.add_argument("--no-client-epochs", dest="client_epochs", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shapes]
    started = time.perf_counter()
    runs, line = cpu_kernels.status()
    print(f"torch {torch.__version__}, {args.threads} threads; CPU: {line} "
          f"(loaded or built in {time.perf_counter() - started:.2f} s, once per machine and source)")
    print(f"shapes {args.shapes}: {shape['layers']} layers x D = {4 * shape['rank'] * shape['hidden']:,}, "
          f"N = {shape['clients']}, L = {shape['seq_len']}")
    print("| schedule | reference s/round | fast s/round | fast / reference | calibrations' max rel. difference |")
    print("|---|---|---|---|---|")
    for name in args.schedules:
        server, round_uploads = warm_server(SCHEDULES[name], shape)
        fast, reference = [], []
        for _ in range(args.repeat):
            with reference_implementation():
                reference_s, reference_xi = timed_round(server, round_uploads)
            timed_round(server, round_uploads)  # untimed: a run never follows a reference round's memory use
            fast_s, fast_xi = timed_round(server, round_uploads)
            fast.append(fast_s)
            reference.append(reference_s)
        fast_s, reference_s = statistics.median(fast), statistics.median(reference)
        print(f"| {name} | {reference_s:.2f} | {fast_s:.2f} | {fast_s / reference_s:.3f} | "
              f"{max_relative_difference(fast_xi, reference_xi):.1e} |", flush=True)
    if args.client_epochs:
        for samples in (200, None):
            seconds, images = client_epoch(SCHEDULES["paper"], samples)
            print(f"client 0's local epoch, {samples or 'all 1,623'} drawings per drawer ({images} training images): "
                  f"{seconds:.2f} s", flush=True)


if __name__ == "__main__":
    main()
