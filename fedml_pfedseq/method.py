"""What a method is to the rest of the library: a server strategy, a client strategy and its algorithm_args."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedml_pfedseq.algorithm_args import NoArgs


@dataclass(frozen=True)
class Method:
    name: str  # what recipes write in train_args.federated_optimizer (matched case-insensitively)
    Server: type
    Client: type
    # the dataclass of its algorithm_args; it lives in fedml_pfedseq.algorithm_args (checking a recipe imports no
    # torch), which reads this line from the strategy file without importing it
    Args: type = NoArgs
    # at most this many (LoRA, head) states travel in one payload or upload of a federation of n clients: the
    # cross-silo message-size limit is derived from it (party.message_limit)
    states_per_message: Callable[[int], int] = lambda n: 2
    # bytes a message carries beyond those states, given the model (FLoRA's merged weights)
    extra_message_bytes: Callable[[object], int] = lambda model: 0
