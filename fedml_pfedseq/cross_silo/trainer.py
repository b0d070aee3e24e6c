"""FedML's client side of every method: a ``ClientTrainer`` that drives the method's client strategy.

Per round FedML calls ``set_model_params(payload)``, then ``train``, then ``get_model_params`` for the upload.
The client evaluates what it received before training, at the rounds the simulator does, and once more on the
last payload (FedML sends ``comm_round + 1`` payloads; the last one only reaches ``set_model_params``), so its
metrics rows are the simulator's rows for this client. Payloads arrive as ``{"round": k, "payload": ...}`` and the
upload goes back as ``{"round": k, "upload": ...}`` (see aggregator.py): a client the server skipped for some
rounds still trains and reports under the server's round, and a late upload is recognisable as such.
"""
from __future__ import annotations

import time
from typing import Callable

from fedml.core import ClientTrainer

from fedml_pfedseq.results import MetricsLog
from fedml_pfedseq.transport import check_plain, fingerprint


class StrategyTrainer(ClientTrainer):
    def __init__(self, client, args, on_progress: Callable[[], None] = lambda: None):
        super().__init__(model=client.model, args=args)
        self.client = client  # the method's client strategy: the simulator's class, unchanged
        self.on_progress = on_progress  # called after each payload received and each round trained
        recipe = client.recipe
        self.rounds = recipe.train_args.comm_round
        self.every = recipe.validation_args.frequency_of_the_test
        self.log = MetricsLog()  # this client's evaluation and training rows
        self.round = 0  # the round of the last payload received
        self.received_fingerprints: list[str] = []  # per payload received (k = 1..comm_round + 1)
        self.upload: dict | None = None

    def set_model_params(self, model_parameters: dict) -> None:
        self.round, payload = model_parameters["round"], model_parameters["payload"]
        check_plain(payload, f"payload received by client {self.client.client_id}")
        self.client.receive(payload)
        self.received_fingerprints.append(fingerprint(payload))
        if self.round == self.rounds + 1:
            self.log.add(round=self.rounds, client=self.client.client_id, **self.client.evaluate())
        self.on_progress()

    def train(self, train_data, device, args) -> None:
        """Round ``t`` = the round of the payload received; FedML's ``train_data`` is this client's own split."""
        t = self.round
        started = time.perf_counter()
        if (t - 1) % self.every == 0:
            self.log.add(round=t - 1, client=self.client.client_id, **self.client.evaluate())
        trained = time.perf_counter()
        upload = self.client.train(t)
        check_plain(upload, f"upload of client {self.client.client_id}")
        self.upload = {"round": t, "upload": upload}
        self.log.eval_seconds.append(trained - started)
        self.log.train_seconds.append(time.perf_counter() - trained)
        self.log.add_train(round=t, client=self.client.client_id, **self.client.last_train_stats)
        self.on_progress()

    def get_model_params(self) -> dict | None:
        return self.upload
