"""Federated methods: each is a server strategy, a client strategy and its ``algorithm_args`` dataclass."""
from __future__ import annotations

from dataclasses import dataclass

from fedml_pfedseq.strategies.fedavg import FedAvgClient, FedAvgServer, NoArgs
from fedml_pfedseq.strategies.fedavg_local_head import FedAvgLocalHeadClient, FedAvgLocalHeadServer
from fedml_pfedseq.strategies.local import LocalClient, LocalServer
from fedml_pfedseq.strategies.pfedseq import PFedSeqArgs, PFedSeqClient, PFedSeqServer


@dataclass(frozen=True)
class Method:
    name: str
    Server: type
    Client: type
    Args: type


METHODS: dict[str, Method] = {m.name.lower(): m for m in [
    Method("Local", LocalServer, LocalClient, NoArgs),
    Method("FedAvg", FedAvgServer, FedAvgClient, NoArgs),
    Method("FedAvgLocalHead", FedAvgLocalHeadServer, FedAvgLocalHeadClient, NoArgs),
    Method("pFedSeq", PFedSeqServer, PFedSeqClient, PFedSeqArgs),
]}


def method_class(name: str) -> Method:
    """The method registered under ``name`` (case-insensitive)."""
    if name.lower() not in METHODS:
        raise KeyError(f"names an unknown method {name!r}; known: {[m.name for m in METHODS.values()]}")
    return METHODS[name.lower()]
