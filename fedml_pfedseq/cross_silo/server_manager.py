"""FedML's server manager with a round deadline, so a client that dies or stalls does not stop the federation.

FedML's ``FedMLServerManager`` aggregates once every client has uploaded (``check_whether_all_receive``) and
sends the next payloads to every client, so one dead client hangs the server. ``RoundDeadlineServerManager``
replaces its upload handling (``patch_fedml`` installs it):

- a round closes when every client it was sent to has uploaded, or, with ``comm_args.upload_timeout``, when
  that many seconds have passed since its payloads went out: a timer posts a deadline message into the server's
  own receive queue, so the round closes on FedML's message thread like any upload;
- uploads carry their round (``StrategyTrainer``): one from an earlier round is discarded, never aggregated;
- the closed round goes to ``StrategyAggregator.aggregate_round`` with what arrived and why the others are left
  out (it screens uploads as the simulator does and enforces ``train_args.min_uploads_per_round``);
- the next payloads go only to live clients. A client that missed the deadline, or whose payload could not be
  sent (gRPC sends are bounded by the deadline, see ``fedml_runtime``), is absent until it reaches the server
  again: with a late upload, or with the waiting report a client sends when no payload follows its upload
  (client_manager.py). It then gets payloads from the next round on, or its final payload at once when the run is
  over (the server then waits for its FINISHED report too, a new deadline counting from then).

A restarted client party (same rank) reports ONLINE again: the round in progress stops waiting for it, and it is
sent FedML's init message with the next round's payload and takes part from then on, with the state its strategy
starts from (``rejoining``).

Without ``upload_timeout`` the round waits for every client and a failed send stops the server, as FedML does.
"""
from __future__ import annotations

import logging
import pickle
import threading

import grpc
from fedml.core.distributed.communication.message import Message
from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager
from fedml.cross_silo.server.message_define import MyMessage

MSG_TYPE_DEADLINE = "pfedseq_upload_deadline"  # posted by the server to itself when a round's deadline passes
MSG_TYPE_WAITING = "pfedseq_waiting"  # client -> server: no payload since its upload for round MSG_ARG_KEY_ROUND
MSG_ARG_KEY_ROUND = "pfedseq_round"
MSG_ARG_KEY_DEADLINE = "pfedseq_deadline"


