"""FedML's client manager taking its round from the payload and reporting when it waits too long for one.

- FedML's client counts its rounds itself, so one the server skipped would train on the final payload: it takes
  its round from the payload instead (``{"round": k, ...}``, see aggregator.py).
- With ``comm_args.upload_timeout`` the server stops sending payloads to a client that missed a deadline or whose
  payload could not be sent (server_manager.py). A client that missed the deadline is back when its late upload
  arrives, but one whose payload was lost has nothing to upload. So when ``upload_timeout`` seconds pass after an
  upload without the next payload, the client sends the server a small waiting report (its round), and again every
  ``upload_timeout`` seconds until a payload comes; the server answers a client it had left out with its next
  payload (its final one when the run is over) and ignores the report otherwise. A timer posts the check into the
  client's own receive queue, so it runs on FedML's message thread like any message.
"""
from __future__ import annotations

import logging
import pickle
import threading

import grpc
from fedml.core.distributed.communication.message import Message
from fedml.cross_silo.client.fedml_client_master_manager import ClientMasterManager
from fedml.cross_silo.client.message_define import MyMessage

from fedml_pfedseq.cross_silo.server_manager import MSG_ARG_KEY_ROUND, MSG_TYPE_WAITING

MSG_TYPE_WAIT_CHECK = "pfedseq_wait_check"  # posted by the client to itself upload_timeout after an upload


class WaitingReportClientManager(ClientMasterManager):
    def __init__(self, args, trainer_dist_adapter, comm=None, rank=0, size=0, backend="GRPC"):
        super().__init__(args, trainer_dist_adapter, comm, rank, size, backend)
        self.upload_timeout = args.upload_timeout  # comm_args, flattened by fedml_args
        self.payload_round = 0  # the round of the last payload received

    def register_message_receive_handlers(self):
        super().register_message_receive_handlers()
        self.register_message_receive_handler(MSG_TYPE_WAIT_CHECK, self.handle_wait_check)

    def handle_message_init(self, msg_params):
        self.payload_round = msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)["round"]
        super().handle_message_init(msg_params)

    def handle_message_receive_model_from_server(self, msg_params):
        self.payload_round = msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)["round"]
        self.round_idx = self.payload_round - 1  # FedML trains on a payload while round_idx < comm_round
        super().handle_message_receive_model_from_server(msg_params)

    def send_model_to_server(self, receive_id, weights, local_sample_num):
        super().send_model_to_server(receive_id, weights, local_sample_num)
        self.check_later(weights["round"])

    def check_later(self, uploaded_round: int) -> None:
        """In ``upload_timeout`` seconds, check whether a payload came after the upload for ``uploaded_round``."""
        if self.upload_timeout is None:
            return
        message = Message(MSG_TYPE_WAIT_CHECK, self.client_real_id, self.client_real_id)
        message.add_params(MSG_ARG_KEY_ROUND, uploaded_round)
        queue = self.com_manager.grpc_servicer.message_q
        timer = threading.Timer(self.upload_timeout, queue.put, args=[pickle.dumps(message)])
        timer.daemon = True
        timer.start()

    def handle_wait_check(self, msg_params):
        uploaded_round = msg_params.get(MSG_ARG_KEY_ROUND)
        if self.payload_round > uploaded_round:
            return  # the next payload came
        logging.warning("no payload %s s after the upload for round %d; reporting to the server that it waits",
                        self.upload_timeout, uploaded_round)
        report = Message(MSG_TYPE_WAITING, self.client_real_id, 0)
        report.add_params(MSG_ARG_KEY_ROUND, uploaded_round)
        try:
            self.send_message(report)
        except grpc.RpcError as err:  # the server may be busy or restarting: try again later
            logging.warning("the server did not take the report (%s)", err.code().name)
        self.check_later(uploaded_round)
