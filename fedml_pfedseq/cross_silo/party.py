"""One FedML party, what a silo runs: ``pfedseq party --cf recipe.yaml --rank R --role server|client``.

Rank 0 is the server; rank k >= 1 is client k-1 (FedML numbers clients from 1, partitions start at 0). A party
builds only its own part of the federation (the server never loads a client's samples; a client keeps only its
own partition), runs FedML's cross-silo flow over gRPC, and writes under ``<output_dir>/parties/<party>/``:
``metrics.json``, its FedML home (FedML's logs and traces) and, for the server, ``progress.json`` after each round.
The server also saves its method's artifacts (pFedSeq: ``seq_learner/``) in ``<output_dir>``.

With ``hub_args.save_adapters`` each party also writes its share of ``<output_dir>/adapters/`` (hub/adapters.py):
client k the model its final evaluation loaded, in ``adapters/client_<k>/`` with its accuracies in ``client.json``;
the server the global adapter and a manifest of what it knows, plus ``recipe.yaml`` and ``server_metrics.csv``. With
``push_to_hub`` each then pushes only that share, in its own commit (hub_share.py), and with ``hub_push_every: K``
also its share of a checkpoint every K rounds. A push that fails once training is over does not undo the run: the
party reports the PushError and exits with code 4, its files kept.

**Checkpoints** (``common_args.checkpoint``, default true): the server saves ``parties/server/checkpoint.safetensors``
after every round it closes (and when the first payloads go out), each client ``parties/client_<k>/...`` after every
round it trained: the strategy (checkpoint.py: safetensors, JSON, no pickle, written atomically) and the
aggregator's or trainer's plain state. ``--resume`` (needs ``comm_args.upload_timeout``) loads it: the server goes
on with the round after its checkpoint's (server_manager.py), a client with its saved state (fresh without a
checkpoint) and rejoins as a restarted client does. A checkpoint written with another recipe is refused.

A watchdog stops the party with exit code 3 and an error naming the wait when the first round does not start within
``comm_args.startup_timeout`` seconds or a later round does not complete within ``comm_args.round_timeout``: a
party whose peer died must not hang forever. A client counts from its last payload, round trained or notice that it
is not sampled for a round (client_manager.py), so waiting through rounds it is not sampled for never ends it.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedml_pfedseq.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint
from fedml_pfedseq.config import Recipe, RecipeError
from fedml_pfedseq.cross_silo.certificates import rank_path
from fedml_pfedseq.cross_silo.hub_share import (
    push_client_checkpoint,
    push_server_checkpoint,
    push_share,
    save_client_share,
    save_server_share,
)
from fedml_pfedseq.data.federated import dataset_label_names
from fedml_pfedseq.federation import (
    build_client,
    build_model,
    build_party_data,
    build_server,
    client_depth,
    set_threads,
)
from fedml_pfedseq.hub.round_push import checkpoint_due
from fedml_pfedseq.simulation import check_resumable
from fedml_pfedseq.strategies import method_class
from fedml_pfedseq.training import select_device

EXIT_TIMEOUT = 3
MESSAGE_SLACK = 2**20  # bytes a message may carry besides its states: the JSON header, counts, metrics


def party_name(rank: int) -> str:
    return "server" if rank == 0 else f"client_{rank - 1}"


class Watchdog(threading.Thread):
    """Ends the process (exit code 3) when ``kick`` has not been called for ``timeout`` seconds; until the first
    kick (the first round starting) it allows ``startup_timeout`` instead, for every party to start and connect."""

    def __init__(self, startup_timeout: float, timeout: float, waiting_for: str):
        super().__init__(daemon=True, name="pfedseq-watchdog")
        self.limits = {"startup_timeout": startup_timeout, "round_timeout": timeout}
        self.phase, self.waiting_for = "startup_timeout", waiting_for
        self.last = time.monotonic()
        self.stopped = threading.Event()

    def kick(self, *_) -> None:
        self.phase, self.last = "round_timeout", time.monotonic()

    def run(self) -> None:
        while not self.stopped.wait(min(1.0, min(self.limits.values()) / 10)):
            limit = self.limits[self.phase]
            if time.monotonic() - self.last > limit:
                logging.error("no progress for %.0f s (comm_args.%s) while waiting for %s; stopping",
                              limit, self.phase, self.waiting_for)
                logging.shutdown()
                os._exit(EXIT_TIMEOUT)


def save_party(path: Path, name: str, strategy, state: dict, recipe: Recipe) -> None:
    """One party's checkpoint: its strategy object as part ``name``, ``state`` and the recipe as plain extra."""
    save_checkpoint(path, {name: strategy}, {**state, "recipe": recipe.to_dict()})


