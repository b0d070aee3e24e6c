"""FedML 0.9.6 made fit for offline deployments: its arguments from a recipe, and three work-arounds.

1. ``fedml.init`` POSTs five times to the hosted platform's config endpoint, even with MLOps off:
   ``fetch_config`` is replaced by a function that sets the same local fields without any network call.
2. FedML writes logs, traces and an ``.env`` under ``~/.fedml``: a party points ``HOME`` at its own folder in
   the run's output directory before FedML starts (``isolate_home``).
3. FedML's gRPC receive loop polls ``message_q.qsize() > 0`` without sleeping, pinning a core per idle party:
   the servicer's queue is replaced by one whose ``qsize`` waits for an item (``WaitingQueue``).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import queue
from pathlib import Path

from fedml_pfedseq.config import Recipe

POLL_SECONDS = 0.2  # how long one poll of an empty receive queue waits before FedML's loop checks is_running


class WaitingQueue(queue.Queue):
    """A queue whose ``qsize()`` blocks up to ``POLL_SECONDS`` while empty, turning FedML's spin into a wait."""

    def qsize(self) -> int:
        with self.not_empty:
            if not self._qsize():
                self.not_empty.wait(POLL_SECONDS)
            return self._qsize()


def isolate_home(fedml_home: Path) -> None:
    """Send FedML's ``~/.fedml`` files to ``fedml_home``; the Hugging Face caches keep the user's real home."""
    real_home = Path.home()
    os.environ.setdefault("HF_HOME", str(real_home / ".cache" / "huggingface"))
    fedml_home.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(fedml_home)


def _offline_fetch_config(args, version: str = "release") -> bool:
    """FedML's ``fetch_config`` minus the platform request: only the fields it sets locally."""
    args.os_name = "MacOS" if platform.system() == "Darwin" else platform.system()
    args.version = version
    args.config_version = version
    args.cloud_region = ""
    return False


def patch_fedml() -> None:
    """Install the offline config fetch and the waiting receive queue (idempotent)."""
    import fedml.core.mlops as mlops
    from fedml.core.distributed.communication.grpc.grpc_server import GRPCCOMMServicer

    mlops.fetch_config = _offline_fetch_config
    if getattr(GRPCCOMMServicer, "_pfedseq_patched", False):
        return
    original_init = GRPCCOMMServicer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.message_q = WaitingQueue()

    GRPCCOMMServicer.__init__ = init
    GRPCCOMMServicer._pfedseq_patched = True


def fedml_args(recipe: Recipe, rank: int, role: str, run_id: str) -> argparse.Namespace:
    """FedML's flat ``args`` for one party: every recipe section flattened (as FedML reads its YAML), then the
    fields FedML's horizontal cross-silo flow needs. FedML dispatches on ``federated_optimizer``; its "FedAvg"
    flow is the message protocol, while the recipe's method runs inside our aggregator and trainer."""
    args = argparse.Namespace()
    for section in recipe.to_dict().values():
        for key, value in section.items():
            setattr(args, key, value)
    n = recipe.train_args.client_num_in_total
    vars(args).update(
        method=recipe.train_args.federated_optimizer, federated_optimizer="FedAvg",
        training_type="cross_silo", scenario="horizontal", backend=recipe.comm_args.backend,
        rank=rank, role=role, run_id=run_id, local_rank=0, node_rank=0, comm=None,
        worker_num=n, client_num_in_total=n, client_num_per_round=n, client_id_list=None,
        using_mlops=False, enable_wandb=False, sys_perf_profiling=False, test_on_clients="no",
        grpc_ipconfig_path=str(Path(recipe.comm_args.grpc_ipconfig_path).resolve()),
    )
    return args


def init_fedml(args: argparse.Namespace, log_level: str) -> argparse.Namespace:
    """``fedml.init`` for one party: patched, without its environment report or its stdout takeover."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    patch_fedml()
    import fedml

    return fedml.init(args, check_env=False, should_init_logs=False)
