"""Cluster shifts (``data_args.cluster_transforms``): client i's images pass through the (i mod K)-th transform, in
every split, before the backbone's processor; the saved adapters, the card and the recipe check say so."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import small_recipe
from PIL import Image

from fedml_pfedseq.config import RecipeError
from fedml_pfedseq.data.transforms import CLUSTER_TRANSFORMS, cluster_transform
from fedml_pfedseq.federation import build_data
from fedml_pfedseq.hub import build_card
from fedml_pfedseq.simulation import run_recipe

SHIFTS = ["identity", "rot90", "rot180", "invert"]


def test_each_transform_moves_pixels_as_its_name_says():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # H=2, W=3: a non-square image
    image = Image.fromarray(pixels, "RGB")
    expected = {"identity": pixels, "rot90": np.rot90(pixels, 1), "rot180": np.rot90(pixels, 2),
                "rot270": np.rot90(pixels, 3), "hflip": pixels[:, ::-1], "vflip": pixels[::-1], "invert": 255 - pixels}
    assert set(expected) == set(CLUSTER_TRANSFORMS)
    for name, want in expected.items():
        assert np.array_equal(np.asarray(CLUSTER_TRANSFORMS[name](image)), want), name


def test_clients_take_the_transforms_round_robin():
    assert [cluster_transform(SHIFTS, i) for i in range(6)] == SHIFTS + SHIFTS[:2]
    assert cluster_transform(None, 5) == "identity"


def test_each_clients_pixels_are_its_clusters_transform_of_the_unshifted_ones(tiny_vit, tmp_path):
    plain = build_data(small_recipe("FedAvg", tiny_vit, tmp_path))
    shifted = build_data(small_recipe("FedAvg", tiny_vit, tmp_path, data_args={"cluster_transforms": SHIFTS}))
    assert [c.shift for c in shifted.clients[:5]] == SHIFTS + ["identity"]
    as_image = {  # the processor's normalisation (mean 0.5, std 0.5) is per pixel, so it commutes with these
        "identity": lambda x: x, "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
        "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)), "invert": lambda x: -x}
    for k in range(len(SHIFTS) + 1):
        a, b = plain.clients[k], shifted.clients[k]
        assert a.rows == b.rows  # the shift moves pixels, never which rows a client holds
        for split in ("train", "validation", "test"):
            x, y = getattr(a, split)[:], getattr(b, split)[:]
            assert torch.equal(x["labels"], y["labels"])
            want = as_image[SHIFTS[k % len(SHIFTS)]](x["pixel_values"])
            assert torch.allclose(y["pixel_values"], want, atol=1e-5), (k, split)
    assert not torch.allclose(plain.clients[1].test[:]["pixel_values"], shifted.clients[1].test[:]["pixel_values"])


@pytest.mark.parametrize("names, message", [
    (["identity", "rotate"], r"data_args.cluster_transforms must be null or a non-empty list of .*"
                             r"unknown: \['rotate'\]"),
    ([], "data_args.cluster_transforms must be null or a non-empty list"),
])
def test_unknown_or_empty_transform_lists_are_refused_naming_the_key(tiny_vit, tmp_path, names, message):
    with pytest.raises(RecipeError, match=message):
        small_recipe("FedAvg", tiny_vit, tmp_path, data_args={"cluster_transforms": names})


@pytest.mark.slow
def test_saved_adapters_and_the_card_name_each_clients_transform(tiny_vit, tmp_path):
    recipe = small_recipe("FedAvgLocalHead", tiny_vit, tmp_path, data_args={"cluster_transforms": SHIFTS},
                          train_args={"client_num_in_total": 20, "comm_round": 1}, device_args={"num_threads": 1})
    run_recipe(recipe, tmp_path / "run", progress=False)
    manifest = json.loads((tmp_path / "run" / "adapters" / "manifest.json").read_text())
    assert [c["shift"] for c in manifest["clients"][:5]] == SHIFTS + ["identity"]
    splits = json.loads((tmp_path / "run" / "adapters" / "client_2" / "splits.json").read_text())
    assert splits["shift"] == "rot180"
    card = build_card(tmp_path / "run", "local-user/shifted", backbone_pushed=True).text
    assert "transform k mod 4 (counting from 0) of identity, rot90, rot180, invert" in card
    assert "| image transform |" in card
    assert re.search(r"^\| 1 +\| 2 +\| rot90 +\|", card, re.M)  # client 1, drawer 2, its transform


def test_the_cluster_oracle_needs_clusters(tiny_vit, tmp_path):
    with pytest.raises(RecipeError, match="oracle_clusters needs data_args.cluster_transforms"):
        small_recipe("FedAvgLocalHead", tiny_vit, tmp_path, algorithm_args={"oracle_clusters": True})
    recipe = small_recipe("FedAvgLocalHead", tiny_vit, tmp_path, algorithm_args={"oracle_clusters": True},
                          data_args={"cluster_transforms": ["identity", "rot180"]})
    assert recipe.algorithm_args.oracle_clusters
