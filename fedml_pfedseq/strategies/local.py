"""Local training only: no communication; each client trains its own adapter and head on its own data."""
from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.fedavg import FedAvgClient, FedAvgServer


class LocalServer(FedAvgServer):
    shared_parts = ()


class LocalClient(FedAvgClient):
    shared_parts = ()


METHOD = Method("Local", LocalServer, LocalClient)
