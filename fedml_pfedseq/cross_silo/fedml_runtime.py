"""FedML 0.9.6 made fit for offline deployments that survive a dead client and trust nothing from the network: its
arguments from a recipe, and five work-arounds.

1. ``fedml.init`` POSTs five times to the hosted platform's config endpoint, even with MLOps off:
   ``fetch_config`` is replaced by a function that sets the same local fields without any network call.
2. FedML writes logs, traces and an ``.env`` under ``~/.fedml``, and the wandb it imports makes temporary
   folders that a killed party never removes: before FedML starts, a party points ``HOME`` and ``TMPDIR`` at its
   own folder in the run's output directory (``isolate_fedml_files``).
3. FedML's gRPC transport unpickles whatever reaches a party's port, listens without TLS, believes the sender a
   message names, spins a core per idle party and sends without a deadline: its ``GRPCCommManager`` is replaced by
   ``SecureGRPCCommManager`` (grpc_transport.py: the wire format of transport.py, mutual TLS, senders checked
   against certificates, a waiting receive loop, sends bounded by ``comm_args.upload_timeout``).
4. FedML's server waits for every client's upload: its server manager is replaced by
   ``RoundDeadlineServerManager`` (server_manager.py: a round deadline, late uploads discarded, dead clients
   skipped).
5. FedML's client counts its rounds itself, so one the server skipped would train on the final payload, and a
   client whose payload was lost would wait for ever: its client manager is replaced by
   ``WaitingReportClientManager`` (client_manager.py: the round taken from the payload, a waiting report to the
   server when nothing follows an upload or a "not sampled" notice).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
from pathlib import Path

from fedml_pfedseq.config import Recipe


def isolate_fedml_files(fedml_home: Path) -> None:
    """Send FedML's ``~/.fedml`` files to ``fedml_home`` and temporary files to ``fedml_home / "tmp"``; the
    Hugging Face caches keep the user's real home."""
    real_home = Path.home()
    os.environ.setdefault("HF_HOME", str(real_home / ".cache" / "huggingface"))
    tmp = fedml_home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"], os.environ["TMPDIR"] = str(fedml_home), str(tmp)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def _offline_fetch_config(args, version: str = "release") -> bool:
    """FedML's ``fetch_config`` minus the platform request: only the fields it sets locally."""
    args.os_name = "MacOS" if platform.system() == "Darwin" else platform.system()
    args.version = version
    args.config_version = version
    args.cloud_region = ""
    return False


def patch_fedml() -> None:
    """Install the work-arounds above (idempotent)."""
    import fedml.core.mlops as mlops
    from fedml.core.distributed.communication.grpc import grpc_comm_manager
    from fedml.cross_silo.client import client_initializer
    from fedml.cross_silo.server import server_initializer

    from fedml_pfedseq.cross_silo.client_manager import WaitingReportClientManager
    from fedml_pfedseq.cross_silo.grpc_transport import SecureGRPCCommManager
    from fedml_pfedseq.cross_silo.server_manager import RoundDeadlineServerManager

    mlops.fetch_config = _offline_fetch_config
    grpc_comm_manager.GRPCCommManager = SecureGRPCCommManager  # FedML imports it from there when it starts gRPC
    server_initializer.FedMLServerManager = RoundDeadlineServerManager
    client_initializer.ClientMasterManager = WaitingReportClientManager


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
