"""The selective scan of Mamba (Gu & Dao 2023), eq. 7 of the pFedSeq paper, in plain PyTorch.

    h_j = exp(dt_j * A) * h_{j-1} + dt_j * B_j * u_j        (A: zero-order hold; B: Euler, as Mamba's kernel does)
    y_j = C_j . h_j + D * u_j

Shapes: batch b (adapter parameters), sequence L (rounds), channels d (expanded clients), state M.
On CPU a loop over the L steps that discretises inside the loop is both exact and the fastest form measured here
(3-18x faster than transformers' Mamba slow path, which indexes precomputed [b, d, L, M] tensors).
On CUDA, mamba-ssm's fused kernel is used when it imports (``pip install .[cuda]``); it computes the same thing.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def kernel_status() -> tuple[object | None, str]:
    """(mamba-ssm's ``selective_scan_fn`` or None, a line saying which scan CUDA tensors get and why).

    Any failure to import counts, not only a missing package: mamba-ssm releases built against another torch, or
    before their transformers-5 fix, raise other errors at import, and the loop must then run, visibly."""
    if os.environ.get("PFEDSEQ_SCAN") == "loop":  # to time or check the loop where the kernel exists
        return None, "PyTorch loop (PFEDSEQ_SCAN=loop)"
    try:
        import mamba_ssm
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # any failure: its reason is reported and the loop stands in
        return None, f"PyTorch loop (mamba-ssm's kernel did not import: {type(err).__name__}: {err})"
    return selective_scan_fn, f"mamba-ssm {getattr(mamba_ssm, '__version__', '?')} selective_scan_fn (CUDA kernel)"


@functools.lru_cache(maxsize=1)
def _announce(line: str) -> None:
    logger.warning("selective scan on CUDA tensors: %s", line)  # once per process


def cuda_kernel(u: torch.Tensor):
    """mamba-ssm's ``selective_scan_fn`` for CUDA tensors when that optional package imports, else None; the first
    call on a CUDA tensor logs which scan runs."""
    if not u.is_cuda:
        return None
    kernel, line = kernel_status()
    _announce(line)
    return kernel


def selective_scan_loop(u, dt, A, B, C, D):
    """The scan as a per-step loop.

    u, dt: [b, L, d]; A: [d, M]; B, C: [b, L, M]; D: [d]  ->  y: [b, L, d]
    """
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])  # [b, d, M]
    ys = []
    for u_j, dt_j, B_j, C_j in zip(u.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        dA = torch.exp(dt_j.unsqueeze(-1) * A)  # [b, d, M]
        dBu = (dt_j * u_j).unsqueeze(-1) * B_j.unsqueeze(1)  # [b, d, M]
        h = dA * h + dBu
        ys.append(torch.einsum("bdm,bm->bd", h, C_j))  # [b, d]
    return torch.stack(ys, dim=1) + u * D  # [b, L, d]


def selective_scan(u, dt, A, B, C, D):
    """y = selective scan of u (shapes as :func:`selective_scan_loop`); mamba-ssm's kernel for CUDA tensors."""
    kernel = cuda_kernel(u)
    if kernel is None:
        return selective_scan_loop(u, dt, A, B, C, D)
    # The kernel's layout is channels-first: u, dt [b, d, L]; B, C [b, M, L].
    y = kernel(u.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), A.contiguous(),
               B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float())
    return y.transpose(1, 2)
