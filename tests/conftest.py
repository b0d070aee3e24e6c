"""Shared fixtures: a tiny random ViT saved like a Hub checkpoint, small recipes built in code, the every-method
matrices' reference runs (one per method and session), and one pushed run on a local Hub endpoint per session.

The tiny ViT and the reference runs are built once per session even under pytest-xdist: in a folder every worker
shares (``shared_dir``), by the first worker that asks, under a file lock the others wait on."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from filelock import FileLock
from huggingface_hub import constants
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from fedml_pfedseq import simulation
from fedml_pfedseq.config import Recipe, load_recipe, parse_recipe
from fedml_pfedseq.federation import build_federation
from fedml_pfedseq.strategies import METHODS
from fedml_pfedseq.testing.hub_server import LocalHubServer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

TINY_HIDDEN = 32
TINY_LAYERS = 2


def shared_dir(tmp_path_factory) -> Path:
    """This session's folder shared by its xdist workers (the parent of each worker's own), else its own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> str:
    """A randomly initialised 2-layer ViT (hidden 32, 32x32 input, patch 8) with its image processor, one per
    session (read-only: every worker's recipes name this folder)."""
    path = shared_dir(tmp_path_factory) / "tiny_vit"
    with FileLock(f"{path}.lock"):
        if not (path / "preprocessor_config.json").is_file():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                config = ViTConfig(image_size=32, patch_size=8, hidden_size=TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
                                   num_attention_heads=2, intermediate_size=64, num_labels=10)
                ViTForImageClassification(config).save_pretrained(path)
            ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                              image_std=[0.5] * 3).save_pretrained(path)
    return str(path)


