"""Shared fixtures: a tiny random ViT saved like a Hub checkpoint, and small recipes built in code."""
from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from fedml_pfedseq import simulation
from fedml_pfedseq.config import Recipe, load_recipe, parse_recipe
from fedml_pfedseq.federation import build_federation

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

TINY_HIDDEN = 32
TINY_LAYERS = 2


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> str:
    """A randomly initialised 2-layer ViT (hidden 32, 32x32 input, patch 8) with its image processor."""
    path = tmp_path_factory.mktemp("tiny_vit")
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=TINY_HIDDEN, num_hidden_layers=TINY_LAYERS,
                       num_attention_heads=2, intermediate_size=64, num_labels=10)
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(path)
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


def pytest_collection_modifyitems(config, items):
    """Tests marked ``shared_data`` read ../shared/data (PACS, CIFAR-10), which only some machines have.

    Where it is missing they are skipped with the reason shown; with PFEDSEQ_REQUIRE_SHARED_DATA=1 (set by
    .ci/run) they run regardless and fail on the missing files.
    """
    import os

    from fedml_pfedseq.data.loading import data_search_path

    if os.environ.get("PFEDSEQ_REQUIRE_SHARED_DATA") == "1":
        return
    if any((d / "pacs112.parquet").is_file() for d in data_search_path()):
        return
    skip = pytest.mark.skip(reason="../shared/data (PACS, CIFAR-10) not found; set PFEDSEQ_DATA_DIR")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)
