"""The GPU image's missing packages, for the CPU rehearsal of benchmarks/gpu_check.sh (REHEARSE=1 puts this folder
first on PYTHONPATH, so Python imports it at start-up): importing any of them fails as it would there."""
import importlib.abc
import sys

MISSING = {"datasets", "evaluate", "fedml", "mamba_ssm", "cryptography", "ray"}  # not in the image's package list


class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in MISSING:
            raise ImportError(f"{name} is not installed on the GPU image (benchmarks/gpu_rehearsal)")


sys.meta_path.insert(0, Missing())
