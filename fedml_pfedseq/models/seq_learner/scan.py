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

    u, dt: [..., b, L, d]; A: [..., d, M]; B, C: [..., b, L, M]; D: [..., d]  ->  y: [..., b, L, d]. Leading dims
    are independent scans, each with its own A and D (several layers' learners in one call).
    """
    A = A.unsqueeze(-3)  # [..., 1, d, M]: every row's
    h = u.new_zeros(*u.shape[:-2], *A.shape[-2:])  # [..., b, d, M]
    ys = []
    for j in range(u.shape[-2]):
        u_j, dt_j, B_j, C_j = (x[..., j, :] for x in (u, dt, B, C))  # [..., b, d] and [..., b, M]
        dA = torch.exp(dt_j.unsqueeze(-1) * A)  # [..., b, d, M]
        dBu = (dt_j * u_j).unsqueeze(-1) * B_j.unsqueeze(-2)  # [..., b, d, M]
        h = dA * h + dBu
        ys.append(torch.einsum("...dm,...m->...d", h, C_j))  # [..., b, d]
    return torch.stack(ys, dim=-2) + u * D.unsqueeze(-2).unsqueeze(-2)  # [..., b, L, d]


def side_by_side(x: torch.Tensor) -> torch.Tensor:
    """[..., b, L, k] -> [b, G k, L] (contiguous): channels first, the G groups of the leading dims side by side,
    the layout of mamba-ssm's n_groups and of a grouped ``F.conv1d``."""
    b, length, k = x.shape[-3:]
    return x.reshape(-1, b, length, k).permute(1, 0, 3, 2).reshape(b, -1, length).contiguous()


def apart(y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``side_by_side``'s inverse: [b, G k, L] -> ``shape`` [..., b, L, k]."""
    b, length, k = shape[-3:]
    return y.reshape(b, -1, k, length).permute(1, 0, 3, 2).reshape(shape)


def _mamba_ssm_scan(kernel, u, dt, A, B, C, D, z, dt_bias, dt_softplus: bool) -> torch.Tensor:
    """mamba-ssm's kernel on its channels-first layout, the groups of the leading dims as its n_groups (u [b, G d,
    L], B and C [b, G, M, L]), and back to [..., b, L, d]."""
    b, length, m = B.shape[-3:]
    B, C = (side_by_side(x).reshape(b, -1, m, length) for x in (B, C))  # [b, G, M, L]
    y = kernel(side_by_side(u), side_by_side(dt), A.reshape(-1, A.shape[-1]).contiguous(), B, C,
               D.reshape(-1).float(), z=None if z is None else side_by_side(z),
               delta_bias=None if dt_bias is None else dt_bias.reshape(-1).float(), delta_softplus=dt_softplus)
    return apart(y, u.shape)


def selective_scan(u, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus: bool = False, last_only: bool = False):
    """y = selective scan of u, as mamba-ssm's ``selective_scan_fn`` computes it: the step sizes are
    softplus(dt + dt_bias) where asked (dt_bias [..., d]), and the output is gated by silu(z) where z [..., b, L, d]
    is given. With ``last_only`` only the last round's y[..., -1, :] [..., b, d] is returned (all that a learner's
    last block reads). The fused C kernel for CPU tensors, mamba-ssm's for CUDA ones, else the loop. Shapes as
    :func:`selective_scan_loop`, leading dims included.
    """
    kernel = cuda_kernel(u)
    if kernel is not None:
        y = _mamba_ssm_scan(kernel, u, dt, A, B, C, D, z, dt_bias, dt_softplus)
        return y[..., -1, :] if last_only else y
    if last_only and z is not None:
        z = z[..., -1, :]  # the gate of the round that is read
    if kernels_apply(u, dt, A, B, C, D):
        return FusedScan.apply(u, dt, A, B, C, D, z, dt_bias, dt_softplus, last_only)
    if dt_bias is not None:
        dt = dt + dt_bias.unsqueeze(-2).unsqueeze(-2)
    if dt_softplus:
        dt = F.softplus(dt)
    y = selective_scan_loop(u, dt, A, B, C, D)
    if last_only:
        y = y[..., -1, :]
    return y if z is None else y * F.silu(z)
