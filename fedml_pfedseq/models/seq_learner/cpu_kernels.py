"""The Mamba block's selective scan and causal conv fused for CPUs (``cpu_kernels.c``), as autograd Functions.

The C source is compiled with the machine's C compiler on first use, per scalar type, into a cache folder
(``PFEDSEQ_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/fedml_pfedseq/kernels`` or ``~/.cache/...``) keyed by the source,
the flags, the compiler and the CPU; later processes load it with ctypes in milliseconds. Where it cannot be built
(no compiler, no OpenMP, or the source left behind, as in a learner loaded from the Hub as remote code)
the block runs its PyTorch code (the scan's loop, ``nn.Conv1d``), which computes the same thing, and ``status``
logs why, once.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
SCALARS = {torch.float32: ("float", "fast_expf", "log1pf"), torch.float64: ("double", "exp", "log1p")}
# -ffast-math lets GCC vectorise the reductions and call glibc's vectorised exp and log1p; it is given to the compile
# step only, because linking with it would add crtfastmath.o, which flushes denormals to zero in the whole process.
COMPILE = ("-c", "-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")
LINK = ("-shared", "-fopenmp", "-lm")
_POINTER, _LONG, _INT = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
logger = logging.getLogger(__name__)


class KernelUnavailable(RuntimeError):
    """The fused kernels cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    if os.environ.get("PFEDSEQ_KERNEL_CACHE"):
        return Path(os.environ["PFEDSEQ_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedml_pfedseq" / "kernels"


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU's feature flags where Linux lists them, else the platform."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor() + platform.machine()


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise KernelUnavailable(f"`{' '.join(command)}` failed: {done.stderr.strip()[-500:]}")


@functools.cache
def library(dtype: torch.dtype) -> ctypes.CDLL:
    """The compiled kernels for ``dtype`` (float32 or float64), built on first use; KernelUnavailable if they
    cannot be."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise KernelUnavailable(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
    if not SOURCE.is_file():
        raise KernelUnavailable(f"{SOURCE.name} is not beside {Path(__file__).name}")
    scalar, exp, log1p = SCALARS[dtype]
    defines = [f"-DSCALAR={scalar}", f"-DEXP={exp}", f"-DLOG1P={log1p}"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *COMPILE, *LINK, *defines, version, _cpu_identity()])
                         .encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels_{scalar}_{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then moved in atomically
            obj, lib = Path(tmp) / "kernels.o", Path(tmp) / target.name
            _run([compiler, *COMPILE, *defines, str(SOURCE), "-o", str(obj)])
            _run([compiler, str(obj), *LINK, "-o", str(lib)])
            os.replace(lib, target)
    try:
        loaded = ctypes.CDLL(str(target))
    except OSError as err:
        raise KernelUnavailable(f"{target} did not load: {err}") from err
    loaded.scan_forward.argtypes = [_POINTER] * 3 + [_INT] + [_POINTER] * 6 + [_LONG] * 5 + [_INT] * 2
    loaded.scan_backward.argtypes = [_POINTER] * 3 + [_INT] + [_POINTER] * 14 + [_LONG] * 5 + [_INT] * 2
    loaded.conv_silu_forward.argtypes = [_POINTER] * 4 + [_LONG] * 5 + [_INT]
    loaded.conv_silu_backward.argtypes = [_POINTER] * 7 + [_LONG] * 5 + [_INT]
    return loaded


@functools.cache
def status() -> tuple[bool, str]:
    """(whether the fused kernels run on CPU tensors, a line saying which code they get and why), decided and logged
    once per process."""
    if os.environ.get("PFEDSEQ_SCAN") == "loop":
        runs, line = False, "PyTorch code (PFEDSEQ_SCAN=loop)"
    else:
        try:
            library(torch.float32)
            runs, line = True, f"fused C kernels ({SOURCE.name}, built into {cache_dir()})"
        except KernelUnavailable as err:
            runs, line = False, f"PyTorch code (the fused C kernels are unavailable: {err})"
    (logger.info if runs else logger.warning)("Mamba blocks on CPU tensors: %s", line)
    return runs, line


@functools.cache
def _builds(dtype: torch.dtype) -> bool:
    try:
        library(dtype)
    except KernelUnavailable as err:
        logger.warning("the fused C kernels for %s are unavailable (its PyTorch code runs): %s", dtype, err)
        return False
    return True


def kernels_apply(*inputs: torch.Tensor) -> bool:
    """Whether these inputs go to the fused kernels: CPU tensors of one of their scalar types, where they build."""
    u = inputs[0]
    return (u.device.type == "cpu" and u.dtype in SCALARS and all(t.dtype == u.dtype for t in inputs)
            and status()[0] and _builds(u.dtype))


def _pointers(*tensors: torch.Tensor | None) -> list[ctypes.c_void_p]:
    """The tensors' data addresses (NULL for None): the caller holds every tensor while the C call runs."""
    return [ctypes.c_void_p(None if t is None else t.data_ptr()) for t in tensors]


def _contiguous(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.contiguous() for t in tensors]


def _sizes(u: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows of all groups, L, channels, rows per group) of u [..., b, L, d]: its leading dims are the groups."""
    b, length, d = u.shape[-3:]
    return u.numel() // (length * d), length, d, b


class FusedScan(torch.autograd.Function):
    """scan.selective_scan's result and gradients: y = scan(u, dt, A, B, C, D) * silu(z) with
    dt = softplus(delta + delta_bias), each extra optional (z or delta_bias None, delta_softplus False), as in
    mamba-ssm's ``selective_scan_fn``. Shapes as ``scan.selective_scan_loop``, leading dims included (G layers'
    learners in one call, each with its own A, D and delta_bias); with ``last_only`` y and z are the last round's
    [..., b, d]."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, last_only: bool):
        u, delta, B, C, D, z, delta_bias = _contiguous(u, delta, B, C, D, z, delta_bias)
        A_t = A.transpose(-1, -2).contiguous()  # [..., M, d]: the kernel's inner loops run over the channels
        rows, length, d, group_rows = _sizes(u)
        y = u.new_empty((*u.shape[:-2], d) if last_only else u.shape)
        library(u.dtype).scan_forward(*_pointers(u, delta, delta_bias), int(delta_softplus),
                                      *_pointers(A_t, B, C, D, z, y), rows, length, d, A.shape[-1], group_rows,
                                      int(last_only), torch.get_num_threads())
        ctx.save_for_backward(u, delta, A_t, B, C, D, z, delta_bias)
        ctx.flags = delta_softplus, last_only
        return y

    @staticmethod
    def backward(ctx, gy):
        u, delta, A_t, B, C, D, z, delta_bias = ctx.saved_tensors
        delta_softplus, last_only = ctx.flags
        gy = gy.contiguous()
        rows, length, d, group_rows = _sizes(u)
        threads = torch.get_num_threads()
        gu, gdelta, gB, gC = (torch.empty_like(t) for t in (u, delta, B, C))
        gz = None if z is None else torch.empty_like(z)
        parts = [u.new_zeros(threads, *shape) for shape in (D.shape, A_t.shape, D.shape)]  # one slice per thread
        library(u.dtype).scan_backward(*_pointers(u, delta, delta_bias), int(delta_softplus),
                                       *_pointers(A_t, B, C, D, z, gy, gu, gdelta, parts[0], parts[1], gB, gC,
                                                  parts[2], gz),
                                       rows, length, d, A_t.shape[-2], group_rows, int(last_only), threads)
        g_delta_bias, gA, gD = (part.sum(0) for part in parts)
        return (gu, gdelta, gA.transpose(-1, -2), gB, gC, gD, gz, None if delta_bias is None else g_delta_bias,
                None, None)


class FusedConvSiLU(torch.autograd.Function):
    """silu of the depthwise causal convolution over rounds, v_j = silu(bias + sum_s w_(K-1-s) * u_(j-s)) for
    s = 0..K-1 (rounds before the first are zeros): what ``nn.Conv1d(e, e, K, groups=e, padding=K-1)`` followed by
    SiLU gives once the right padding is dropped.

    u: [..., b, L, e]; weight: [..., e, K]; bias: [..., e]  ->  [..., b, L, e] (leading dims: groups, each with its
    own weight and bias)
    """

    @staticmethod
    def forward(ctx, u, weight, bias):
        u, weight, bias = _contiguous(u, weight, bias)
        v = torch.empty_like(u)
        library(u.dtype).conv_silu_forward(*_pointers(u, weight, bias, v), *_sizes(u), weight.shape[-1],
                                           torch.get_num_threads())
        ctx.save_for_backward(u, weight, bias)
        return v

    @staticmethod
    def backward(ctx, gv):
        u, weight, bias = ctx.saved_tensors
        gv = gv.contiguous()
        threads = torch.get_num_threads()
        gu = torch.zeros_like(u)
        gw, gbias = u.new_zeros(threads, *weight.shape), u.new_zeros(threads, *bias.shape)  # one slice per thread
        library(u.dtype).conv_silu_backward(*_pointers(u, weight, bias, gv, gu, gw, gbias), *_sizes(u),
                                            weight.shape[-1], threads)
        return gu, gw.sum(0), gbias.sum(0)
