"""mamba-ssm's CUDA kernel against the PyTorch loop: forward outputs and gradients on the same random inputs, at the
learner's shapes (prints the largest relative differences; exits 1 when they exceed the tolerance).

    python benchmarks/scan_check.py [--groups 2 --rows 24576 --length 15 --channels 40 --state 16]

Without CUDA, or without the kernel, it says so and exits 0: there is nothing to compare.
"""
from __future__ import annotations

import argparse
import sys

import torch

from fedml_pfedseq.models.seq_learner.scan import kernel_status, selective_scan, selective_scan_loop


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=24576, help="b: adapter parameters (paper scale: one layer)")
    parser.add_argument("--length", type=int, default=15, help="L: rounds in the window")
    parser.add_argument("--channels", type=int, default=40, help="d: expand x N clients")
    parser.add_argument("--state", type=int, default=16, help="M")
    parser.add_argument("--groups", type=int, default=2, help="G: layers' learners in one call (a leading dim)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    args = parser.parse_args(argv)
    kernel, line = kernel_status()
    if not torch.cuda.is_available() or kernel is None:
        print(f"not compared: {'no CUDA device' if not torch.cuda.is_available() else line}")
        return 0
    torch.manual_seed(0)
    g, b, length, d, m = args.groups, args.rows, args.length, args.channels, args.state
    inputs = [torch.randn(g, b, length, d), torch.rand(g, b, length, d) * 0.1, -torch.rand(g, d, m) - 0.5,
              torch.randn(g, b, length, m), torch.randn(g, b, length, m), torch.randn(g, d)]
    outputs, grads = {}, {}
    for name, scan in (("kernel", selective_scan), ("loop", selective_scan_loop)):
        leaves = [x.cuda().requires_grad_() for x in inputs]
        y = scan(*leaves)
        y.pow(2).sum().backward()
        outputs[name], grads[name] = y.detach(), [x.grad for x in leaves]
    forward = relative(outputs["kernel"], outputs["loop"])
    backward = max(relative(g, h) for g, h in zip(grads["kernel"], grads["loop"]))
    print(f"{line}; G={g} b={b} L={length} d={d} M={m}: forward max rel diff {forward:.2e}, gradients {backward:.2e} "
          f"(tolerance {args.tolerance:g})")
    return 0 if max(forward, backward) <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
