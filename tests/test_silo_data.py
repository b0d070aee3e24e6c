"""Silo data (``data_args.partition_method: silo``): each client's data is its own parquet file, as in a real
cross-silo deployment where a silo's data never leaves its machine. Split into files, the embedded Omniglot gives
exactly the column partition's clients; a client party reads only its own file; bad files are named."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import small_recipe

from fedml_pfedseq.config import RecipeError, parse_recipe
from fedml_pfedseq.data.federated import dataset_label_names
from fedml_pfedseq.data.loading import load_image_dataset
from fedml_pfedseq.data.partition import partition_by_column
from fedml_pfedseq.federation import build_data, build_party_data
from fedml_pfedseq.hub import build_card
from fedml_pfedseq.simulation import run_recipe


@pytest.fixture(scope="module")
def drawer_files(tmp_path_factory) -> tuple[list[str], list[str]]:
    """The embedded Omniglot written as one parquet file per drawer (the column partition's order), and its
    alphabet names."""
    dataset = load_image_dataset("omniglot")
    root = tmp_path_factory.mktemp("silos")
    files = []
    for k, rows in enumerate(partition_by_column(dataset.data.column("drawer").to_numpy())):
        files.append(str(root / f"drawer_{k}.parquet"))
        dataset.select(rows).to_parquet(files[-1])
    return files, list(dataset.features["alphabet"].names)


def silo_recipe(tiny_vit, tmp_path, files: list[str], label_names: list[str], **data_args):
    return small_recipe("FedAvg", tiny_vit, tmp_path, data_args={
        "partition_method": "silo", "partition_column": None, "data_files": files, "label_names": label_names,
        **data_args}, train_args={"client_num_in_total": len(files), "comm_round": 1}, device_args={"num_threads": 1})


def same_client(a, b) -> None:
    for split in ("train", "validation", "test"):
        x, y = getattr(a, split)[:], getattr(b, split)[:]
        assert len(x["labels"]) > 0 and all(torch.equal(x[k], y[k]) for k in ("labels", "pixel_values")), split


@pytest.mark.slow
def test_one_file_per_drawer_gives_the_column_partitions_clients(drawer_files, tiny_vit, tmp_path):
    files, names = drawer_files
    column = build_data(small_recipe("FedAvg", tiny_vit, tmp_path))  # drawers, 40 drawings each
    silo = build_data(silo_recipe(tiny_vit, tmp_path, files, names))
    assert silo.label_names == column.label_names and len(silo.clients) == len(column.clients) == 20
    for a, b in zip(silo.clients, column.clients):
        same_client(a, b)


def test_a_client_party_reads_only_its_own_file_and_the_server_none(drawer_files, tiny_vit, tmp_path):
    files, names = drawer_files
    expected = build_data(silo_recipe(tiny_vit, tmp_path, files, names)).clients[3]
    here = [str(tmp_path / f"silo_{k}.parquet") for k in range(len(files))]  # only client 3's file is on this machine
    shutil.copyfile(files[3], here[3])
    recipe = silo_recipe(tiny_vit, tmp_path, here, names)
    own, label_names = build_party_data(recipe, 3)
    same_client(own, expected)
    assert label_names == names == dataset_label_names(recipe.data_args)  # the server reads no file at all
    with pytest.raises(FileNotFoundError, match=r"data_args.data_files\[0\]: client 0's data .*silo_0.parquet"):
        build_party_data(recipe, 0)
    with pytest.raises(RecipeError, match="has 20 clients; there is no client 20"):
        build_party_data(recipe, 20)


def test_a_federation_of_three_silos_runs_and_its_card_says_where_the_data_is(drawer_files, tiny_vit, tmp_path):
    files, names = drawer_files
    summary = run_recipe(silo_recipe(tiny_vit, tmp_path, files[:3], names), tmp_path / "run", progress=False)
    assert summary["clients"] == 3 and 0 <= summary["final_test_accuracy_mean"] <= 1
    card = build_card(tmp_path / "run", "local-user/silos", backbone_pushed=True)
    assert "each client's own data, kept on its silo" in card.text and "Dirichlet" not in card.text


def test_a_silo_file_with_labels_outside_the_label_space_or_no_label_column_is_named(drawer_files, tiny_vit,
                                                                                      tmp_path):
    files, names = drawer_files
    with pytest.raises(RecipeError, match=r"data_files\[0\]: .*drawer_0.parquet's 'alphabet' must hold integer "
                                          r"labels in \[0, 5\)"):
        build_data(silo_recipe(tiny_vit, tmp_path, files[:2], names[:5]))  # every drawer drew all 50 alphabets
    with pytest.raises(RecipeError, match=r"data_files\[0\]: .*lacks column\(s\) \['kind'\]"):
        build_data(silo_recipe(tiny_vit, tmp_path, files[:2], names, label_column="kind"))


@pytest.mark.parametrize("data_args, train_args, message", [
    ({"partition_method": "silo", "label_names": ["a"]}, {}, "data_args.data_files must list one parquet file"),
    ({"partition_method": "silo", "data_files": ["a.parquet"]}, {}, "data_args.label_names must list"),
    ({"partition_method": "silo", "data_files": ["a.parquet"], "label_names": ["a", "a"]}, {},
     "data_args.label_names must list the distinct"),
    ({"partition_method": "silo", "data_files": ["a.parquet", "b.parquet"], "label_names": ["a"]},
     {"client_num_in_total": 3}, "train_args.client_num_in_total is 3 but data_args.data_files lists 2 silos"),
    ({"data_files": ["a.parquet"]}, {}, "data_args.data_files is only read with partition_method 'silo'"),
    ({"partition_method": "silo", "data_files": ["a.parquet"], "label_names": ["a"], "hub_id": "x/y"}, {},
     "data_args.hub_id cannot be combined"),
])
def test_bad_silo_recipes_are_refused_naming_the_key(data_args, train_args, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"data_args": data_args, "train_args": train_args})
