"""What this machine offers a run: library versions, the devices torch and accelerate see, bf16, and which code
the learner's Mamba blocks get on CUDA and CPU tensors (``pfedseq env``). The first thing to read on a GPU machine."""
from __future__ import annotations

import os
import platform
from importlib import metadata

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "huggingface_hub", "fedml",
            "mamba-ssm")


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def gpu_ids() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES names them (its list, else 0..count-1); grid
    cells and cross-silo parties are spread over them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [i.strip() for i in visible.split(",") if i.strip()]
    import torch  # here: `pfedseq check` and grids import this module without torch

    return [str(i) for i in range(torch.cuda.device_count())]


def describe() -> list[tuple[str, str]]:
    """(what, value) rows, in the order ``pfedseq env`` prints them."""
    import torch

    from fedml_pfedseq.models.seq_learner import cpu_kernels
    from fedml_pfedseq.models.seq_learner.scan import kernel_status
    from fedml_pfedseq.training import select_device

    rows = [("python", platform.python_version()), *((p, version(p)) for p in PACKAGES)]
    cuda = torch.cuda.is_available()
    rows += [("torch CUDA build", torch.version.cuda or "none (CPU build)"), ("CUDA available", str(cuda))]
    if cuda:
        rows += [(f"cuda:{i}", torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]
        rows += [("bf16 on cuda", str(torch.cuda.is_bf16_supported())),
                 ("TF32 matmul", str(torch.backends.cuda.matmul.allow_tf32))]
    rows += [("device a run picks (accelerate)", str(select_device(True))),
             ("selective scan on CUDA tensors", kernel_status()[1] if cuda else
              f"none (no CUDA); the kernel would be: {kernel_status()[1]}"),
             ("Mamba blocks on CPU tensors", cpu_kernels.status()[1])]
    return rows
