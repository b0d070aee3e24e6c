"""FedML's client side of every method: a ``ClientTrainer`` that drives the method's client strategy.

Per round FedML calls ``set_model_params(payload)``, then ``train``, then ``get_model_params`` for the upload.
The client evaluates what it received before training, at the rounds the simulator does, and once more on the
last payload (FedML sends ``comm_round + 1`` payloads; the last one only reaches ``set_model_params``), so its
metrics rows are the simulator's rows for this client. Payloads arrive as ``{"round": k, "payload": ...}`` and the
upload goes back as ``{"round": k, "upload": ...}`` (see aggregator.py): a client the server skipped for some
rounds (not sampled, or left out) still trains and reports under the server's round, and a late upload is
recognisable as such.

A restarted server sends the round in progress again, so a client may receive a round's payload twice and train
that round again: its rows and fingerprint for that round are then replaced, the latest kept. ``state`` /
``restore`` carry what a restarted client party needs besides its strategy (party.py saves both after every round
it trained).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from fedml.core import ClientTrainer

from fedml_pfedseq.results import MetricsLog
from fedml_pfedseq.transport import check_plain, fingerprint


def keep_latest(rows: list[dict], row: dict) -> None:
    """Append ``row`` (one client's), dropping an earlier row of its round: a round trained again counts once."""
    rows[:] = [r for r in rows if r["round"] != row["round"]]
    rows.append(row)


def set_round(seconds: list[float], t: int, value: float) -> None:
    """Record ``value`` as round ``t``'s (index t - 1): a round this client was not sampled for counts 0 and a round
    trained again keeps the latest, so the launcher can take each round's slowest client."""
    seconds.extend([0.0] * (t - len(seconds)))
    seconds[t - 1] = value


class StrategyTrainer(ClientTrainer):
    def __init__(self, client, args, on_progress: Callable[[], None] = lambda: None,
                 on_trained: Callable[[], None] = lambda: None,
                 on_evaluated: Callable[[dict], None] = lambda row: None):
        super().__init__(model=client.model, args=args)
        self.client = client  # the method's client strategy: the simulator's class, unchanged
        self.on_progress = on_progress  # called after each payload received and each round trained
        self.on_trained = on_trained  # called after each round trained, once its rows are in the log
        self.on_evaluated = on_evaluated  # called with the row of each evaluation before training, the model as
        # the evaluation loaded it
        recipe = client.recipe
        self.rounds = recipe.train_args.comm_round
        self.every = recipe.validation_args.frequency_of_the_test
        self.log = MetricsLog()  # this client's evaluation and training rows
        self.round = 0  # the round of the last payload received
        self.received_fingerprints: list[str] = []  # per payload received (k = 1..comm_round + 1)
        self.upload: dict | None = None

    def state(self) -> dict:
        """Plain state to checkpoint with the client strategy after the round it trained."""
        return {"round": self.round, "log": dataclasses.asdict(self.log),
                "received_fingerprints": self.received_fingerprints}

    def restore(self, state: dict) -> None:
        self.round, self.log = state["round"], MetricsLog(**state["log"])
        self.received_fingerprints = state["received_fingerprints"]

    def set_model_params(self, model_parameters: dict) -> None:
        again = model_parameters["round"] == self.round and bool(self.received_fingerprints)
        self.round, payload = model_parameters["round"], model_parameters["payload"]
        check_plain(payload, f"payload received by client {self.client.client_id}")
        self.client.receive(payload)
        if again:  # the same round's payload from a restarted server
            self.received_fingerprints.pop()
        self.received_fingerprints.append(fingerprint(payload))
        if self.round == self.rounds + 1:
            keep_latest(self.log.rows, dict(round=self.rounds, client=self.client.client_id, **self.client.evaluate()))
        self.on_progress()

    def train(self, train_data, device, args) -> None:
        """Round ``t`` = the round of the payload received; FedML's ``train_data`` is this client's own split."""
        t = self.round
        started = time.perf_counter()
        if (t - 1) % self.every == 0:
            row = dict(round=t - 1, client=self.client.client_id, **self.client.evaluate())
            keep_latest(self.log.rows, row)
            self.on_evaluated(row)
        trained = time.perf_counter()
        upload = self.client.train(t)
        check_plain(upload, f"upload of client {self.client.client_id}")
        self.upload = {"round": t, "upload": upload}
        set_round(self.log.eval_seconds, t, trained - started)
        set_round(self.log.train_seconds, t, time.perf_counter() - trained)
        keep_latest(self.log.train_rows, dict(round=t, client=self.client.client_id, **self.client.last_train_stats))
        self.on_progress()
        self.on_trained()

    def get_model_params(self) -> dict | None:
        return self.upload
