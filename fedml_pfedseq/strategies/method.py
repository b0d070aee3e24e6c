"""What a method is to the rest of the library: a server strategy, a client strategy and its algorithm_args."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # what recipes write in train_args.federated_optimizer (matched case-insensitively)
    Server: type
    Client: type
    Args: type  # the dataclass of the method's algorithm_args
