"""What travels between parties: plain containers of tensors, checked before they leave and measured.

Payloads and uploads are built by the strategies as plain ``dict``s of ints, floats, strings and CPU tensors, so
FedML's transport (which pickles its messages) never carries an object of ours, and a receiver needs nothing but
torch to read them.
"""
from __future__ import annotations

import hashlib
import pickle

import torch

PLAIN_SCALARS = (bool, int, float, str, type(None))


def check_plain(obj, where: str) -> None:
    """Raise TypeError naming the first value that is not a plain dict/list/scalar/CPU tensor."""
    if type(obj) is dict:
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not str or int")
            check_plain(value, f"{where}[{key!r}]")
    elif type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    elif type(obj) is torch.Tensor:
        if obj.device.type != "cpu":
            raise TypeError(f"{where}: tensor on {obj.device}; payloads carry CPU tensors")
        if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size():
            raise TypeError(f"{where}: a view into a larger tensor; pickling would send all of it (clone it)")
    elif type(obj) not in PLAIN_SCALARS:
        raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__name__} cannot travel; "
                        "payloads are plain dicts of tensors and scalars")


def pickled_bytes(obj) -> int:
    """Size of ``obj`` serialised as FedML's gRPC transport does (``pickle.dumps``, default protocol); it varies by
    a few bytes from run to run, as pickle writes each tensor storage's memory address in decimal."""
    return len(pickle.dumps(obj))


def traffic(payloads: dict, uploads: dict) -> dict[str, float]:
    """Mean serialised bytes per client of one round: server -> client payloads and client -> server uploads."""
    return {"payload_bytes_mean": sum(map(pickled_bytes, payloads.values())) / len(payloads),
            "upload_bytes_mean": sum(map(pickled_bytes, uploads.values())) / max(len(uploads), 1)}


def fingerprint(obj) -> str:
    """A short hash of the tensors a payload carries (names, dtypes, shapes, values; scalars such as the
    client id are left out): two parties with the same fingerprint hold the same adapter."""
    digest = hashlib.sha256()

    def visit(value, path: str) -> None:
        if type(value) is dict:
            for key in sorted(value, key=str):
                visit(value[key], f"{path}/{key}")
        elif type(value) is torch.Tensor:
            digest.update(f"{path}:{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())

    visit(obj, "")
    return digest.hexdigest()[:16]
