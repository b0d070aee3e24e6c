"""Benchmark: the sequential learner's cost per pFedSeq round against D, N and L (prints numbers, asserts nothing).

A round costs the server one gradient-proxy step (forward + ``autograd.grad`` over all D rows of every adapted layer,
eq. 5) and one inference pass (eq. 2). Each configuration runs in a fresh subprocess, so the peak memory it reports
(max RSS above the RSS after the inputs exist; on CUDA, ``max_memory_allocated``) is its own. Time is linear in the
number of layers (one learner each), so big-N rows may time fewer layers than they report; the table says which.

    python benchmarks/seq_learner_cost.py                          # the README's table (25 min on 2 CPU cores)
    python benchmarks/seq_learner_cost.py --only 24576 20 15 12 12  # D N L layers-timed layers-reported
    python benchmarks/seq_learner_cost.py --only 24576 1000 15 1 12 --mixing-rank 16  # client mixing, R = 16
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from fedml_pfedseq.models.seq_learner import SeqLearnerConfig, SeqLearnerModel

# (what, D per layer, N, L, layers timed, layers of the backbone, d_chunk, client mixing rank R or None)
GRID = [
    ("ours: vit-small-cifar10, default recipe", 6144, 20, 6, 6, 6, 2048, None),
    ("paper scale: ViT-B/16, Omniglot", 24576, 20, 15, 12, 12, 2048, None),
    ("paper scale, unchunked", 24576, 20, 15, 1, 12, None, None),
    ("L = 5", 24576, 20, 5, 1, 12, 2048, None),
    ("L = 30 (the paper's largest)", 24576, 20, 30, 1, 12, 2048, None),
    ("N = 100", 24576, 100, 15, 1, 12, 2048, None),
    ("N = 100, client mixing R = 16", 24576, 100, 15, 1, 12, 2048, 16),
    ("N = 1000", 24576, 1000, 15, 1, 12, 512, None),
    ("N = 1000, client mixing R = 16", 24576, 1000, 15, 1, 12, 2048, 16),
]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(d: int, n: int, length: int, layers: int, d_chunk: int | None, rank: int | None, device: str) -> dict:
    """Seconds for one learner step + one inference over ``layers`` layers, and the peak extra memory in MB."""
    torch.manual_seed(0)
    model = SeqLearnerModel(SeqLearnerConfig(num_clients=n, num_adapter_layers=layers, max_seq_len=length,
                                             mixing_rank=rank)).to(device)
    window = torch.randn(d, length, n, device=device) * 1e-3  # [D, L, N], update-sized
    descent = torch.randn(d, n, device=device) * 1e-3  # [D, N]
    model.proxy_gradient(window[:8], 1e-3, 0, descent[:8], d_chunk)  # one-time allocations happen here
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = rss_mb()
    started = time.perf_counter()
    for layer in range(layers):
        model.proxy_gradient(window, 1e-3, layer, descent, d_chunk)
    stepped = time.perf_counter()
    for layer in range(layers):
        model.calibrate(window, 1e-3, layer, d_chunk)
    if device == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline)
    return {"step_s": stepped - started, "inference_s": done - stepped, "peak_extra_mb": peak,
            "learner_params": sum(p.numel() for p in model.learners[0].parameters())}


def run_one(row: tuple, threads: int, device: str) -> dict:
    what, d, n, length, timed, reported, d_chunk, rank = row
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps([d, n, length, timed, d_chunk, rank]),
                          "--threads", str(threads), "--device", device], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    per_layer = (result["step_s"] + result["inference_s"]) / timed
    return {"what": what, "D": d, "N": n, "L": length, "d_chunk": d_chunk, "mixing_rank": rank, "layers_timed": timed,
            "layers": reported, **result, "per_layer_s": per_layer, "per_round_s": per_layer * reported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs=5, type=int, metavar=("D", "N", "L", "TIMED", "LAYERS"))
    parser.add_argument("--d-chunk", type=int, default=2048)
    parser.add_argument("--mixing-rank", type=int, default=None, help="R of client mixing (with --only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        d, n, length, timed, d_chunk, rank = json.loads(args.child)
        print(json.dumps(measure(d, n, length, timed, d_chunk, rank, args.device)))
        return
    grid = [("custom", *args.only, args.d_chunk, args.mixing_rank)] if args.only else GRID
    print(f"device {args.device}, {args.threads} threads, torch {torch.__version__}")
    print("| configuration | D per layer | N | L | d_chunk | learner params per layer | s per layer (step + inference) "
          "| s per round (layers) | peak extra MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for row in grid:
        r = run_one(row, args.threads, args.device)
        rows.append(r)
        layers = f"{r['per_round_s']:.1f} ({r['layers']}" + (")" if r["layers_timed"] == r["layers"]
                                                          else f", {r['layers_timed']} timed)")
        print(f"| {r['what']} | {r['D']:,} | {r['N']} | {r['L']} | {r['d_chunk']} | {r['learner_params']:,} | "
              f"{r['step_s'] / r['layers_timed']:.2f} + {r['inference_s'] / r['layers_timed']:.2f} | {layers} | "
              f"{r['peak_extra_mb']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