class RoundDeadlineServerManager(FedMLServerManager):
    def __init__(self, args, aggregator, comm=None, client_rank=0, client_num=0, backend="GRPC"):
        super().__init__(args, aggregator, comm, client_rank, client_num, backend)
        self.strategy = aggregator.aggregator  # our StrategyAggregator, inside FedML's FedMLAggregator
        self.upload_timeout = args.upload_timeout  # comm_args, flattened by fedml_args
        self.uploads: dict[int, dict] = {}  # this round's uploads by client index
        self.absent: dict[int, str] = {}  # client index -> why it is not sent payloads (until it is readmitted)
        self.rejoining: set[int] = set()  # restarted clients, sent FedML's init message with the next payload
        self.deadline = 0  # the number of the deadline now running; an earlier one that fires is ignored

    def register_message_receive_handlers(self):
        super().register_message_receive_handlers()
        self.register_message_receive_handler(MSG_TYPE_DEADLINE, self.handle_deadline)
        self.register_message_receive_handler(MSG_TYPE_WAITING, self.handle_waiting)

    def index(self, client_id) -> int:
        return self.client_real_ids.index(client_id)

    def send_init_msg(self):
        super().send_init_msg()
        self.start_deadline()

    def process_online_status(self, client_status, msg_params):
        if not self.is_initialized:
            super().process_online_status(client_status, msg_params)
        elif self.upload_timeout is not None and self.args.round_idx < self.round_num:  # a restarted client
            i = self.index(msg_params.get_sender_id())
            logging.warning("client %d is online again; it rejoins in the next round", i)
            self.rejoining.add(i)
            if self.round_complete():
                self.close_round()

    def round_complete(self) -> bool:
        """Every client sent this round's payload has uploaded, or has restarted since (it cannot answer)."""
        return all(self.index(c) in self.uploads or self.index(c) in self.rejoining
                   for c in self.client_id_list_in_this_round)

    def start_deadline(self) -> None:
        """Post a deadline for the round now in progress (or for the final FINISHED reports)."""
        if self.upload_timeout is None:
            return
        self.deadline += 1
        message = Message(MSG_TYPE_DEADLINE, 0, 0)
        message.add_params(MSG_ARG_KEY_DEADLINE, self.deadline)
        queue = self.com_manager.grpc_servicer.message_q
        timer = threading.Timer(self.upload_timeout, queue.put, args=[pickle.dumps(message)])
        timer.daemon = True
        timer.start()

    def handle_message_receive_model_from_client(self, msg_params):
        i = self.index(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER))
        tagged = msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
        if tagged["round"] != self.args.round_idx + 1:
            logging.warning("round %d: discarded client %d's late upload for round %d", self.args.round_idx + 1, i,
                            tagged["round"])
            self.readmit(i, "uploaded late")
            return
        self.readmit(i, "uploaded again")
        self.uploads[i] = tagged["upload"]
        if self.round_complete():
            self.close_round()

    def handle_waiting(self, msg_params):
        """A waiting report: a client left out is readmitted; otherwise its payload is on its way, nothing to do."""
        uploaded = msg_params.get(MSG_ARG_KEY_ROUND)
        self.readmit(self.index(msg_params.get_sender_id()), f"waits for a payload since its round {uploaded} upload")

    def readmit(self, i: int, how: str) -> None:
        """Client ``i`` reached the server again: if it was left out, it gets payloads from the next round on, or
        its final payload now when the final payloads went out without it."""
        reason = self.absent.pop(i, None)
        if reason is None:
            return
        logging.warning("client %d %s (left out: %s); it gets payloads again", i, how, reason)
        final = self.args.round_idx == self.round_num
        if final and self.send_payload(self.client_real_ids[i], self.strategy.payloads[i]):
            self.client_id_list_in_this_round.append(self.client_real_ids[i])
            self.start_deadline()  # for its FINISHED report too

    def send_payload(self, client_id, payload, init: bool = False) -> bool:
        """Send a payload (``init``: FedML's init message, for a restarted client); with ``upload_timeout`` a failed
        send leaves the client out (True: sent)."""
        i = self.index(client_id)
        send = self.send_message_init_config if init else self.send_message_diff_sync_model_to_client
        try:
            send(client_id, payload, i)
            return True
        except grpc.RpcError as err:
            if self.upload_timeout is None:
                raise
            self.absent[i] = f"its payload could not be sent ({err.code().name})"
            logging.warning("client %d left out: %s", i, self.absent[i])
            return False

    def handle_deadline(self, msg_params):
        if msg_params.get(MSG_ARG_KEY_DEADLINE) != self.deadline:
            return  # its round closed before it, or a later deadline replaced it
        if self.args.round_idx < self.round_num:
            self.close_round()
            return
        missing = [c for c in self.client_id_list_in_this_round if not self.client_finished_mapping.get(str(c))]
        logging.warning("no FINISHED report from clients %s within comm_args.upload_timeout; finishing", missing)
        self.finish()

    def close_round(self) -> None:
        """Aggregate what arrived, then send the next payloads to the live clients."""
        sent = [self.index(c) for c in self.client_id_list_in_this_round]
        timeout = f"no upload within comm_args.upload_timeout ({self.upload_timeout} s)"
        self.absent.update({i: "restarted during the round" if i in self.rejoining else timeout
                            for i in sent if i not in self.uploads})
        uploads, self.uploads = self.uploads, {}
        late = "its upload came late; it is sent payloads again from the next round"
        missing = {i: self.absent.get(i, late) for i in range(len(self.client_real_ids)) if i not in uploads}
        payloads = self.strategy.aggregate_round(uploads, missing, participants=len(sent))
        self.args.round_idx += 1
        for i in self.rejoining:
            self.absent.pop(i, None)
        live = [c for c in self.client_real_ids if self.index(c) not in self.absent]
        self.client_id_list_in_this_round = [c for c in live if self.send_payload(
            c, payloads[self.index(c)], init=self.index(c) in self.rejoining)]
        self.rejoining.clear()
        self.data_silo_index_list = [self.index(c) for c in self.client_id_list_in_this_round]
        self.start_deadline()
