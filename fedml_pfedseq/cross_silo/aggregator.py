"""FedML's server side of every method: a ``ServerAggregator`` that hands uploads to the method's server strategy.

FedML calls ``get_model_params`` for the first payloads and ``aggregate`` once all uploads of a round are in.
Both return a plain ``dict`` keyed by client index, which FedML's server manager reads as one payload per client
and sends each client only its own entry (``send_message_diff_sync_model_to_client``).
"""
from __future__ import annotations

import time
from typing import Callable

from fedml.core import ServerAggregator

from fedml_pfedseq.results import MetricsLog
from fedml_pfedseq.transport import check_plain, fingerprint, round_record


class StrategyAggregator(ServerAggregator):
    def __init__(self, server, args, on_round: Callable[[int], None] = lambda t: None):
        super().__init__(model=None, args=args)
        self.server = server  # the method's server strategy: the simulator's class, unchanged
        self.on_round = on_round  # called with the rounds completed: 0 when the first payloads go out, then t
        self.log = MetricsLog()  # server rows and round wall times of this party
        self.payloads: dict | None = None
        self.sent_fingerprints: list[list[str]] = []  # per payload sent (k = 1..comm_round + 1), per client
        self.round = 0
        self._round_started = 0.0

    def _outgoing(self, payloads: dict) -> dict:
        for i, payload in payloads.items():
            check_plain(payload, f"payload for client {i}")
        self.payloads = {i: payloads[i] for i in range(len(payloads))}  # type dict: FedML's per-client route
        self.sent_fingerprints.append([fingerprint(self.payloads[i]) for i in self.payloads])
        self._round_started = time.perf_counter()
        return self.payloads

    def get_model_params(self) -> dict:
        if self.payloads is None:  # FedML asks for the first payloads once every client is online
            self._outgoing(self.server.initial_payloads())
            self.on_round(0)
        return self.payloads

    def set_model_params(self, model_parameters) -> None:
        """FedML hands back what ``aggregate`` returned; the strategy already holds that state."""

    def aggregate(self, raw_client_model_or_grad_list: list[tuple[float, dict]]) -> dict:
        """``raw`` is [(num_samples, upload)] in client-index order; the strategy checks each upload's sender."""
        uploads = {i: upload for i, (_, upload) in enumerate(raw_client_model_or_grad_list)}
        payloads = self.server.aggregate(uploads)
        self.round += 1
        self.log.round_seconds.append(time.perf_counter() - self._round_started)
        self.log.add_server(**round_record(self.round, len(uploads), uploads, {}, payloads, self.server))
        out = self._outgoing(payloads)
        self.on_round(self.round)
        return out

    def test(self, test_data, device, args):
        """The server holds no client data; clients evaluate what they receive (see StrategyTrainer)."""
