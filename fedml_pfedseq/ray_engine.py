"""``common_args.engine: ray``: a round's clients trained in parallel on Ray actors, on this machine or a cluster.

Each worker is an actor that builds the recipe's data, backbone(s) and client objects once (``ClientWorker``) and
then trains whichever clients it is handed, through the same ``visit_client`` the local engine runs. The driver
keeps the federation as the local engine does: the server, ``screen``, aggregation, checkpoints and the final
evaluation stay in ``run_federation``; only "visit these clients with these payloads" happens on the workers.

Client-side state (local heads, personal models, optimiser state, the last payload) travels with the client: the
driver holds every client object and sends its state (``checkpoint.pack_state``, the form a checkpoint saves) with
its payload; the worker loads it into its own copy of that client, visits it, and sends the new state back with
the upload, which the driver loads into its client. So any worker can train any client, a checkpoint written on
either engine resumes on the other, and a worker that dies takes no client state with it.

A worker killed mid-round (its process gone: a signal, out of memory, a lost node) is restarted by Ray
(``max_restarts=-1``) and the client it was training is retried on it ``ray_args.worker_retries`` times, from the
same state and payload, so a retried client's results are the ones it would have had. A client that still does not
come back (or not within ``ray_args.worker_timeout``) is left out of the round like a rejected upload (``screen``:
the round goes on unless fewer than ``train_args.min_uploads_per_round`` remain) and keeps its state from before
the round; its evaluation row of that round is missing.

Workers are gang-scheduled in one placement group (one bundle per worker: ``threads_per_worker`` CPUs and, where
the recipe uses GPUs and Ray has them, one GPU), so two runs sharing a Ray (grid cells) never each hold part of
their workers while waiting for the rest.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fedml_pfedseq.checkpoint import pack_state, unpack_state
from fedml_pfedseq.config import RayArgs, Recipe
from fedml_pfedseq.errors import UserError
from fedml_pfedseq.federation import Federation, build_federation
from fedml_pfedseq.simulation import AfterEvaluation, Visit, visit_client
from fedml_pfedseq.training import select_device

INSTALL_HINT = "pip install '.[ray]' (or pip install 'fedml-pfedseq[ray]')"
GCS_WAIT = "RAY_gcs_server_port_wait_time_s"  # Ray's own setting: seconds a starting Ray waits for its GCS


class RayEngineError(UserError, RuntimeError):
    """Ray missing, or a Ray that cannot give the workers a recipe asks for."""


def import_ray():
    """The ``ray`` module, or a RayEngineError saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise RayEngineError(f"common_args.engine: ray and --engine ray need Ray, which is not installed ({err}); "
                             f"install it with {INSTALL_HINT}") from None
    return ray


@functools.lru_cache(maxsize=1)
def process_token() -> str:
    """The auth token of every local Ray this process starts: Ray's driver reads its token once and keeps it, so a
    second Ray started with a new token would refuse this process (InvalidAuthToken)."""
    return secrets.token_hex(32)


