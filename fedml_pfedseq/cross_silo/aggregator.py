"""FedML's server side of every method: a ``ServerAggregator`` that hands uploads to the method's server strategy.

FedML calls ``get_model_params`` for the first payloads; ``RoundDeadlineServerManager`` calls ``aggregate_round``
when a round closes. Both return a plain ``dict`` keyed by client index, which the server manager reads as one
payload per client and sends each client only its own entry (``send_message_diff_sync_model_to_client``). Each
entry is ``{"round": k, "payload": ...}``: payload k starts round k (k = comm_round + 1: the final one), so a
client knows its round after missing some, and its upload names the round it answers.

``state`` / ``restore`` carry what a restarted server needs besides its strategy (party.py saves both after every
round): the round, the payloads of the round in progress, the fingerprints sent and the metrics so far.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from fedml.core import ServerAggregator

from fedml_pfedseq.results import MetricsLog
from fedml_pfedseq.round_close import RoundError, round_record, screen
from fedml_pfedseq.transport import check_plain, fingerprint


class StrategyAggregator(ServerAggregator):
    def __init__(self, server, args, on_round: Callable[[int], None] = lambda t: None):
        super().__init__(model=None, args=args)
        self.server = server  # the method's server strategy: the simulator's class, unchanged
        self.on_round = on_round  # called with the rounds completed: 0 when the first payloads go out, then t
        self.log = MetricsLog()  # server rows and round wall times of this party
        self.payloads: dict | None = None
        self.sent_fingerprints: list[list[str]] = []  # per payload sent (k = 1..comm_round + 1), per client
        self.round = 0
        self.resumed = False  # restored from a checkpoint: the server manager resumes instead of starting
        self._round_started = 0.0

    def state(self) -> dict:
        """Plain state to checkpoint with the strategy after round ``round``."""
        return {"round": self.round, "payloads": self.payloads, "sent_fingerprints": self.sent_fingerprints,
                "log": dataclasses.asdict(self.log)}

    def restore(self, state: dict) -> None:
        """Go on from ``state`` (see ``state``): the round in progress is ``round + 1``, with the saved payloads."""
        self.round, self.payloads = state["round"], state["payloads"]
        self.sent_fingerprints, self.log = state["sent_fingerprints"], MetricsLog(**state["log"])
        self.resumed = True
        self._round_started = time.perf_counter()

    def _outgoing(self, payloads: dict) -> dict:
        for i, payload in payloads.items():
            check_plain(payload, f"payload for client {i}")
        self.sent_fingerprints.append([fingerprint(payloads[i]) for i in range(len(payloads))])
        self.payloads = {i: {"round": self.round + 1, "payload": payloads[i]} for i in range(len(payloads))}
        self._round_started = time.perf_counter()
        return self.payloads

    def get_model_params(self) -> dict:
        if self.payloads is None:  # FedML asks for the first payloads once every client is online
            self._outgoing(self.server.initial_payloads())
            self.on_round(0)
        return self.payloads

    def set_model_params(self, model_parameters) -> None:
        """Part of FedML's interface, unused here: the strategy holds its state, and ``RoundDeadlineServerManager``
        sends what ``aggregate_round`` returns."""

    def aggregate_round(self, uploads: dict[int, dict], absent: dict[int, str], participants: int) -> dict:
        """Close the round with the ``uploads`` that arrived (by client index); ``absent`` says why each other
        client sent none. Uploads are screened as in the simulator."""
        t = self.round + 1
        minimum = self.server.recipe.train_args.min_uploads_per_round
        if len(uploads) < minimum:
            raise RoundError(f"round {t}: {len(uploads)} upload(s) arrived, fewer than "
                             f"train_args.min_uploads_per_round = {minimum}; missing: {absent}")
        uploads, rejected = screen(self.server, uploads, t, minimum)
        left_out = {**absent, **rejected}
        payloads = self.server.aggregate(uploads)
        self.round = t
        self.log.round_seconds.append(time.perf_counter() - self._round_started)
        self.log.add_server(**round_record(t, participants, uploads, left_out, payloads, self.server))
        out = self._outgoing(payloads)
        self.on_round(self.round)
        return out

    def test(self, test_data, device, args):
        """The server holds no client data; clients evaluate what they receive (see StrategyTrainer)."""
