"""FedML's client manager taking its round from the payload, waiting through rounds it is not sampled for,
reporting when it waits too long for a payload, and outliving a server restart.

- FedML's client counts its rounds itself, so one the server skipped would train on the final payload: it takes
  its round from the payload instead (``{"round": k, ...}``, see aggregator.py).
- With ``train_args.client_num_per_round`` a client is sent, for each round it is not sampled for, a notice instead
  of a payload (server_manager.py). The notice restarts the party watchdog's count (``comm_args.round_timeout``), so
  a client waits as many rounds as the sampling makes it, as long as the federation is alive.
- With ``comm_args.upload_timeout`` the server stops sending payloads to a client that missed a deadline or whose
  payload or notice could not be sent (server_manager.py). A client that missed the deadline is back when its late
  upload arrives, but one whose payload or notice was lost has nothing to upload. So when ``upload_timeout`` seconds
  pass after an upload, a notice or its ONLINE answer (round 0: its first payload may be the one lost) without a
  later payload or notice, the client sends the server a small waiting report (that round), and again every
  ``upload_timeout`` seconds until one comes; the server answers a client it
  had left out with its next payload or notice (its final payload when the run is over) and ignores the report
  otherwise (the round may simply still be open). A timer posts the check into the client's own receive queue, so
  it runs on FedML's message thread like any message.
- With ``upload_timeout``, a dead server does not end the client: an upload or a FINISHED report it does not take
  is logged and the waiting reports go on. A restarted server (``pfedseq party --role server --resume``) asks
  every client for its status; a client that has had a payload or a notice answers with its waiting report (FedML
  would answer ONLINE, which the server reads as a restarted client party) and is sent the round in progress (or
  its notice).
- The party's watchdog (``comm_args.round_timeout``) counts from the client's last progress; the first send the
  server does not take, a notice and the restarted server's status check also count as progress (the trainer's
  ``on_progress``), so a server restart shorter than ``round_timeout`` never ends a client.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from fedml.cross_silo.client.fedml_client_master_manager import ClientMasterManager
from fedml.cross_silo.client.message_define import MyMessage

from fedml_pfedseq.cross_silo.server_manager import (
    MSG_ARG_KEY_ROUND,
    MSG_TYPE_NOT_SAMPLED,
    MSG_TYPE_WAITING,
    message,
    post_later,
)

MSG_TYPE_WAIT_CHECK = "pfedseq_wait_check"  # posted by the client to itself upload_timeout after an upload or notice


class WaitingReportClientManager(ClientMasterManager):
    server_lost = False  # a send to the server failed and nothing came from the server since
    notice_round = 0  # the round of the last notice that it is not sampled
    kick_watchdog: Callable[[], None] = staticmethod(lambda: None)  # restarts the round_timeout count

    def __init__(self, args, trainer_dist_adapter, comm=None, rank=0, size=0, backend="GRPC"):
        super().__init__(args, trainer_dist_adapter, comm, rank, size, backend)
        self.upload_timeout = args.upload_timeout  # comm_args, flattened by fedml_args
        self.payload_round = 0  # the round of the last payload received
        self.kick_watchdog = trainer_dist_adapter.trainer.trainer.on_progress  # our StrategyTrainer's

    def register_message_receive_handlers(self):
        super().register_message_receive_handlers()
        self.register_message_receive_handler(MSG_TYPE_WAIT_CHECK, self.handle_wait_check)
        self.register_message_receive_handler(MSG_TYPE_NOT_SAMPLED, self.handle_not_sampled)

    @property
    def heard_round(self) -> int:
        """The round of the last payload or notice received (0: none yet)."""
        return max(self.payload_round, self.notice_round)

    def receive_message(self, msg_type, msg_params) -> None:
        if msg_params.get_sender_id() == 0:  # whatever the server sends, it is there
            self.server_lost = False
        super().receive_message(msg_type, msg_params)

    def handle_message_init(self, msg_params):
        self.payload_round = msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)["round"]
        super().handle_message_init(msg_params)

    def handle_message_receive_model_from_server(self, msg_params):
        self.payload_round = msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)["round"]
        self.round_idx = self.payload_round - 1  # FedML trains on a payload while round_idx < comm_round
        super().handle_message_receive_model_from_server(msg_params)

    def handle_not_sampled(self, msg_params):
        """Not sampled for this round: the federation is alive, so the watchdog's count restarts; if nothing follows
        within ``upload_timeout``, the client reports that it waits (``handle_wait_check``)."""
        self.notice_round = msg_params.get(MSG_ARG_KEY_ROUND)
        self.kick_watchdog()
        self.check_later(self.notice_round)

    def handle_message_check_status(self, msg_params):
        """The server asks who is there: at its start (FedML's handshake) or after a restart."""
        if self.heard_round == 0:
            super().handle_message_check_status(msg_params)  # ONLINE, as in FedML
            self.check_later(0)  # the first payload or notice may be lost too
            return
        self.kick_watchdog()
        self.report_waiting(self.heard_round)

    def send_model_to_server(self, receive_id, weights, local_sample_num):
        try:
            super().send_model_to_server(receive_id, weights, local_sample_num)
        except grpc.RpcError as err:
            if self.upload_timeout is None:
                raise
            self.lose_server(f"the upload for round {weights['round']}", err)
        self.check_later(weights["round"])

    def send_client_status(self, receive_id, status=ClientMasterManager.ONLINE_STATUS_FLAG):
        try:
            super().send_client_status(receive_id, status)
        except grpc.RpcError as err:
            if self.upload_timeout is None or status != self.RUN_FINISHED_STATUS_FLAG:
                raise
            self.lose_server("the FINISHED report", err)  # the client is done all the same

    def check_later(self, round_idx: int) -> None:
        """In ``upload_timeout`` seconds, check whether a payload or notice came after round ``round_idx``'s upload
        or notice."""
        if self.upload_timeout is None:
            return
        post_later(self, self.upload_timeout, message(MSG_TYPE_WAIT_CHECK, self.client_real_id, self.client_real_id,
                                                      MSG_ARG_KEY_ROUND, round_idx))

    def handle_wait_check(self, msg_params):
        round_idx = msg_params.get(MSG_ARG_KEY_ROUND)
        if self.heard_round > round_idx:
            return  # a later payload or notice came
        logging.warning("nothing from the server %s s after %s; reporting that it waits", self.upload_timeout,
                        f"round {round_idx}'s upload or notice" if round_idx else "it said it is online")
        self.report_waiting(round_idx)
        self.check_later(round_idx)

    def report_waiting(self, round_idx: int) -> None:
        try:
            self.send_message(message(MSG_TYPE_WAITING, self.client_real_id, 0, MSG_ARG_KEY_ROUND, round_idx))
        except grpc.RpcError as err:  # the server may be busy or restarting: the next check reports again
            self.lose_server("the waiting report", err)

    def lose_server(self, what: str, err: grpc.RpcError) -> None:
        """A send the server did not take; the first since its last message restarts the watchdog's count, so the
        server has ``round_timeout`` seconds to come back."""
        logging.warning("the server did not take %s (%s)", what, err.code().name)
        if not self.server_lost:
            self.server_lost = True
            self.kick_watchdog()
