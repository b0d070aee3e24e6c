"""`pfedseq env` and the scan's kernel status: which selective scan CUDA tensors get is said once, with the reason
mamba-ssm's kernel did not import (any error, not only a missing package)."""
from __future__ import annotations

import logging
import re
import sys
from importlib import metadata
from types import SimpleNamespace

import pytest

from fedml_pfedseq.cli import main
from fedml_pfedseq.models.seq_learner import scan


@pytest.fixture
def fake_mamba(tmp_path, monkeypatch):
    """Write a package named mamba_ssm with the given __init__ body onto sys.path; the status cache is cleared."""
    def install(init: str, interface: str = "") -> None:
        package = tmp_path / "mamba_ssm"
        (package / "ops").mkdir(parents=True)
        (package / "__init__.py").write_text(init)
        (package / "ops" / "__init__.py").write_text("")
        (package / "ops" / "selective_scan_interface.py").write_text(interface)
        monkeypatch.syspath_prepend(str(tmp_path))
        for name in [n for n in sys.modules if n.startswith("mamba_ssm")]:
            monkeypatch.delitem(sys.modules, name)
        scan.kernel_status.cache_clear()
    yield install
    scan.kernel_status.cache_clear()
    scan._announce.cache_clear()
    for name in [n for n in sys.modules if n.startswith("mamba_ssm")]:
        del sys.modules[name]


def test_a_kernel_that_fails_at_import_is_reported_with_its_error(fake_mamba):
    fake_mamba('raise RuntimeError("undefined symbol: built against another torch")')
    kernel, line = scan.kernel_status()
    assert kernel is None
    assert line == ("PyTorch loop (mamba-ssm's kernel did not import: RuntimeError: undefined symbol: built against "
                    "another torch)")


def test_a_kernel_that_imports_is_used_and_named(fake_mamba):
    fake_mamba('__version__ = "9.9.9"', "def selective_scan_fn(*args):\n    return 'kernel'\n")
    kernel, line = scan.kernel_status()
    assert kernel() == "kernel" and line == "mamba-ssm 9.9.9 selective_scan_fn (CUDA kernel)"


def test_the_scan_a_cuda_tensor_gets_is_logged_once(fake_mamba, caplog):
    fake_mamba("from transformers import NoSuchName")  # a release older than its transformers-5 fix
    cuda_like = SimpleNamespace(is_cuda=True)
    with caplog.at_level(logging.WARNING, logger=scan.__name__):
        assert scan.cuda_kernel(cuda_like) is None and scan.cuda_kernel(cuda_like) is None
        assert scan.cuda_kernel(SimpleNamespace(is_cuda=False)) is None
    lines = [r.getMessage() for r in caplog.records if r.name == scan.__name__]
    assert len(lines) == 1 and "PyTorch loop (mamba-ssm's kernel did not import: ImportError" in lines[0]


def test_pfedseq_env_prints_versions_devices_and_the_scan(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    import torch
    assert rows["torch"] == metadata.version("torch") and rows["transformers"] == metadata.version("transformers")
    assert rows["CUDA available"] == str(torch.cuda.is_available())
    assert rows["device a run picks (accelerate)"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    expected = scan.kernel_status()[1]
    assert rows["selective scan on CUDA tensors"] == (expected if torch.cuda.is_available() else
                                                      f"none (no CUDA); the kernel would be: {expected}")
    assert rows["Mamba blocks on CPU tensors"].startswith("fused C kernels (cpu_kernels.c, built into ")


def test_the_loop_can_be_asked_for_where_the_kernel_imports(fake_mamba, monkeypatch):
    fake_mamba('__version__ = "9.9.9"', "def selective_scan_fn(*args):\n    return 'kernel'\n")
    monkeypatch.setenv("PFEDSEQ_SCAN", "loop")
    assert scan.kernel_status() == (None, "PyTorch loop (PFEDSEQ_SCAN=loop)")
