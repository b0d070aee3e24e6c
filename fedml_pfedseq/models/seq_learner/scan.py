"""The selective scan of Mamba (Gu & Dao 2023), eq. 7 of the pFedSeq paper: the PyTorch loop, and which kernel runs.

    h_j = exp(dt_j * A) * h_{j-1} + dt_j * B_j * u_j        (A: zero-order hold; B: Euler, as Mamba's kernel does)
    y_j = C_j . h_j + D * u_j

Shapes: batch b (adapter parameters), sequence L (rounds), channels d (expanded clients), state M.
``selective_scan_loop`` is the scan as PyTorch code, a loop over the L steps: the reference that the fused
kernels are tested against, and what runs where neither of them can. On CPU tensors the fused C kernel of
``cpu_kernels.py`` runs (built on first use); on CUDA tensors mamba-ssm's kernel, when it imports
(``pip install .[cuda]``). ``PFEDSEQ_SCAN=loop`` makes both devices run the loop.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

from .cpu_kernels import FusedScan, kernels_apply

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

    u, dt: [b, L, d]; A: [d, M]; B, C: [b, L, M], or [b, L, G, M] where the d channels are G groups of d / G (as
    mamba-ssm's grouped B and C), group g's reading B[:, :, g]; D: [d]  ->  y: [b, L, d]
    """
    grouped = B.dim() == 4
    if grouped:  # each channel's own B and C: [b, L, d, M]
        B, C = (x.repeat_interleave(u.shape[2] // x.shape[2], dim=2) for x in (B, C))
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])  # [b, d, M]
    ys = []
    for u_j, dt_j, B_j, C_j in zip(u.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        dA = torch.exp(dt_j.unsqueeze(-1) * A)  # [b, d, M]
        dBu = (dt_j * u_j).unsqueeze(-1) * (B_j if grouped else B_j.unsqueeze(1))  # [b, d, M]
        h = dA * h + dBu
        ys.append(torch.einsum("bdm,bdm->bd" if grouped else "bdm,bm->bd", h, C_j))  # [b, d]
    return torch.stack(ys, dim=1) + u * D  # [b, L, d]


def selective_scan(u, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus: bool = False, last_only: bool = False):
    """y = selective scan of u, as mamba-ssm's ``selective_scan_fn`` computes it: the step sizes are
    softplus(dt + dt_bias) where asked, and the output is gated by silu(z) where z [b, L, d] is given. With
    ``last_only`` only the last round's y[:, -1] [b, d] is returned (all that a learner's last block reads). The
    fused C kernel for CPU tensors, mamba-ssm's for CUDA ones, else the loop. Shapes as :func:`selective_scan_loop`
    (B and C grouped or not).
    """
    kernel = cuda_kernel(u)
    if kernel is not None:
        t = lambda x: None if x is None else x.transpose(1, 2).contiguous()  # noqa: E731  channels-first layout
        if B.dim() == 4:  # mamba-ssm's grouped B and C: [b, G, M, L]
            B, C = (x.permute(0, 2, 3, 1).contiguous() for x in (B, C))
        else:
            B, C = t(B), t(C)
        y = kernel(t(u), t(dt), A.contiguous(), B, C, D.float(), z=t(z),
                   delta_bias=None if dt_bias is None else dt_bias.float(), delta_softplus=dt_softplus).transpose(1, 2)
        return y[:, -1] if last_only else y
    if last_only and z is not None:
        z = z[:, -1]  # the gate of the round that is read
    if kernels_apply(u, dt, A, B, C, D):
        return FusedScan.apply(u, dt, A, B, C, D, z, dt_bias, dt_softplus, last_only)
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    y = selective_scan_loop(u, dt, A, B, C, D)
    if last_only:
        y = y[:, -1]
    return y if z is None else y * F.silu(z)
