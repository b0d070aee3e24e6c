"""What travels between parties: plain containers of tensors, checked before they leave, measured, and encoded in
the one wire format of a cross-silo message.

Payloads and uploads are built by the strategies as plain ``dict``s of ints, floats, strings and CPU tensors
(``check_plain``), so a receiver needs nothing but torch and safetensors to read them, and no object of ours ever
travels.

**The wire format** (``encode`` / ``decode``): a safetensors file whose metadata holds the message as JSON. A message
(FedML's type, sender, receiver and parameters) becomes a JSON tree of its parameters, in which every tensor is a
reference ``{"tensor": name}`` to the safetensors tensor of that name; dict keys carry their type (``"s:lora"``,
``"i:3"``), so an int key such as APPLE's peer index comes back an int and a reference is never mistaken for a dict.
``decode`` parses bytes under :class:`WireLimits` and raises :class:`WireError` naming the first problem: not this
format (a pickle, random bytes), truncated, over the size limit, a dtype or rank outside the payload contract, a
reference to a tensor that is not there or a tensor nothing references. Parsing builds only dicts, lists, scalars and
tensors: nothing in the bytes is ever executed, and nothing here unpickles.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

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
            raise TypeError(f"{where}: a view into a larger tensor; a payload owns its tensors (clone it)")
    elif type(obj) not in PLAIN_SCALARS:
        raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__name__} cannot travel; "
                        "payloads are plain dicts of tensors and scalars")


def encoded_bytes(obj) -> int:
    """Size of ``obj`` on the wire, as the model parameters of one message (``encode``)."""
    return len(encode(0, 0, 0, {"model_params": obj}))


def traffic(payloads: dict, uploads: dict) -> dict[str, float]:
    """Mean serialised bytes per client of one round: server -> client payloads and client -> server uploads."""
    return {"payload_bytes_mean": sum(map(encoded_bytes, payloads.values())) / len(payloads),
            "upload_bytes_mean": sum(map(encoded_bytes, uploads.values())) / max(len(uploads), 1)}


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


FORMAT = "pfedseq-message/1"
METADATA_KEY = "pfedseq"
# what payloads carry: float states in any training precision, integer counts, masks
DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
MAX_NDIM = 8  # LoRA matrices and heads are 2-D; a learner's calibration at most 3-D
MAX_DEPTH = 32  # nesting of the parameter tree (a payload is 4 deep)


class WireError(ValueError):
    """Bytes that are not a well-formed message of this format; the message says why."""


@dataclass(frozen=True)
class WireLimits:
    max_bytes: int  # the largest message accepted (comm_args.max_message_mb, or derived from the payload size)
    max_header_bytes: int = 16 * 2**20  # the JSON part: names, shapes, the parameter tree


@dataclass(frozen=True)
class WireMessage:
    """A decoded message: FedML's three fields and its parameters (plain containers and CPU tensors)."""

    type: int | str
    sender: int
    receiver: int
    params: dict


def encode(msg_type: int | str, sender: int, receiver: int, params: dict) -> bytes:
    """The bytes of one message; TypeError (``check_plain``'s) when ``params`` is not plain."""
    check_plain(params, "message")
    tensors: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}  # id(tensor) -> its name
    storages: set[int] = set()

    def tree(value):
        if type(value) is dict:
            return {key_tag(key): tree(v) for key, v in value.items()}
        if type(value) in (list, tuple):
            items = [tree(v) for v in value]
            return items if type(value) is list else {"tuple": items}
        if type(value) is not torch.Tensor:
            return value
        if id(value) not in names:  # a tensor that appears twice travels once, as pickle sent it
            tensor = value.detach().contiguous()
            storage = tensor.untyped_storage().data_ptr()
            tensors[str(len(tensors))] = tensor.clone() if storage in storages else tensor  # safetensors refuses
            storages.add(storage)  # tensors that share memory
            names[id(value)] = str(len(tensors) - 1)
        return {"tensor": names[id(value)]}

    header = {"format": FORMAT, "type": msg_type, "sender": sender, "receiver": receiver,
              "params": tree(params)}
    return save_tensors(tensors, metadata={METADATA_KEY: json.dumps(header)})


