"""A whole cross-silo deployment on one machine: ``pfedseq deploy recipe.yaml`` starts the server and N clients.

Each party is its own process (``pfedseq party ...``) talking gRPC on 127.0.0.1, with its own thread budget and
log file (``<output_dir>/logs/<party>.log``). Clients start only once the server's port accepts connections.
Unless the recipe names its own certificates (``comm_args.ca_cert``, ...), it issues a throw-away CA and one
certificate per party under ``<output_dir>/tls/``, so a local run is encrypted and authenticated too.
The launcher stops every party and raises :class:`DeploymentError` (naming the party, its exit code and the end
of its log) as soon as one party fails or no round completes within ``comm_args.round_timeout``; with
``comm_args.upload_timeout`` a client that dies once rounds have begun is only reported (the server goes on
without it, see server_manager.py) and named in the summary's ``dead_parties``. When the others exit 0 it merges
their metrics into the simulator's outputs (metrics.json/csv, learning curve, final table) and, with
``hub_args.save_adapters`` and no dead client, the clients' own manifest entries into the server's
``adapters/manifest.json``: the folder is then the simulator's run folder, complete. With ``push_to_hub`` every
party pushed its own share; parties whose push failed (exit code 4, their run complete) are named in a
:class:`PushError` once the folder is assembled.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from fedml_pfedseq.config import Recipe, RecipeError, parse_recipe
from fedml_pfedseq.cross_silo.certificates import CA_CERT, issue_federation, party_files
from fedml_pfedseq.cross_silo.hub_share import EXIT_NOT_PUSHED
from fedml_pfedseq.cross_silo.party import party_name
from fedml_pfedseq.environment import gpu_ids
from fedml_pfedseq.errors import UserError
from fedml_pfedseq.hub.adapters import complete_manifest, remove_stale
from fedml_pfedseq.hub.push import PushError
from fedml_pfedseq.results import MetricsLog, write_run_outputs
from fedml_pfedseq.tracking import check_reporters, track_all

POLL_SECONDS = 0.2
DONE = (0, EXIT_NOT_PUSHED)  # exit codes of a party that completed its run


class DeploymentError(UserError, RuntimeError):
    """A party failed or stalled; every party has been stopped."""


@dataclass
class Party:
    rank: int
    process: subprocess.Popen
    log_path: Path

    @property
    def name(self) -> str:
        return party_name(self.rank)

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace").splitlines() if self.log_path.is_file() else []
        return "\n".join("    " + line for line in text[-lines:])

    def push_error(self) -> str:
        """What the party reported when its push failed: its log from the error on."""
        text = self.log_path.read_text(errors="replace")
        return text[text.rfind("pfedseq: error:"):].strip()


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 right now (the OS picks them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_ipconfig(path: Path, ports: list[int]) -> None:
    """FedML's gRPC address book: party ``rank`` listens on 127.0.0.1:ports[rank]."""
    rows = ["eid,rank,grpc_server_ip,grpc_server_port"]
    rows += [f"{rank},{rank},127.0.0.1,{port}" for rank, port in enumerate(ports)]
    path.write_text("\n".join(rows) + "\n")


