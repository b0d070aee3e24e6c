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
  sent (gRPC sends are bounded by the deadline, see ``fedml_runtime``), is absent until it uploads again.

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
MSG_ARG_KEY_ROUND = "pfedseq_round"


class RoundDeadlineServerManager(FedMLServerManager):
    def __init__(self, args, aggregator, comm=None, client_rank=0, client_num=0, backend="GRPC"):
        super().__init__(args, aggregator, comm, client_rank, client_num, backend)
        self.strategy = aggregator.aggregator  # our StrategyAggregator, inside FedML's FedMLAggregator
        self.upload_timeout = args.upload_timeout  # comm_args, flattened by fedml_args
        self.uploads: dict[int, dict] = {}  # this round's uploads by client index
        self.absent: dict[int, str] = {}  # client index -> why it is not sent payloads (until it uploads again)
        self.rejoining: set[int] = set()  # restarted clients, sent FedML's init message with the next payload

    def register_message_receive_handlers(self):
        super().register_message_receive_handlers()
        self.register_message_receive_handler(MSG_TYPE_DEADLINE, self.handle_deadline)

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
        message = Message(MSG_TYPE_DEADLINE, 0, 0)
        message.add_params(MSG_ARG_KEY_ROUND, self.args.round_idx)
        queue = self.com_manager.grpc_servicer.message_q
        timer = threading.Timer(self.upload_timeout, queue.put, args=[pickle.dumps(message)])
        timer.daemon = True
        timer.start()

    def handle_message_receive_model_from_client(self, msg_params):
        i = self.index(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER))
        tagged = msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
        if self.absent.pop(i, None) is not None:
            logging.info("client %d uploaded again; it gets payloads from the next round on", i)
        if tagged["round"] != self.args.round_idx + 1:
            logging.warning("round %d: discarded client %d's late upload for round %d", self.args.round_idx + 1, i,
                            tagged["round"])
            if self.args.round_idx == self.round_num:  # the final payloads went out without it: it gets its own now
                self.client_id_list_in_this_round.append(self.client_real_ids[i])
                self.send_message_diff_sync_model_to_client(self.client_real_ids[i], self.strategy.payloads[i], i)
            return
        self.uploads[i] = tagged["upload"]
        if self.round_complete():
            self.close_round()

    def handle_deadline(self, msg_params):
        if msg_params.get(MSG_ARG_KEY_ROUND) != self.args.round_idx:
            return  # that round closed before its deadline
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
        for c in live:
            send = self.send_message_init_config if self.index(c) in self.rejoining else \
                self.send_message_diff_sync_model_to_client
            try:
                send(c, payloads[self.index(c)], self.index(c))
            except grpc.RpcError as err:
                if self.upload_timeout is None:
                    raise
                self.absent[self.index(c)] = f"its payload could not be sent ({err.code().name})"
                logging.warning("client %d left out: %s", self.index(c), self.absent[self.index(c)])
        self.rejoining.clear()
        self.client_id_list_in_this_round = [c for c in live if self.index(c) not in self.absent]
        self.data_silo_index_list = [self.index(c) for c in self.client_id_list_in_this_round]
        self.start_deadline()
