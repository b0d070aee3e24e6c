"""FedML's server manager with a round deadline, so a client that dies or stalls does not stop the federation.

FedML's ``FedMLServerManager`` aggregates once every client has uploaded (``check_whether_all_receive``) and
sends the next payloads to every client, so one dead client hangs the server. ``RoundDeadlineServerManager``
replaces its upload handling (``patch_fedml`` installs it):

- with ``train_args.client_num_per_round: K`` each round's payloads go only to the K clients ``participants``
  samples for it (the simulator's seeded choice), FedML's first round included, and every other live client gets a
  small notice that it is not in the round (``MSG_TYPE_NOT_SAMPLED``): an unsampled client may wait many rounds, and
  the notice restarts its watchdog's count (``comm_args.round_timeout``), with or without ``upload_timeout``. Every
  live client gets the final payload, so the final evaluation covers all N. An unsampled client is not absent, and
  not named in ``left_out``; ``participants`` in the server's rows is the number sampled;
- a round closes when every client it was sent to has uploaded, or, with ``comm_args.upload_timeout``, when
  that many seconds have passed since its payloads went out: a timer posts a deadline message into the server's
  own receive queue, so the round closes on FedML's message thread like any upload;
- uploads carry their round (``StrategyTrainer``): one from an earlier round is discarded, never aggregated;
- the closed round goes to ``StrategyAggregator.aggregate_round`` with what arrived and why the others are left
  out (it screens uploads as the simulator does and enforces ``train_args.min_uploads_per_round``);
- the next payloads (and notices) go only to live clients. A client that missed the deadline, or whose payload or
  notice could not be sent (gRPC sends are bounded by the deadline, see ``grpc_transport``), is absent until it
  reaches the server again: with a late upload, or with the waiting report a client sends when nothing follows its
  upload or notice (client_manager.py). It then gets payloads (or notices) from the next round on, or its final
  payload at once when the run is over (the server then waits for its FINISHED report too, a new deadline counting
  from then). While a client is left out, the run does not end at the others' last FINISHED report but at the final
  deadline, ``upload_timeout`` after the final payloads: a live client left out reports within that time.

A restarted client party (same rank) reports ONLINE again: the round in progress stops waiting for it, and it is
sent FedML's init message with the next round's payload and takes part from then on, with the state its strategy
starts from, or its own checkpoint's with ``--resume`` (``rejoining``).

A restarted server (``pfedseq party --role server --resume``, which needs ``upload_timeout``) starts from its
checkpoint (party.py): the round in progress is the one after the checkpoint's. It does not wait for FedML's
ONLINE handshake (running clients do not send it again); it asks every client for its status and starts the round's
deadline. Each client's first word since the restart (its answer: a waiting report, or ONLINE from a restarted
client party; a later waiting report; an upload for an earlier round) brings it the round's payload (its notice
when it is not sampled for the round), and an upload for the round in progress counts as such. A client not heard
from by the deadline is left out until it reaches the server again, as above. Uploads sent to the dead server are
lost: their clients train that round again.

Without ``upload_timeout`` the round waits for every client and a failed send stops the server, as FedML does.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial

import grpc
from fedml.core.distributed.communication.message import Message
from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager
from fedml.cross_silo.server.message_define import MyMessage

from fedml_pfedseq.federation import participants

MSG_TYPE_DEADLINE = "pfedseq_upload_deadline"  # posted by the server to itself when a round's deadline passes
MSG_TYPE_WAITING = "pfedseq_waiting"  # client -> server: nothing since its upload or notice for MSG_ARG_KEY_ROUND
MSG_TYPE_NOT_SAMPLED = "pfedseq_not_sampled"  # server -> client: not sampled for round MSG_ARG_KEY_ROUND
MSG_ARG_KEY_ROUND = "pfedseq_round"
MSG_ARG_KEY_DEADLINE = "pfedseq_deadline"
NOT_HEARD = "not heard from since the server restarted"


def message(msg_type: str, sender: int, receiver: int, key: str, value) -> Message:
    """One of this plugin's messages: a type and one parameter."""
    built = Message(msg_type, sender, receiver)
    built.add_params(key, value)
    return built


def post_later(manager, seconds: float, msg: Message) -> None:
    """Put ``msg`` into ``manager``'s own receive queue in ``seconds``: it is then handled on FedML's message
    thread like any message (the server's round deadline, a client's wait check)."""
    timer = threading.Timer(seconds, manager.com_manager.post, args=[msg])
    timer.daemon = True
    timer.start()