def load_party(path: Path, name: str, strategy, recipe: Recipe) -> dict:
    """Restore ``strategy`` from ``path`` and return the saved ``state``; a checkpoint that cannot go on under
    ``recipe`` is refused before anything is loaded, as ``pfedseq run --resume`` refuses one."""
    state = load_checkpoint(path, {name: strategy},
                            check=lambda extra: check_resumable(path, extra["recipe"], extra["round"], recipe),
                            device=select_device(recipe.device_args.using_gpu))
    del state["recipe"]
    return state


def check_party(recipe: Recipe, rank: int, role: str, resume: bool = False) -> int:
    """The number of clients; RecipeError when the recipe cannot run as this party."""
    n = recipe.train_args.client_num_in_total
    if n is None:
        raise RecipeError("train_args.client_num_in_total is required for a cross-silo deployment")
    if role not in ("server", "client"):
        raise RecipeError(f"--role must be 'server' or 'client', got {role!r}")
    if (role == "server") != (rank == 0) or not 0 <= rank <= n:
        raise RecipeError(f"--rank {rank} does not fit --role {role}: the server is rank 0, clients are ranks 1..{n}")
    if resume and recipe.comm_args.upload_timeout is None:
        raise RecipeError("--resume needs comm_args.upload_timeout: a resumed party reaches the others through the "
                          "round deadline and the waiting reports")
    if not recipe.comm_args.grpc_ipconfig_path or not Path(recipe.comm_args.grpc_ipconfig_path).is_file():
        raise RecipeError(f"comm_args.grpc_ipconfig_path must name FedML's gRPC address CSV "
                          f"(eid,rank,grpc_server_ip,grpc_server_port), got {recipe.comm_args.grpc_ipconfig_path!r}")
    check_tls(recipe, rank)
    return n


def check_tls(recipe: Recipe, rank: int) -> None:
    """RecipeError when ``comm_args.tls`` is on and this party's CA, certificate or key is not named or not there."""
    comm = recipe.comm_args
    if not comm.tls:
        return
    if comm.ca_cert is None:
        raise RecipeError("comm_args.tls is on, so every party needs comm_args.ca_cert, party_cert and party_key "
                          "(`pfedseq certs DIR --clients N` issues them; `pfedseq deploy` does so itself), or set "
                          "comm_args.tls: false (plaintext, docs/security.md)")
    for key in ("ca_cert", "party_cert", "party_key"):
        path = rank_path(getattr(comm, key), rank)
        if not path.is_file():
            raise RecipeError(f"comm_args.{key}: no file {path} for rank {rank}")


def message_limit(recipe: Recipe, model, num_clients: int) -> int:
    """The largest message this party sends or accepts, in bytes: ``comm_args.max_message_mb``, or the method's
    states per message times the size of one (LoRA, head) state, plus its extra bytes and ``MESSAGE_SLACK``."""
    if recipe.comm_args.max_message_mb is not None:
        return int(recipe.comm_args.max_message_mb * 2**20)
    state = [*model.get_lora_state().values(), *model.get_head_state().values()]
    method = method_class(recipe.train_args.federated_optimizer)
    return (method.states_per_message(num_clients) * sum(t.numel() * t.element_size() for t in state)
            + method.extra_message_bytes(model) + MESSAGE_SLACK)


def write_json(path: Path, content) -> None:
    """Write atomically, so a reader (the launcher) never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(content, indent=1))
    tmp.replace(path)


def process_times(started: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU seconds of this party since ``started``: an idle party should use little CPU."""
    return {"wall_seconds": time.perf_counter() - started[0], "cpu_seconds": time.process_time() - started[1]}


@dataclass
class PartyRun:
    """What both roles of a party share while it runs: its recipe, FedML's args, where it writes, its device."""

    recipe: Recipe
    args: object  # FedML's argument namespace, after init_fedml
    output_dir: Path  # the deployment's folder
    party_dir: Path  # this party's own folder under it
    resume: bool
    device: object
    watchdog: Watchdog
    started: tuple[float, float]  # wall and CPU time at the start, for process_times

    @property
    def checkpoint(self) -> Path:
        return self.party_dir / CHECKPOINT_FILE


def run_party(recipe: Recipe, rank: int, role: str, output_dir: Path, run_id: str = "0",
              resume: bool = False) -> None:
    """Run one party to the end of the deployment (blocks); ``resume``: from its checkpoint (see above)."""
    from fedml_pfedseq.cross_silo.fedml_runtime import fedml_args, init_fedml, isolate_fedml_files

    num_clients = check_party(recipe, rank, role, resume)
    output_dir = Path(output_dir)
    party_dir = output_dir / "parties" / party_name(rank)
    if resume and role == "server" and not (party_dir / CHECKPOINT_FILE).is_file():
        raise CheckpointError(f"cannot resume the server: no {party_dir / CHECKPOINT_FILE} (was it run with "
                              "common_args.checkpoint: true, and did it send the first payloads?)")
    isolate_fedml_files(party_dir / "fedml_home")
    args = init_fedml(fedml_args(recipe, rank, role, run_id), recipe.tracking_args.log_level)
    set_threads(recipe)
    comm = recipe.comm_args
    watchdog = Watchdog(comm.startup_timeout, comm.round_timeout, "the clients" if rank == 0 else "the server")
    run = PartyRun(recipe, args, output_dir, party_dir, resume, select_device(recipe.device_args.using_gpu), watchdog,
                   (time.perf_counter(), time.process_time()))
    watchdog.start()
    if role == "server":
        serve(run, num_clients)
    else:
        train(run, rank - 1)
    watchdog.stopped.set()
    if recipe.hub_args.push_to_hub:
        push_share(recipe, output_dir, None if role == "server" else rank - 1)


