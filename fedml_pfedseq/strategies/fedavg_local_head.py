"""FedAvg on the LoRA adapter only, each client keeping its own head (pFedSeq's behaviour during warm-up)."""
from fedml_pfedseq.strategies.fedavg import FedAvgClient, FedAvgServer
from fedml_pfedseq.strategies.method import Method


class FedAvgLocalHeadServer(FedAvgServer):
    shared_parts = ("lora",)


class FedAvgLocalHeadClient(FedAvgClient):
    shared_parts = ("lora",)


METHOD = Method("FedAvgLocalHead", FedAvgLocalHeadServer, FedAvgLocalHeadClient)