def key_tag(key: str | int) -> str:
    return f"s:{key}" if type(key) is str else f"i:{key}"


def decode(data: bytes, limits: WireLimits) -> WireMessage:
    """Parse one message, or raise WireError naming what is wrong with it."""
    if len(data) > limits.max_bytes:
        raise WireError(f"{len(data)} bytes, over the {limits.max_bytes}-byte message limit")
    if len(data) < 8:
        raise WireError(f"{len(data)} bytes: too short to be a message")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(limits.max_header_bytes, len(data) - 8):
        raise WireError(f"its header claims {header_len} bytes of {len(data) - 8} (not this format, or truncated)")
    try:
        tensor_header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise WireError(f"not this format: its header is not JSON ({err.__class__.__name__})") from None
    if not isinstance(tensor_header, dict) or not isinstance(tensor_header.get("__metadata__"), dict):
        raise WireError("not this format: no safetensors metadata")
    for name, info in tensor_header.items():
        if name != "__metadata__":
            check_tensor_info(name, info)
    try:
        tensors = load_tensors(bytes(data))
        header = json.loads(tensor_header["__metadata__"][METADATA_KEY])
    except SafetensorError as err:
        raise WireError(f"malformed tensors: {err}") from None
    except (KeyError, TypeError, ValueError, RecursionError):
        raise WireError("not this format: no message in its metadata") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise WireError(f"not this format: expected {FORMAT!r}")
    msg_type, sender, receiver = header.get("type"), header.get("sender"), header.get("receiver")
    if type(msg_type) not in (int, str) or type(sender) is not int or type(receiver) is not int:
        raise WireError("its type must be an int or str and its sender and receiver ints")
    if type(header.get("params")) is not dict:
        raise WireError("its parameters are not a mapping")
    used: set[str] = set()
    params = untree(header["params"], tensors, used, 0)
    if used != tensors.keys():
        raise WireError(f"tensors {sorted(tensors.keys() - used)} are in the message but not in its header")
    return WireMessage(msg_type, sender, receiver, params)


def check_tensor_info(name: str, info) -> None:
    if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
        raise WireError(f"tensor {name!r}: malformed entry")
    if info.get("dtype") not in DTYPES:
        raise WireError(f"tensor {name!r}: dtype {info.get('dtype')!r} is outside the payload contract "
                        f"({sorted(DTYPES)})")
    if len(info["shape"]) > MAX_NDIM:
        raise WireError(f"tensor {name!r}: {len(info['shape'])} dimensions, more than {MAX_NDIM}")


def untree(value, tensors: dict[str, torch.Tensor], used: set[str], depth: int):
    """The parameter tree back from its JSON form (see the module docstring)."""
    if depth > MAX_DEPTH:
        raise WireError(f"parameters nested deeper than {MAX_DEPTH}")
    if type(value) is list:
        return [untree(v, tensors, used, depth + 1) for v in value]
    if type(value) is not dict:
        return value  # JSON gives only None, bool, int, float and str here
    if value.keys() == {"tensor"}:
        name = value["tensor"]
        if not isinstance(name, str) or name not in tensors:
            raise WireError(f"its header names a tensor {name!r} that is not in the message")
        used.add(name)
        return tensors[name]
    if value.keys() == {"tuple"} and type(value["tuple"]) is list:
        return tuple(untree(v, tensors, used, depth + 1) for v in value["tuple"])
    return {untag(key): untree(v, tensors, used, depth + 1) for key, v in value.items()}


def untag(key: str):
    if key.startswith("s:"):
        return key[2:]
    if key.startswith("i:") and key[2:].lstrip("-").isdigit():
        return int(key[2:])
    raise WireError(f"malformed parameter key {key!r}")
