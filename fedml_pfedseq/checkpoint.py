"""Checkpoints: everything a federation has learnt after round t, in one safetensors file, so a run that stops
(a crash, a killed job, a finished run to extend) continues exactly as if it never had.

What is saved is each strategy object's own state, found generically: every attribute of the server and of each
client except the ones rebuilt from the recipe (``REBUILT``, and a class's own ``rebuilt`` tuple). Modules and
optimisers are saved through their ``state_dict`` and loaded back into the live objects (so an optimiser keeps
pointing at the live parameters); tensors go into the safetensors payload, everything else into a JSON skeleton
stored in the file's metadata. A tensor object referenced twice is stored once and restored as one object.
Loading never unpickles anything, and only dataclasses of this package are rebuilt by name.

The file is written to a temporary name and renamed over the old one, so a crash mid-write leaves the previous
checkpoint intact.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import random
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedml_pfedseq.errors import UserError

FORMAT = "pfedseq-checkpoint/1"
CHECKPOINT_FILE = "checkpoint.safetensors"  # in a run's output folder
REBUILT = frozenset({"recipe", "data", "model", "args", "layout", "device", "client_id", "num_clients"})


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, damaged, or does not belong to this run."""


def _state_attributes(obj) -> dict:
    skip = REBUILT | set(getattr(obj, "rebuilt", ()))
    return {name: value for name, value in vars(obj).items() if name not in skip}


class _Encoder:
    """Turns nested state into a JSON skeleton plus a flat {key: tensor} payload."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.keys: dict[int, str] = {}  # id(tensor) -> its key, so a shared tensor is stored once
        self.seen: list[torch.Tensor] = []  # keeps every keyed tensor alive: a freed one's id could be reused

    def __call__(self, value, where: str):
        if isinstance(value, torch.Tensor):
            if id(value) not in self.keys:
                self.keys[id(value)] = key = f"t{len(self.tensors)}"
                self.seen.append(value)
                self.tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # owns its storage
            return {"__tensor__": self.keys[id(value)], "device": str(value.device)}
        if isinstance(value, torch.nn.Module):
            return {"__module__": self(dict(value.state_dict()), where)}
        if isinstance(value, torch.optim.Optimizer):
            return {"__optimizer__": self(value.state_dict(), where)}
        if isinstance(value, deque):
            return {"__deque__": [self(v, f"{where}[{k}]") for k, v in enumerate(value)], "maxlen": value.maxlen}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            cls = type(value)
            return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                    "fields": {f.name: self(getattr(value, f.name), f"{where}.{f.name}")
                               for f in dataclasses.fields(value)}}
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in value):
                return {k: self(v, f"{where}.{k}") for k, v in value.items()}
            return {"__items__": [[self(k, where), self(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [self(v, f"{where}[{k}]") for k, v in enumerate(value)]}
        if isinstance(value, list):
            return [self(v, f"{where}[{k}]") for k, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise CheckpointError(f"{where}: cannot checkpoint a {type(value).__name__}; if the recipe rebuilds it, "
                              "name it in the class's `rebuilt` attributes")


class _Decoder:
    """Rebuilds nested state from a skeleton. A tensor saved on an accelerator comes back on ``device`` (the
    running process's), so a checkpoint written on a GPU resumes on a CPU-only machine and the other way round;
    one saved on the CPU (generator states, bookkeeping) stays there."""

    def __init__(self, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu"):
        self.tensors = tensors
        self.device = torch.device(device)
        self.restored: dict[str, torch.Tensor] = {}  # key -> the one object every reference gets

    def __call__(self, node):
        if isinstance(node, list):
            return [self(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "__tensor__" in node:
            key = node["__tensor__"]
            if key not in self.restored:
                # a fresh copy: tensors read from the file may sit at unaligned addresses, where BLAS takes
                # other kernels and the continuation would differ in the last bits
                saved_on = torch.device(node["device"])
                self.restored[key] = self.tensors[key].to("cpu" if saved_on.type == "cpu" else self.device, copy=True)
            return self.restored[key]
        if "__module__" in node or "__optimizer__" in node:
            return node  # loaded into the live object by ``restore``
        if "__deque__" in node:
            return deque((self(v) for v in node["__deque__"]), maxlen=node["maxlen"])
        if "__dataclass__" in node:
            module, name = node["__dataclass__"].split(":")
            if module.split(".")[0] != "fedml_pfedseq":
                raise CheckpointError(f"refusing to rebuild {node['__dataclass__']}: not a class of this package")
            cls = importlib.import_module(module)
            for part in name.split("."):
                cls = getattr(cls, part)
            return cls(**{k: self(v) for k, v in node["fields"].items()})
        if "__items__" in node:
            return {self(k): self(v) for k, v in node["__items__"]}
        if "__tuple__" in node:
            return tuple(self(v) for v in node["__tuple__"])
        return {k: self(v) for k, v in node.items()}


def capture(obj, encode: _Encoder, where: str) -> dict:
    return {name: encode(value, f"{where}.{name}") for name, value in _state_attributes(obj).items()}


def restore(obj, state: dict, decode: _Decoder, where: str) -> None:
    """Put ``state`` back into ``obj``: modules and optimisers in place, every other attribute replaced."""
    expected = set(_state_attributes(obj))
    if set(state) != expected:
        raise CheckpointError(f"{where}: the checkpoint holds attributes {sorted(state)}, this code expects "
                              f"{sorted(expected)} (saved by another version or method?)")
    for name, node in state.items():
        live = getattr(obj, name)
        if isinstance(node, dict) and "__module__" in node:
            live.load_state_dict(decode(node["__module__"]))
        elif isinstance(node, dict) and "__optimizer__" in node:
            live.load_state_dict(decode(node["__optimizer__"]))
        else:
            setattr(obj, name, decode(node))


def pack_state(obj, where: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``obj``'s state as a checkpoint holds it (a plain skeleton and its tensors, CPU copies), to move it to another
    process: the Ray engine sends a client's state with the client to whichever worker trains it."""
    encode = _Encoder()
    return capture(obj, encode, where), encode.tensors


def unpack_state(obj, packed: tuple[dict, dict[str, torch.Tensor]], where: str,
                 device: torch.device | str = "cpu") -> None:
    """Put what ``pack_state`` packed back into ``obj`` (accelerator tensors onto ``device``), as a resume does."""
    skeleton, tensors = packed
    restore(obj, skeleton, _Decoder(tensors, device), where)


def rng_state() -> dict:
    """The global generators (torch, numpy, python); the strategies seed their own, this covers the rest."""
    numpy_state = np.random.get_state(legacy=False)
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "numpy": {k: numpy_state[k] for k in ("bit_generator", "has_gauss", "gauss")} | {
                "pos": numpy_state["state"]["pos"]}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])  # decoded as the tuple it was
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": numpy_state.pop("pos")}
    np.random.set_state(numpy_state)


