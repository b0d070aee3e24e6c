"""FedAvg on the LoRA adapter only, each client keeping its own head (pFedSeq's behaviour during warm-up).

With ``oracle_clusters`` the adapter is averaged only within each data cluster, as if the server were told the
clusters: not a method of the paper, but a reference for what sharing the adapter only within each cluster gives."""
from fedml_pfedseq.algorithm_args import FedAvgLocalHeadArgs
from fedml_pfedseq.data.transforms import cluster_of
from fedml_pfedseq.lora_state import weighted_average
from fedml_pfedseq.method import Method
from fedml_pfedseq.strategies.fedavg import FedAvgClient, FedAvgServer, Payload, Upload


class FedAvgLocalHeadServer(FedAvgServer):
    """The adapter averaged over every client (the base of the methods that keep a local head)."""

    shared_parts = ("lora",)


class ClusterOracleServer(FedAvgLocalHeadServer):
    """FedAvgLocalHead's own server: the plain average, or with ``oracle_clusters`` one average per data cluster."""

    def aggregate(self, uploads: dict[int, Upload]) -> dict[int, Payload]:
        if not self.recipe.algorithm_args.oracle_clusters:
            return super().aggregate(uploads)
        states = self.trained_states(uploads)
        clusters = self.recipe.data_args.cluster_transforms

        def average(group: list[int]):  # FedAvg's rule over ``group``'s trained adapters
            return weighted_average([states[i]["lora"] for i in group], [uploads[i]["num_samples"] for i in group])

        self.global_state = {"lora": average(list(states))}
        members: dict[int, list[int]] = {}
        for i in states:
            members.setdefault(cluster_of(clusters, i), []).append(i)
        averages = {c: average(group) for c, group in members.items()}
        # a cluster none of whose clients reported keeps what its clients were sent
        return self._send({i: {"lora": averages.get(cluster_of(clusters, i), self.sent[i]["lora"])}
                           for i in range(self.num_clients)})


class FedAvgLocalHeadClient(FedAvgClient):
    shared_parts = ("lora",)


METHOD = Method("FedAvgLocalHead", ClusterOracleServer, FedAvgLocalHeadClient, Args=FedAvgLocalHeadArgs)