class RoundDeadlineServerManager(FedMLServerManager):
    unreached: frozenset[int] | set[int] = frozenset()  # after a restart: clients not yet sent the round in progress
    sample: Callable[[int, int], list[int]] = staticmethod(lambda n, t: list(range(n)))  # (N, round t) -> sampled

    def __init__(self, args, aggregator, comm=None, client_rank=0, client_num=0, backend="GRPC"):
        super().__init__(args, aggregator, comm, client_rank, client_num, backend)
        self.strategy = aggregator.aggregator  # our StrategyAggregator, inside FedML's FedMLAggregator
        self.upload_timeout = args.upload_timeout  # comm_args, flattened by fedml_args
        self.uploads: dict[int, dict] = {}  # this round's uploads by client index
        self.absent: dict[int, str] = {}  # client index -> why it is sent nothing (until it is readmitted)
        self.rejoining: set[int] = set()  # restarted clients, sent FedML's init message with the next payload
        self.deadline = 0  # the number of the deadline now running; an earlier one that fires is ignored
        self.sample = partial(participants, self.strategy.server.recipe)

    def register_message_receive_handlers(self):
        super().register_message_receive_handlers()
        self.register_message_receive_handler(MSG_TYPE_DEADLINE, self.handle_deadline)
        self.register_message_receive_handler(MSG_TYPE_WAITING, self.handle_waiting)

    def index(self, client_id) -> int:
        return self.client_real_ids.index(client_id)

    def sampled(self, t: int) -> list[int]:
        """The clients round ``t``'s payloads are meant for: ``participants``' choice; all for the final payload."""
        n = len(self.client_real_ids)
        return list(range(n)) if t > self.round_num else self.sample(n, t)

    def send_init_msg(self):
        """Round 1's payloads (FedML's init message) go to the clients sampled for it, a notice to the others."""
        self.data_silo_index_list = self.sampled(1)
        self.client_id_list_in_this_round = [self.client_real_ids[i] for i in self.data_silo_index_list]
        super().send_init_msg()
        self.notify_unsampled()
        self.start_deadline()

    def handle_message_connection_ready(self, msg_params):
        if self.strategy.resumed and not self.is_initialized:
            self.resume()
        else:
            super().handle_message_connection_ready(msg_params)

    def resume(self) -> None:
        """Go on with the round after the aggregator's checkpoint; every client gets its payload when first heard
        from (``admit``), so ask each for its status now."""
        self.is_initialized = True
        self.args.round_idx = self.strategy.round
        self.data_silo_index_list = self.sampled(self.args.round_idx + 1)
        self.client_id_list_in_this_round = [self.client_real_ids[i] for i in self.data_silo_index_list]
        self.unreached = set(range(len(self.client_real_ids)))
        logging.warning("resumed after round %d of %d; round %d's payloads go to each client once it is heard from",
                        self.args.round_idx, self.round_num, self.args.round_idx + 1)
        for i, client_id in enumerate(self.client_real_ids):
            try:
                self.send_message_check_client_status(client_id, i)
            except grpc.RpcError as err:
                logging.warning("client %d did not take the status check (%s)", i, err.code().name)
        self.start_deadline()

    def admit(self, i: int, how: str) -> bool:
        """After a restart, client ``i``'s first word: send it the round in progress's payload (FedML's sync message,
        which a running client and a restarted client party both take), or its notice when it is not sampled for the
        round. False when it was heard from already."""
        if i not in self.unreached:
            return False
        self.unreached = self.unreached - {i}
        t, client_id = self.args.round_idx + 1, self.client_real_ids[i]
        if i not in self.sampled(t):
            logging.warning("client %d %s; it is not sampled for round %d", i, how, t)
            self.send_notice(client_id, t)
            return True
        logging.warning("client %d %s; sending it round %d's payload", i, how, t)
        if not self.send_payload(client_id, self.strategy.payloads[i]):
            self.client_id_list_in_this_round.remove(client_id)
        return True

    def process_online_status(self, client_status, msg_params):
        if not self.is_initialized:
            super().process_online_status(client_status, msg_params)
            return
        i = self.index(msg_params.get_sender_id())
        if self.admit(i, "is online"):
            return
        if self.upload_timeout is not None and self.args.round_idx < self.round_num:  # a restarted client
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
        post_later(self, self.upload_timeout, message(MSG_TYPE_DEADLINE, 0, 0, MSG_ARG_KEY_DEADLINE, self.deadline))

    def handle_message_receive_model_from_client(self, msg_params):
        i = self.index(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER))
        tagged = msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
        if tagged["round"] != self.args.round_idx + 1:
            logging.warning("round %d: discarded client %d's late upload for round %d", self.args.round_idx + 1, i,
                            tagged["round"])
            if not self.admit(i, f"uploaded for round {tagged['round']}"):
                self.readmit(i, "uploaded late")
            return
        self.unreached = self.unreached - {i}  # after a restart: an upload for the round in progress is its upload
        self.readmit(i, "uploaded again")
        self.uploads[i] = tagged["upload"]
        if self.round_complete():
            self.close_round()

    def handle_waiting(self, msg_params):
        """A waiting report: a client left out is readmitted; otherwise its payload or notice is on its way (or the
        round it was not sampled for is still open), nothing to do."""
        i = self.index(msg_params.get_sender_id())
        since = msg_params.get(MSG_ARG_KEY_ROUND)
        how = (f"waits for a payload since its round {since} {'upload' if i in self.sampled(since) else 'notice'}"
               if since else "waits for its first payload")
        if not self.admit(i, how):
            self.readmit(i, how)

    def readmit(self, i: int, how: str) -> None:
        """Client ``i`` reached the server again: if it was left out, it gets payloads (or notices) from the next round
        on, or its final payload now when the final payloads went out without it."""
        reason = self.absent.pop(i, None)
        if reason is None:
            return
        logging.warning("client %d %s (left out: %s); it gets payloads again", i, how, reason)
        final = self.args.round_idx == self.round_num
        if final and self.send_payload(self.client_real_ids[i], self.strategy.payloads[i]):
            self.client_id_list_in_this_round.append(self.client_real_ids[i])
            self.start_deadline()  # for its FINISHED report too

    def send_payload(self, client_id, payload, init: bool = False) -> bool:
        """Send a payload (``init``: FedML's init message, for a restarted client) (True: sent)."""
        send = self.send_message_init_config if init else self.send_message_diff_sync_model_to_client
        return self.reach(client_id, "its payload", send, client_id, payload, self.index(client_id))

    def send_notice(self, client_id, t: int) -> bool:
        """Tell a client it is not sampled for round ``t`` (True: sent)."""
        return self.reach(client_id, f"its round {t} notice", self.send_message_not_sampled, client_id, t)

    def send_message_not_sampled(self, client_id, t: int) -> None:
        self.send_message(message(MSG_TYPE_NOT_SAMPLED, self.get_sender_id(), client_id, MSG_ARG_KEY_ROUND, t))

    def reach(self, client_id, what: str, send: Callable, *args) -> bool:
        """``send(*args)``; with ``upload_timeout`` a failed send leaves the client out (True: sent)."""
        try:
            send(*args)
            return True
        except grpc.RpcError as err:
            if self.upload_timeout is None:
                raise
            i = self.index(client_id)
            self.absent[i] = f"{what} could not be sent ({err.code().name})"
            logging.warning("client %d left out: %s", i, self.absent[i])
            return False

    def notify_unsampled(self) -> None:
        """Send every live client not sampled for the round in progress its notice: it learns the federation is
        alive, however many rounds it waits."""
        t = self.args.round_idx + 1
        chosen = self.sampled(t)
        for i, client_id in enumerate(self.client_real_ids):
            if i not in chosen and i not in self.absent:
                self.send_notice(client_id, t)

    def process_finished_status(self, client_status, msg_params):
        """A FINISHED report: FedML finishes once every client sent the final payload has reported; while a client is
        left out, the final deadline finishes instead, so a left-out client's waiting report still brings it its
        final payload."""
        if not self.absent:
            super().process_finished_status(client_status, msg_params)
            return
        self.client_finished_mapping[str(msg_params.get_sender_id())] = True
        logging.warning("client %d finished; the run ends at the final deadline, as clients %s are left out",
                        self.index(msg_params.get_sender_id()), sorted(self.absent))

    def handle_deadline(self, msg_params):
        if msg_params.get(MSG_ARG_KEY_DEADLINE) != self.deadline:
            return  # its round closed before it, or a later deadline replaced it
        if self.args.round_idx < self.round_num:
            self.close_round()
            return
        missing = [c for c in self.client_id_list_in_this_round if not self.client_finished_mapping.get(str(c))]
        logging.warning("final deadline: no FINISHED report from clients %s, clients %s left out; finishing", missing,
                        sorted(self.absent))
        self.finish()

    def close_round(self) -> None:
        """Aggregate what arrived, then send the next payloads to the live clients sampled for the next round, and
        the others their notice."""
        t = self.args.round_idx + 1
        sent = [self.index(c) for c in self.client_id_list_in_this_round]
        timeout = f"no upload within comm_args.upload_timeout ({self.upload_timeout} s)"
        self.absent.update({i: "restarted during the round" if i in self.rejoining else
                            NOT_HEARD if i in self.unreached else timeout for i in sent if i not in self.uploads})
        self.unreached = frozenset()
        uploads, self.uploads = self.uploads, {}
        late = "its upload came late; it is sent payloads again from the next round"
        missing = {i: self.absent.get(i, late) for i in self.sampled(t) if i not in uploads}
        payloads = self.strategy.aggregate_round(uploads, missing, participants=len(self.sampled(t)))
        self.args.round_idx = t
        for i in self.rejoining:
            self.absent.pop(i, None)
        chosen = [self.client_real_ids[i] for i in self.sampled(t + 1) if i not in self.absent]
        self.client_id_list_in_this_round = [c for c in chosen if self.send_payload(
            c, payloads[self.index(c)], init=self.index(c) in self.rejoining)]
        self.rejoining.clear()
        self.data_silo_index_list = [self.index(c) for c in self.client_id_list_in_this_round]
        self.notify_unsampled()
        self.start_deadline()
