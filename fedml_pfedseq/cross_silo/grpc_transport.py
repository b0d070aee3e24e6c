"""The gRPC transport every party uses in place of FedML's: mutual TLS, the wire format of transport.py, and the
sender checked against the certificate, so nothing that reaches a party's port is unpickled or trusted.

FedML 0.9.6's ``GRPCCommManager`` binds an insecure port, ``pickle.loads`` whatever arrives (remote code execution
for anyone who reaches the port) and believes the sender a message names. ``SecureGRPCCommManager`` keeps its
interface (FedML's managers call ``send_message`` and observe received ``Message``s) and changes what crosses:

- each message is ``transport.encode``'d; a received one is ``transport.decode``'d under the message-size limit
  (``args.max_message_bytes``, set by the party from its payload size or ``comm_args.max_message_mb``);
- with ``comm_args.tls`` (the default) the port takes only TLS connections from peers whose certificate the
  federation's CA signed (``require_client_auth``), and a send reaches rank r only if the listener proves
  ``party-r`` (certificates.py);
- a message is accepted only when its header's sender is the rank the peer's certificate proves, its receiver is this
  party, and the sender may talk to it at all (clients hear only the server, the server only clients 1..N);
- a refused message is logged with the peer's address, its certificate's identity and the reason, answered with an
  error status, and never reaches FedML: the party goes on serving the others.

Two of FedML's work-arounds live here too: the receive loop waits on its queue instead of spinning, and every send
is bounded by ``comm_args.upload_timeout`` (to a peer that accepts no connection FedML waits for gRPC's 20 s connect
timeout). Messages a party posts to itself (deadlines, wait checks) go straight into its queue as ``Message``s
(``post``), never through bytes.
"""
from __future__ import annotations

import csv
import logging
import queue
from concurrent import futures
from pathlib import Path

import grpc
from fedml.core.distributed.communication.base_com_manager import BaseCommunicationManager
from fedml.core.distributed.communication.constants import CommunicationConstants
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2 as pb2
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2_grpc as pb2_grpc
from fedml.core.distributed.communication.message import Message

from fedml_pfedseq.cross_silo.certificates import party_identity, rank_of, rank_path
from fedml_pfedseq.transport import WireError, WireLimits, decode, encode

POLL_SECONDS = 0.2  # how long one poll of an empty receive queue waits before the loop checks is_running
FIELDS = (Message.MSG_ARG_KEY_TYPE, Message.MSG_ARG_KEY_SENDER, Message.MSG_ARG_KEY_RECEIVER)


class Refused(Exception):
    """A message that must not reach FedML; ``status`` is what its sender is answered."""

    def __init__(self, reason: str, status: grpc.StatusCode):
        super().__init__(reason)
        self.status = status


def read_addresses(path: str) -> dict[int, tuple[str, int]]:
    """FedML's gRPC address CSV (eid,rank,grpc_server_ip,grpc_server_port): rank -> (host, port)."""
    with open(path, newline="") as f:
        return {int(row["rank"]): (row["grpc_server_ip"], int(row["grpc_server_port"])) for row in csv.DictReader(f)}


def peer_rank(context: grpc.ServicerContext) -> int | None:
    """The rank the peer's TLS certificate proves (None without TLS or without a ``party-<k>`` name)."""
    names = context.auth_context().get("x509_subject_alternative_name", [])
    ranks = {rank_of(name.decode(errors="replace")) for name in names} - {None}
    return ranks.pop() if len(ranks) == 1 else None


class CheckingServicer(pb2_grpc.gRPCCommManagerServicer):
    """Decodes and checks every message before it is queued for FedML (see the module docstring)."""

    def __init__(self, rank: int, num_clients: int, limits: WireLimits, tls: bool):
        self.rank, self.limits, self.tls = rank, limits, tls
        self.senders = set(range(1, num_clients + 1)) if rank == 0 else {0}  # who may talk to this party
        self.message_q: queue.Queue[Message] = queue.Queue()

    def sendMessage(self, request, context):
        proven = peer_rank(context) if self.tls else None
        try:
            self.message_q.put(self.accept(request.message, proven))
        except Refused as refusal:
            who = f"{context.peer()} ({party_identity(proven) if proven is not None else 'no proven identity'})"
            logging.warning("refused a message from %s: %s", who, refusal)
            context.abort(refusal.status, f"refused by {party_identity(self.rank)}: {refusal}")
        return pb2.CommResponse()

    def accept(self, data: bytes, proven: int | None) -> Message:
        """The FedML message in ``data`` from a peer whose certificate proves rank ``proven``; Refused otherwise."""
        if self.tls and proven is None:
            raise Refused("its certificate names no party-<rank> identity", grpc.StatusCode.PERMISSION_DENIED)
        try:
            wire = decode(data, self.limits)
        except WireError as err:
            raise Refused(str(err), grpc.StatusCode.INVALID_ARGUMENT) from None
        if self.tls and wire.sender != proven:
            raise Refused(f"its header says it is from rank {wire.sender}, its certificate proves rank {proven}",
                          grpc.StatusCode.PERMISSION_DENIED)
        if wire.sender not in self.senders or wire.receiver != self.rank:
            raise Refused(f"rank {wire.sender} may not send rank {self.rank} messages (header: to rank "
                          f"{wire.receiver})", grpc.StatusCode.PERMISSION_DENIED)
        if any(key in wire.params for key in FIELDS):
            raise Refused(f"its parameters repeat the header's fields {FIELDS}", grpc.StatusCode.INVALID_ARGUMENT)
        msg = Message(wire.type, wire.sender, wire.receiver)
        msg.msg_params.update(wire.params)
        return msg