def serve(run: PartyRun, num_clients: int) -> None:
    """The server party: aggregate every round through the method's server strategy, checkpoint and push as the
    recipe asks, then write the server's share of the run."""
    from fedml import FedMLRunner  # after init_fedml: FedML must start patched

    from fedml_pfedseq.cross_silo.aggregator import StrategyAggregator

    recipe = run.recipe
    label_names = dataset_label_names(recipe.data_args)
    model = build_model(recipe, len(label_names))
    server = build_server(recipe, model, num_clients, resuming=run.resume)
    run.args.max_message_bytes = message_limit(recipe, model, num_clients)

    def write_progress(t: int) -> None:
        run.watchdog.kick()
        write_json(run.party_dir / "progress.json", {"round": t, "of": recipe.train_args.comm_round})

    def on_round(t: int) -> None:
        """Before round ``t + 1``'s payloads go out: a restart never misses a payload that was sent."""
        if recipe.common_args.checkpoint:
            save_party(run.checkpoint, "server", server, aggregator.state(), recipe)
        if checkpoint_due(recipe, t):
            push_server_checkpoint(recipe, run.output_dir, server, model, label_names, num_clients,
                                   aggregator.log.server_rows, t)
        write_progress(t)

    aggregator = StrategyAggregator(server, run.args, on_round=on_round)
    if run.resume:
        aggregator.restore(load_party(run.checkpoint, "server", server, recipe))
        write_progress(aggregator.round)
    FedMLRunner(run.args, run.device, [0, 0, None, None, {}, {}, {}, len(label_names)], model,
                server_aggregator=aggregator).run()
    server.save_artifacts(run.output_dir)
    log = aggregator.log
    write_json(run.party_dir / "metrics.json", {"server": log.server_rows, "round_seconds": log.round_seconds,
                                                "sent_fingerprints": aggregator.sent_fingerprints,
                                                **process_times(run.started)})
    save_server_share(recipe, run.output_dir, server, model, label_names, num_clients, log.server_rows)


def train(run: PartyRun, i: int) -> None:
    """Client ``i``'s party: train and evaluate on its own data only through the method's client strategy, write
    its metrics after every payload (a client that dies leaves its rows), then its share of the run."""
    from fedml import FedMLRunner  # after init_fedml: FedML must start patched

    from fedml_pfedseq.cross_silo.trainer import StrategyTrainer

    recipe = run.recipe
    own, label_names = build_party_data(recipe, i)  # its own partition (its own file with "silo") only
    model = build_model(recipe, len(label_names), client_depth(recipe, i))
    run.args.max_message_bytes = message_limit(recipe, model, recipe.train_args.client_num_in_total)

    def write_metrics() -> None:
        log = trainer.log
        write_json(run.party_dir / "metrics.json", {"eval": log.rows, "train": log.train_rows,
                                                    "train_seconds": log.train_seconds,
                                                    "eval_seconds": log.eval_seconds,
                                                    "received_fingerprints": trainer.received_fingerprints,
                                                    **process_times(run.started)})

    def on_progress() -> None:
        run.watchdog.kick()
        write_metrics()

    def on_trained() -> None:
        if recipe.common_args.checkpoint:
            save_party(run.checkpoint, "client", trainer.client, trainer.state(), recipe)

    def on_evaluated(row: dict) -> None:
        if checkpoint_due(recipe, row["round"]):
            push_client_checkpoint(recipe, run.output_dir, i, model, own, label_names, row)

    trainer = StrategyTrainer(build_client(recipe, i, own, model), run.args, on_progress=on_progress,
                              on_trained=on_trained, on_evaluated=on_evaluated)
    if run.resume and run.checkpoint.is_file():
        trainer.restore(load_party(run.checkpoint, "client", trainer.client, recipe))
        logging.warning("client %d resumed from %s, after round %d", i, run.checkpoint, trainer.round)
    n = len(own.train)
    FedMLRunner(run.args, run.device, [n, len(own.test), None, None, {i: n}, {i: own.train}, {i: own.test},
                                       len(label_names)], model, client_trainer=trainer).run()
    write_metrics()
    if recipe.hub_args.save_adapters:  # the model its final evaluation loaded, with what it reported
        save_client_share(recipe, run.output_dir, i, model, own, label_names,
                          trainer.log.at(recipe.train_args.comm_round)[0])