class RaySession:
    """Ray for one run or grid: connected to ``ray_args.ray_address``, or a Ray started on this machine with its
    session folder, object store and auth token under ``ray_args.ray_temp_dir`` (a fresh temporary folder unless
    set), never under the home folder. Inside a Ray task (a grid cell), or where the caller already connected, the
    Ray there is used and left running."""

    def __init__(self, args: RayArgs, cpus: int | None = None):
        self.args = args
        self.cpus = cpus  # a local Ray's CPUs (the tests': 2); None: this machine's
        self.ray = import_ray()
        self.started = False
        self.temp_dir: Path | None = None
        self.own_token: str | None = None  # the auth token file this session made, if it made one
        self.own_wait: str | None = None  # the GCS start-up wait this session set, if it set one

    def __enter__(self) -> RaySession:
        if self.ray.is_initialized():
            return self
        if self.args.ray_address:  # a cluster: its token comes from RAY_AUTH_TOKEN(_PATH), as for `ray start`
            self.ray.init(address=self.args.ray_address, include_dashboard=False, log_to_driver=False)
            self.started = True
            return self
        self.temp_dir = Path(self.args.ray_temp_dir or tempfile.mkdtemp(prefix="pfedseq-ray-"))
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            token = self.temp_dir / "auth_token"  # Ray would write ~/.ray/auth_token otherwise
            token.write_text(process_token())
            token.chmod(0o600)
            os.environ["RAY_AUTH_TOKEN_PATH"] = self.own_token = str(token)
        memory = self.args.object_store_mib * 2 ** 20 if self.args.object_store_mib else None
        if GCS_WAIT not in os.environ:  # Ray waits 30 s for its GCS to start: too short on a loaded 2-core machine
            os.environ[GCS_WAIT] = self.own_wait = "120"
        try:
            self.ray.init(num_cpus=self.cpus, include_dashboard=False, log_to_driver=False,
                          _temp_dir=str(self.temp_dir), object_store_memory=memory)
        except BaseException:
            self._clean_up()  # a Ray that did not start leaves neither its folder nor its token behind
            raise
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()
            self._clean_up()

    def _clean_up(self) -> None:
        """Forget the token and the wait this session set, and remove the temporary folder it made (not one the
        recipe named)."""
        for name, value in (("RAY_AUTH_TOKEN_PATH", self.own_token), (GCS_WAIT, self.own_wait)):
            if value and os.environ.get(name) == value:
                del os.environ[name]
        if self.temp_dir is not None and not self.args.ray_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def moved(tree, device: torch.device):
    """``tree`` (nested dicts, lists and dataclasses of tensors and plain values) with every tensor on ``device``."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return type(tree)(**{f.name: moved(getattr(tree, f.name), device) for f in dataclasses.fields(tree)})
    if isinstance(tree, dict):
        return {k: moved(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(moved(v, device) for v in tree)
    return tree


class ClientWorker:
    """One Ray actor: the recipe's data, backbone(s) and client objects, built once; visits the clients it is
    handed, each from the state the driver sends with it (so it may be any client, in any round)."""

    def __init__(self, recipe: Recipe, threads: int):
        if not recipe.device_args.num_threads:  # else build_federation sets the recipe's
            torch.set_num_threads(threads)
        self.fed = build_federation(recipe, resuming=True)  # the server is only built, never used here
        self.device = select_device(recipe.device_args.using_gpu)

    def visit(self, client_id: int, payload: dict, state: tuple, round_idx: int, evaluate: bool) -> tuple:
        """(the Visit, the client's state after it), tensors on the CPU for the way back."""
        client = self.fed.clients[client_id]
        unpack_state(client, state, f"client_{client_id}", self.device)
        visit = visit_client(client, payload, round_idx, evaluate)  # payloads are CPU tensors, as in every engine
        return moved(visit, torch.device("cpu")), pack_state(client, f"client_{client_id}")

    def process(self) -> dict:
        """This worker's process id and resident memory (MiB): what the fault test kills, what benchmarks report."""
        import psutil

        return {"pid": os.getpid(), "rss_mib": psutil.Process().memory_info().rss / 2 ** 20}


def worker_count(args: RayArgs, cpus: float, gpus: float, num_clients: int) -> int:
    """``ray_args.num_workers``, else one per GPU (where used) or per ``threads_per_worker`` CPUs, at most one per
    client."""
    if args.num_workers:
        return args.num_workers
    return max(1, min(num_clients, int(gpus) if gpus else int(cpus // args.threads_per_worker)))


class RayEngine:
    """``common_args.engine: ray``: visits a round's clients on Ray workers (see the module's docstring)."""

    def __init__(self, fed: Federation):
        self.fed = fed
        self.args = fed.recipe.ray_args
        self.session = RaySession(self.args)
        self.workers: list = []
        self.group = None
        self.device = select_device(fed.recipe.device_args.using_gpu)

    def __enter__(self) -> RayEngine:
        ray = self.session.__enter__().ray
        try:
            self._start_workers(ray)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_workers(self, ray) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        total = ray.cluster_resources()
        gpus = total.get("GPU", 0) if self.fed.recipe.device_args.using_gpu else 0
        count = worker_count(self.args, total.get("CPU", 0), gpus, len(self.fed.clients))
        bundle = {"CPU": self.args.threads_per_worker, **({"GPU": 1} if gpus else {})}
        short = [f"{need * count:g} {kind}" for kind, need in bundle.items() if need * count > total.get(kind, 0)]
        if short:  # a placement group no node set can hold would wait for ever
            raise RayEngineError(f"ray_args asks for {count} worker(s) of {bundle}, but this Ray has only "
                                 f"{total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU in all (short: "
                                 f"{', '.join(short)}); lower ray_args.num_workers or threads_per_worker")
        self.group = placement_group([bundle] * count, strategy="PACK")
        ray.get(self.group.ready())  # waits while other runs (grid cells) hold the CPUs, never for what cannot come
        actor = ray.remote(ClientWorker)
        self.workers = [actor.options(
            num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_restarts=-1,
            max_task_retries=self.args.worker_retries,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=k),
        ).remote(self.fed.recipe, self.args.threads_per_worker) for k in range(count)]
        ray.get([worker.process.remote() for worker in self.workers], timeout=self.args.worker_timeout)

    def __exit__(self, *exc) -> None:
        ray = self.session.ray
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
        self.session.__exit__()

    def visit(self, round_idx: int, payloads: dict[int, dict], evaluate: bool,
              after_evaluation: AfterEvaluation | None = None) -> tuple[dict[int, Visit], dict[int, str]]:
        """Client j of ``payloads`` goes to worker j mod W (a worker runs its calls in order); each one's state is
        loaded back into the driver's client as it arrives. ``after_evaluation`` is not called: the evaluations of
        rounds before the last happen in the workers, and the only hook that needs them (hub_args.hub_push_every)
        is refused with this engine (config.py); the final evaluation runs in the driver."""
        ray = self.session.ray
        from ray.exceptions import GetTimeoutError, RayActorError

        calls = {}  # client -> (its worker, the call's result)
        for j, (i, payload) in enumerate(payloads.items()):
            state = pack_state(self.fed.clients[i], f"client_{i}")
            worker = self.workers[j % len(self.workers)]
            calls[i] = worker, worker.visit.remote(i, payload, state, round_idx, evaluate)
        deadline = time.monotonic() + self.args.worker_timeout
        visits, lost, restarted = {}, {}, {}  # restarted: id -> each worker that died or was killed this round
        for i, (worker, call) in calls.items():
            try:
                visit, state = ray.get(call, timeout=max(0.0, deadline - time.monotonic()))
            except RayActorError as err:
                lost[i] = (f"lost: its Ray worker died and {self.args.worker_retries} retry(ies) did not bring it back "
                           f"({type(err).__name__})")
                restarted[id(worker)] = worker
                continue
            except GetTimeoutError:
                lost[i] = f"lost: no answer within ray_args.worker_timeout = {self.args.worker_timeout:g} s"
                ray.kill(worker, no_restart=False)  # the stuck worker: Ray restarts it
                restarted[id(worker)] = worker
                continue
            unpack_state(self.fed.clients[i], state, f"client_{i}", self.device)
            visits[i] = visit  # on the CPU, as the local engine's uploads are
        # the next round starts once they are back (else its calls could still reach the dead process and fail)
        ray.wait([w.process.options(max_task_retries=-1).remote() for w in restarted.values()],
                 num_returns=len(restarted), timeout=self.args.worker_timeout)
        return visits, lost