class SecureGRPCCommManager(BaseCommunicationManager):
    """FedML's ``GRPCCommManager`` interface over checked messages and (by default) mutual TLS."""

    def __init__(self, grpc_ipconfig_path, topic="fedml", client_rank=0, client_num=0, args=None):
        self.rank, self.args = client_rank, args
        self.addresses = read_addresses(grpc_ipconfig_path)
        self.limits = WireLimits(args.max_message_bytes)
        self.tls = args.tls
        self._observers = []
        # gRPC drops anything over twice the limit before reading it; the codec refuses, and logs, what is between
        self.options = [("grpc.max_send_message_length", 2 * self.limits.max_bytes),
                        ("grpc.max_receive_message_length", 2 * self.limits.max_bytes),
                        ("grpc.enable_http_proxy", 0)]
        self.grpc_servicer = CheckingServicer(self.rank, args.client_num_in_total, self.limits, self.tls)
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(2, client_num + 1)),
                                       options=self.options)
        pb2_grpc.add_gRPCCommManagerServicer_to_server(self.grpc_servicer, self.grpc_server)
        host, port = self.addresses[self.rank]
        if self.tls:
            ca, cert, key = (Path(p).read_bytes() for p in (args.ca_cert, rank_path(args.party_cert, self.rank),
                                                          rank_path(args.party_key, self.rank)))
            self.grpc_server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=True))
            self.credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                                            certificate_chain=cert)
        else:
            logging.warning("comm_args.tls is false: %s's messages cross the network unencrypted and any host that "
                            "reaches port %d can send it messages as any party", party_identity(self.rank), port)
            self.grpc_server.add_insecure_port(f"{host}:{port}")
        self.grpc_server.start()
        self.is_running = True
        logging.info("%s listens on %s:%d (%s)", party_identity(self.rank), host, port,
                     "mutual TLS" if self.tls else "plaintext")

    def send_message(self, msg: Message) -> None:
        """Encode and send ``msg``; grpc.RpcError when the receiver cannot be reached or refuses it."""
        receiver = int(msg.get_receiver_id())
        params = {k: v for k, v in msg.get_params().items() if k not in FIELDS}
        data = encode(msg.get_type(), int(msg.get_sender_id()), receiver, params)
        if len(data) > self.limits.max_bytes:
            raise WireError(f"a message of {len(data)} bytes to rank {receiver} is over the "
                            f"{self.limits.max_bytes}-byte limit every party enforces: raise comm_args.max_message_mb")
        host, port = self.addresses[receiver]
        if self.tls:  # the listener must prove it is party-<receiver>, whatever address it answers on
            channel = grpc.secure_channel(f"{host}:{port}", self.credentials, options=[
                *self.options, ("grpc.ssl_target_name_override", party_identity(receiver))])
        else:
            channel = grpc.insecure_channel(f"{host}:{port}", options=self.options)
        try:
            stub = pb2_grpc.gRPCCommManagerStub(channel)
            stub.sendMessage(pb2.CommRequest(client_id=self.rank, message=data), timeout=self.args.upload_timeout)
        finally:
            channel.close()

    def post(self, msg: Message) -> None:
        """Queue a message of this party's own (a deadline, a wait check), handled on the message thread."""
        self.grpc_servicer.message_q.put(msg)

    def add_observer(self, observer) -> None:
        self._observers.append(observer)

    def remove_observer(self, observer) -> None:
        self._observers.remove(observer)

    def handle_receive_message(self) -> None:
        """FedML's receive loop (blocks until ``stop_receive_message``): first the connection-ready message, then
        every accepted message, in order, to every observer."""
        ready = Message(CommunicationConstants.MSG_TYPE_CONNECTION_IS_READY, self.rank, self.rank)
        self.notify(ready)
        while self.is_running:
            try:
                msg = self.grpc_servicer.message_q.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            self.notify(msg)

    def notify(self, msg: Message) -> None:
        for observer in list(self._observers):
            observer.receive_message(msg.get_type(), msg)

    def stop_receive_message(self) -> None:
        self.grpc_server.stop(None)
        self.is_running = False