def save_checkpoint(path: Path, parts: dict[str, object], extra: dict) -> None:
    """Write ``parts`` (name -> strategy object) and ``extra`` (plain state: round, payloads, metrics, recipe)
    atomically to ``path``."""
    encode = _Encoder()
    skeleton = {"parts": {name: capture(obj, encode, name) for name, obj in parts.items()},
                "extra": encode(extra, "extra"), "rng": encode(rng_state(), "rng")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(encode.tensors, str(tmp), metadata={"format": FORMAT, "skeleton": json.dumps(skeleton)})
    os.replace(tmp, path)


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[dict, _Decoder]:
    """The skeleton and a decoder for its tensors (accelerator tensors onto ``device``); CheckpointError names
    what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run saved none (common_args.checkpoint: false?) "
                              "or never finished a round")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {err}") from err
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format {metadata.get('format')!r})")
    return json.loads(metadata["skeleton"]), _Decoder(tensors, device)


def load_checkpoint(path: Path, parts: dict[str, object], check: Callable[[dict], None] | None = None,
                    device: torch.device | str = "cpu") -> dict:
    """Restore every part of ``parts`` from ``path`` and the RNGs, accelerator tensors onto ``device`` (this
    process's); return the checkpoint's ``extra``. ``check(extra)`` runs before anything is restored: a checkpoint
    it refuses leaves ``parts`` untouched."""
    skeleton, decode = read_checkpoint(path, device)
    extra = decode(skeleton["extra"])
    if check is not None:
        check(extra)
    if set(skeleton["parts"]) != set(parts):
        raise CheckpointError(f"{path} holds parts {sorted(skeleton['parts'])}, this run has {sorted(parts)}")
    for name, obj in parts.items():
        restore(obj, skeleton["parts"][name], decode, name)
    set_rng_state(decode(skeleton["rng"]))
    return extra
