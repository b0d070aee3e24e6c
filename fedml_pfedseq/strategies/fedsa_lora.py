"""FedSA-LoRA, selective aggregation for LoRA (Guo et al., ICLR 2025): both LoRA factors are trained, but only the A
factors are shared and averaged; each client's B factors stay with it.

The paper's reading: A learns what the clients share, B what is each client's own, so averaging A alone
personalizes through B. Adapted to this harness as the pFedSeq paper adapts its personalized baselines (frozen ViT,
LoRA and head tuned): the head stays on its client with B (the paper's language models have no task head to share).
Each client is evaluated on the averaged A it received with its own B and head. The server averages A factors only,
which are not an adapter on their own, so it saves no global adapter.
"""
from __future__ import annotations

from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.fedavg_local_head import FedAvgLocalHeadClient, FedAvgLocalHeadServer


class FedSALoRAServer(FedAvgLocalHeadServer):
    lora_factors = ("A",)
    global_adapter = False


class FedSALoRAClient(FedAvgLocalHeadClient):
    lora_factors = ("A",)


METHOD = Method("FedSA-LoRA", FedSALoRAServer, FedSALoRAClient)