def small_recipe(method: str, model: str, tmp_path, **sections) -> Recipe:
    """An Omniglot recipe on a small slice (embedded data), overridable per section."""
    raw = {
        "common_args": {"random_seed": 0, "output_dir": str(tmp_path / "{recipe}")},
        "data_args": {"dataset": "omniglot", "partition_method": "column", "partition_column": "drawer",
                      "samples_per_client": 40},
        "model_args": {"model": model},
        "train_args": {"federated_optimizer": method, "comm_round": 2, "learning_rate": 0.05},
        "device_args": {"num_threads": 2},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return parse_recipe(raw, where=f"test:{method}")


THREE_CLIENTS = {  # three clients from a Dirichlet split of the embedded Omniglot, one thread: the fast federation
    "data_args": {"partition_method": "dirichlet", "partition_alpha": 0.5, "samples_per_client": 40},
    "train_args": {"client_num_in_total": 3, "comm_round": 3, "learning_rate": 0.5},
    "device_args": {"num_threads": 1, "using_gpu": False},
}


def three_clients(method: str, model: str, tmp_path, **sections) -> Recipe:
    """``small_recipe`` on ``THREE_CLIENTS``; ``sections`` override it key by key. ``method`` is a method's key or
    name; pFedLoRA's clients get ``client_depths: [2, 1]`` (model heterogeneity) unless ``model_args`` says
    otherwise."""
    name = METHODS[method.lower()].name
    merged = {section: dict(values) for section, values in THREE_CLIENTS.items()}
    if name == "pFedLoRA":
        merged["model_args"] = {"client_depths": [2, 1]}
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    return small_recipe(name, model, tmp_path, **merged)


# The every-method matrices (checkpoint resume, FedML wrappers, Ray engine) each compare one method's run against
# the same local run: two of three clients per round, so a client sits rounds out and moves between Ray workers.
MATRIX = {"train_args": {"client_num_per_round": 2}}


@pytest.fixture(scope="session")
def matrix_reference(tiny_vit, tmp_path_factory):
    """``matrix_reference(method)``: (recipe, run folder) of ``method``'s matrix recipe run once per session (by the
    first worker that needs it) on the local engine, its checkpoint kept; the matrices build their runs from a copy
    of that recipe."""
    runs = {}

    def reference(method: str) -> tuple[Recipe, Path]:
        if method not in runs:
            root = shared_dir(tmp_path_factory) / f"reference_{method}"
            recipe = three_clients(method, tiny_vit, root, **MATRIX)
            with FileLock(f"{root}.lock"):  # the first worker to ask runs it; the others read its files
                if not (root / "done").is_file():
                    simulation.run_recipe(recipe, root / "run", progress=False)
                    (root / "done").touch()
            runs[method] = recipe, root / "run"
        recipe, folder = runs[method]
        return parse_recipe(recipe.to_dict(), where=f"matrix:{method}"), folder

    return reference


def as_state(model, params: dict[str, torch.Tensor]) -> dict:
    """The (LoRA, head) state dicts of ``model`` with ``params`` (by parameter name) as its trainable parameters."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in params:
                p.copy_(params[n])
    return {"lora": model.get_lora_state(), "head": model.get_head_state()}


def first_client_with_global_model(recipe):
    """The federation of ``recipe`` and client 0 (28 training samples on the 40-drawing slice) after receiving the
    initial global model: (fed, client, the (LoRA, head) received)."""
    fed = build_federation(recipe)
    client = fed.clients[0]
    payload = fed.server.initial_payloads()[0]
    client.receive(payload)
    assert client.num_samples == 28
    return fed, client, {"lora": payload["lora"], "head": payload["head"]}


def run_shipped_recipe(name: str, tiny_vit: str, tmp_path, out: str = "out", overrides: tuple[str, ...] = ()):
    """Run recipes/omniglot_<name>.yaml for 2 rounds on the tiny ViT, 40 drawings per drawer, 1 thread (plus
    ``overrides``); return the federation it built (client and server state stay inspectable), its summary and its
    metrics.json."""
    recipe = load_recipe(RECIPES / f"omniglot_{name}.yaml", [
        f"model_args.model={tiny_vit}", "data_args.samples_per_client=40", "train_args.comm_round=2",
        f"common_args.output_dir={tmp_path}", "device_args.num_threads=1", "device_args.using_gpu=false",
        *overrides])
    built = []

    def keep(*args, **kwargs):
        built.append(build_federation(*args, **kwargs))
        return built[-1]

    with mock.patch.object(simulation, "build_federation", keep):
        summary = simulation.run_recipe(recipe, tmp_path / out, progress=False)
    return built[0], summary, json.loads((tmp_path / out / "metrics.json").read_text())


def assert_every_client_evaluated(metrics: dict, clients: int = 20, rounds: int = 2) -> None:
    """Each round 0..rounds evaluated every client, with finite validation/test accuracy and loss."""
    rows = metrics["eval"]
    assert [sorted(r["client"] for r in rows if r["round"] == t) for t in range(rounds + 1)] == \
        [list(range(clients))] * (rounds + 1)
    assert all(math.isfinite(r[f"{s}_{k}"]) for r in rows for s in ("validation", "test") for k in ("accuracy", "loss"))


def synthetic_lora(rank: int, hidden: int, layers: int = 2) -> dict[str, torch.Tensor]:
    """A LoRA state with PEFT's names and init (A random from seed 0, B = 0) for synthetic server tests."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.vit.layers.{layer}.attention.{proj}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=g)
            state[f"{prefix}.lora_B.weight"] = torch.zeros(hidden, rank)
    return state


def own_ray_processes(title: str) -> list:
    """This test process's Ray processes titled ``title`` (``ray::run_cell``, ``ray::ClientWorker.visit``): its
    descendants only, so a test that kills one never touches another pytest worker's Ray."""
    import psutil

    me = os.getpid()
    return [p for p in psutil.process_iter(["name"])
            if p.info["name"] == title and me in {parent.pid for parent in p.parents()}]


# --- one pushed run on a local Hub endpoint -------------------------------------------------------------------

REPO = "local-user/omniglot-pfedseq"


def hub_environment(monkeypatch, url: str, cache: Path) -> dict:
    """Point this process's ``huggingface_hub`` (constants are read at import) and child processes at ``url``."""
    env = {"HF_ENDPOINT": url, "HF_TOKEN": "dummy-token", "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return {**os.environ, **env}


@pytest.fixture(scope="session")
def pushed(tiny_vit, tmp_path_factory):
    """One pFedSeq run on the tiny slice (personalized adapters from round 2 on), pushed by its recipe to a local
    endpoint that serves the session's Hub tests."""
    root = tmp_path_factory.mktemp("hub")
    server = LocalHubServer(root / "repos").start()
    with pytest.MonkeyPatch.context() as mp:
        hub_environment(mp, server.url, root / "push-cache")
        fed, summary, metrics = run_shipped_recipe("pfedseq", tiny_vit, root, overrides=(
            "algorithm_args.warmup_rounds=1", "hub_args.push_to_hub=true", f"hub_args.hub_repo_id={REPO}"))
    final = {r["client"]: r for r in metrics["eval"] if r["round"] == 2}
    yield SimpleNamespace(server=server, run_dir=root / "out", fed=fed, summary=summary, final=final, root=root)
    server.stop()


@pytest.fixture
def hub_env(pushed, monkeypatch, tmp_path):
    return hub_environment(monkeypatch, pushed.server.url, tmp_path / "cache")


# fixtures that start real processes, a Ray, or many runs: every test that uses one is marked slow
SLOW_FIXTURES = {"deployed", "attacked", "local_ray", "matrix_reference"}


def pytest_collection_modifyitems(config, items):
    """Tests that use a ``SLOW_FIXTURES`` fixture are marked ``slow`` (``make test-fast`` leaves them out, with the
    tests marked so by hand).


    Tests marked ``shared_data`` read ../shared/data (PACS, CIFAR-10), which only some machines have. Where it is
    missing they are skipped with the reason shown; with PFEDSEQ_REQUIRE_SHARED_DATA=1 (set by .ci/run) they run
    regardless and fail on the missing files.
    """
    import os

    from fedml_pfedseq.data.loading import data_search_path

    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if os.environ.get("PFEDSEQ_REQUIRE_SHARED_DATA") == "1":
        return
    if any((d / "pacs112.parquet").is_file() for d in data_search_path()):
        return
    skip = pytest.mark.skip(reason="../shared/data (PACS, CIFAR-10) not found; set PFEDSEQ_DATA_DIR")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)