def deployment_recipe(recipe: Recipe, output_dir: Path) -> tuple[Recipe, Path, int]:
    """The recipe every party reads (cross-silo, a fresh address book, throw-away certificates under ``tls/``
    unless the recipe names its own, threads per process settled), its path and the server's port."""
    n = recipe.train_args.client_num_in_total
    if n is None:
        raise RecipeError("train_args.client_num_in_total is required for a cross-silo deployment")
    raw = recipe.to_dict()
    ipconfig = output_dir / "grpc_ipconfig.csv"
    ports = free_ports(n + 1)
    write_ipconfig(ipconfig, ports)
    raw["common_args"].update(training_type="cross_silo", output_dir=str(output_dir))
    raw["comm_args"]["grpc_ipconfig_path"] = str(ipconfig.resolve())
    if raw["comm_args"]["tls"] and raw["comm_args"]["ca_cert"] is None:  # a throw-away CA for this run only
        folder = (output_dir / "tls").resolve()
        shutil.rmtree(folder, ignore_errors=True)
        issue_federation(folder, n)
        cert, key = party_files(folder, "{rank}")
        raw["comm_args"].update(ca_cert=str(folder / CA_CERT), party_cert=str(cert), party_key=str(key))
    if raw["device_args"]["num_threads"] is None:  # N busy clients share the cores; the server mostly waits
        raw["device_args"]["num_threads"] = max(1, (os.cpu_count() or 1) // n)
    path = output_dir / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    resolved = parse_recipe(raw, where=str(path), source=recipe.source)
    resolved.label = recipe.label
    return resolved, path, ports[0]


def wait_for_port(port: int, server: Party, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise DeploymentError(f"the server exited with code {server.process.returncode} before listening on "
                                  f"port {port}; end of {server.log_path}:\n{server.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=POLL_SECONDS).close()
            return
        except OSError:
            time.sleep(POLL_SECONDS)
    raise DeploymentError(f"the server did not listen on port {port} within {timeout:.0f} s "
                          f"(comm_args.startup_timeout); end of {server.log_path}:\n{server.log_tail()}")


def read_progress(output_dir: Path) -> int | None:
    """Rounds the server has completed; None until it sends the first payloads (every client connected)."""
    path = output_dir / "parties" / "server" / "progress.json"
    return json.loads(path.read_text())["round"] if path.is_file() else None


def stop_all(parties: list[Party], grace: float = 5.0) -> None:
    for party in parties:
        if party.process.poll() is None:
            party.process.terminate()
    deadline = time.monotonic() + grace
    for party in parties:
        try:
            party.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            party.process.kill()
            party.process.wait()


def supervise(parties: list[Party], output_dir: Path, recipe: Recipe, progress: bool) -> list[dict]:
    """Wait for every party to exit 0; stop all at the first failure or stall. With ``comm_args.upload_timeout``,
    a client that dies after the first payloads went out is reported and left behind: returns those."""
    rounds, comm = recipe.train_args.comm_round, recipe.comm_args
    bar = tqdm(total=rounds, desc=f"{recipe.name} (cross-silo)", disable=not progress)
    done, last_change = None, time.monotonic()
    dead: dict[int, dict] = {}
    try:
        while True:
            for p in [p for p in parties if p.rank not in dead and p.process.poll() not in (None, *DONE)]:
                at = read_progress(output_dir)
                died = (f"{p.name} (rank {p.rank}) exited with code {p.process.returncode} after {at or 0} of "
                        f"{rounds} rounds; end of {p.log_path}:\n{p.log_tail()}")
                if comm.upload_timeout is None or p.rank == 0 or at is None:
                    raise DeploymentError(died)
                tqdm.write(f"pfedseq: warning: {died}\nthe deployment goes on without it (comm_args.upload_timeout)",
                           file=sys.stderr)
                dead[p.rank] = {"party": p.name, "rank": p.rank, "exit_code": p.process.returncode, "rounds_done": at}
            if all(p.rank in dead or p.process.poll() in DONE for p in parties):
                return list(dead.values())
            now_done = read_progress(output_dir)
            if now_done != done:
                bar.update(now_done - (done or 0))
                done, last_change = now_done, time.monotonic()
            elif done is None and time.monotonic() - last_change > comm.startup_timeout:
                raise DeploymentError(f"the clients did not all connect within {comm.startup_timeout:.0f} s "
                                      f"(comm_args.startup_timeout); logs in {output_dir / 'logs'}")
            elif done is not None and time.monotonic() - last_change > comm.round_timeout:
                raise DeploymentError(f"round {done + 1} of {rounds} did not finish within {comm.round_timeout:.0f} s "
                                      f"(comm_args.round_timeout); logs in {output_dir / 'logs'}")
            time.sleep(POLL_SECONDS)
    finally:
        bar.close()
        stop_all(parties)


def collect_metrics(output_dir: Path, num_clients: int, dead: set[int] = frozenset()) -> MetricsLog:
    """One run's log from the parties' files: clients' rows and the server's (a dead client's up to its death, if
    it wrote any); per-round times are the slowest client's (clients train in parallel)."""
    def path(rank: int) -> Path:
        return output_dir / "parties" / party_name(rank) / "metrics.json"

    ranks = [rank for rank in range(1, num_clients + 1) if rank not in dead or path(rank).is_file()]
    server, *clients = [json.loads(path(rank).read_text()) for rank in (0, *ranks)]
    order = lambda row: (row["round"], row["client"])  # noqa: E731
    slowest = lambda key: [max(ts) for ts in zip_longest(*(c[key] for c in clients), fillvalue=0)]  # noqa: E731
    return MetricsLog(rows=sorted((r for c in clients for r in c["eval"]), key=order),
                      train_rows=sorted((r for c in clients for r in c["train"]), key=order),
                      server_rows=server["server"], round_seconds=server["round_seconds"],
                      train_seconds=slowest("train_seconds"), eval_seconds=slowest("eval_seconds"))


def party_env(env: dict[str, str], rank: int, gpus: list[str]) -> dict[str, str]:
    """Party ``rank``'s environment: with several GPUs, one of them (round robin over ``gpus``, CUDA_VISIBLE_DEVICES'
    names), so that the parties do not all land on the first."""
    return env if len(gpus) < 2 else {**env, "CUDA_VISIBLE_DEVICES": gpus[rank % len(gpus)]}


def deploy(recipe: Recipe, output_dir: Path | None = None, progress: bool = True) -> dict:
    """Run ``recipe`` as a cross-silo deployment on this machine; returns the summary (also in summary.json)."""
    check_reporters(recipe)
    output_dir = Path(output_dir or f"{recipe.output_dir}_cross_silo").resolve()  # beside the simulator's run
    shutil.rmtree(output_dir / "parties", ignore_errors=True)  # a previous run's progress must not count
    remove_stale(output_dir / "adapters")  # parties replace only their own share of it
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    recipe, recipe_path, port = deployment_recipe(recipe, output_dir)
    n = recipe.train_args.client_num_in_total
    threads = str(recipe.device_args.num_threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    gpus = gpu_ids() if recipe.device_args.using_gpu else []

    def start(rank: int) -> Party:
        log_path = output_dir / "logs" / f"{party_name(rank)}.log"
        command = [sys.executable, "-m", "fedml_pfedseq.cli", "party", "--cf", str(recipe_path), "--rank", str(rank),
                   "--role", "server" if rank == 0 else "client", "--output-dir", str(output_dir)]
        with log_path.open("w") as log:
            return Party(rank, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                env=party_env(env, rank, gpus)), log_path)

    parties = [start(0)]
    try:
        wait_for_port(port, parties[0], recipe.comm_args.startup_timeout)
        parties += [start(rank) for rank in range(1, n + 1)]
        (output_dir / "logs" / "pids.json").write_text(json.dumps({p.name: p.process.pid for p in parties}))
    except BaseException:
        stop_all(parties)
        raise
    dead = supervise(parties, output_dir, recipe, progress)
    log = collect_metrics(output_dir, n, {d["rank"] for d in dead})
    track_all(recipe, output_dir, log)
    summary = write_run_outputs(log, recipe, output_dir, wall_seconds=time.perf_counter() - started)
    summary.update(engine="fedml cross-silo (gRPC)", dead_parties=dead)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if recipe.hub_args.save_adapters:
        missing = complete_manifest(output_dir / "adapters").get("missing_clients", [])
        if missing:
            tqdm.write(f"pfedseq: warning: {output_dir / 'adapters'} has no adapter of client(s) "
                       f"{', '.join(str(m['client']) for m in missing)}; manifest.json lists them under "
                       "missing_clients", file=sys.stderr)
    not_pushed = [p for p in parties if p.process.returncode == EXIT_NOT_PUSHED]
    if not_pushed:
        raise PushError(f"the deployment finished and {output_dir} holds the whole run, but "
                        f"{', '.join(p.name for p in not_pushed)} could not push to {recipe.hub_args.hub_repo_id}:\n"
                        + "\n".join(f"{p.name}: {p.push_error()}" for p in not_pushed)
                        + f"\nRetry with: pfedseq push {output_dir} --repo-id {recipe.hub_args.hub_repo_id}")
    return summary
