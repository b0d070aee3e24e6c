"""FFA-LoRA, Federated Freeze-A LoRA (Sun, Qin, Li, Ding, ICLR 2024): every LoRA A factor stays at its
initialization, only the B factors are trained, and only they travel and are averaged.

Why it works: A is the same random matrix on every client (theta^0 is everyone's, PEFT's init: A random, B = 0),
so the average of the clients' B factors times the shared A is exactly the average of their adapters' products
B_i A, which plain FedAvg of both factors is not; and half of LoRA's bytes never travel. The paper's scaling
(lora_alpha) is the recipe's. As a global method it shares the head as FedAvg does; the global adapter (the frozen A
with the averaged B) is saved and pushed as FedAvg's is.
"""
from __future__ import annotations

from fedml_pfedseq.lora_state import lora_factors
from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.fedavg import FedAvgClient, FedAvgServer, Upload
from fedml_pfedseq.training import requires_grad


class FFALoRAServer(FedAvgServer):
    lora_factors = ("B",)


class FFALoRAClient(FedAvgClient):
    """FedAvg's client with the A factors frozen while it trains."""

    lora_factors = ("B",)

    def train(self, round_idx: int) -> Upload:
        frozen = lora_factors(dict(self.model.backbone.named_parameters()), ("A",))
        with requires_grad(list(frozen.values()), False):
            return super().train(round_idx)


METHOD = Method("FFA-LoRA", FFALoRAServer, FFALoRAClient)
