"""What a method is to the rest of the library: a server strategy, a client strategy and its algorithm_args."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedml_pfedseq.algorithm_args import ALGORITHM_ARGS


@dataclass(frozen=True)
class Method:
    name: str  # what recipes write in train_args.federated_optimizer (matched case-insensitively)
    Server: type
    Client: type
    # at most this many (LoRA, head) states travel in one payload or upload of a federation of n clients: the
    # cross-silo message-size limit is derived from it (party.message_limit)
    states_per_message: Callable[[int], int] = lambda n: 2

    @property
    def Args(self) -> type:
        """The dataclass of the method's algorithm_args, registered under its name in fedml_pfedseq.algorithm_args
        (which a recipe is checked with, without importing the strategies)."""
        return ALGORITHM_ARGS[self.name]
