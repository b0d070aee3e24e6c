"""Partitioners, checked by the statistics of what they produce."""
from pathlib import Path

import numpy as np
import pytest

from fedml_pfedseq.config import RecipeError
from fedml_pfedseq.data.loading import load_image_dataset
from fedml_pfedseq.data.partition import (
    PartitionError,
    partition_by_column,
    partition_dirichlet,
    split_each,
    split_train_val_test,
)


def assert_exact_cover(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n, "clients must cover every row exactly once"


def test_omniglot_drawer_column_gives_20_clients_of_one_drawing_per_character():
    ds = load_image_dataset("omniglot")
    drawers = ds.data.column("drawer").to_numpy()
    parts = partition_by_column(drawers)
    assert len(parts) == 20
    assert_exact_cover(parts, len(ds))
    for part in parts:
        assert len(np.unique(drawers[part])) == 1
        assert len(part) == 1623  # each of the 1,623 characters was drawn once by every drawer


@pytest.mark.shared_data
def test_pacs_domain_column_gives_4_clients_with_the_published_domain_sizes():
    ds = load_image_dataset("pacs")
    parts = partition_by_column(ds.data.column("domain").to_numpy())
    assert [len(p) for p in parts] == [2048, 2344, 1670, 3929]  # art_painting, cartoon, photo, sketch


def _label_shares(labels, parts, num_classes):
    return np.stack([np.bincount(labels[p], minlength=num_classes) / len(p) for p in parts])


def test_dirichlet_small_alpha_skews_labels_and_large_alpha_does_not():
    labels = np.repeat(np.arange(10), 1000)
    skewed = partition_dirichlet(labels, 10, alpha=0.1, seed=0, min_size=10)
    even = partition_dirichlet(labels, 10, alpha=1000.0, seed=0, min_size=10)
    assert_exact_cover(skewed, len(labels))
    assert_exact_cover(even, len(labels))
    # alpha=0.1: a client's largest class dominates; alpha=1000: every class near its global share of 0.1
    assert _label_shares(labels, skewed, 10).max(axis=1).mean() > 0.5
    assert np.abs(_label_shares(labels, even, 10) - 0.1).max() < 0.03


def test_dirichlet_honours_min_size_and_is_seeded():
    labels = np.repeat(np.arange(10), 100)
    a = partition_dirichlet(labels, 10, alpha=0.5, seed=3, min_size=40)
    b = partition_dirichlet(labels, 10, alpha=0.5, seed=3, min_size=40)
    c = partition_dirichlet(labels, 10, alpha=0.5, seed=4, min_size=40)
    assert min(len(p) for p in a) >= 40
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_gives_up_after_bounded_retries_with_a_clear_error():
    labels = np.repeat(np.arange(10), 100)
    with pytest.raises(PartitionError, match="no draw in 5 tries"):
        partition_dirichlet(labels, 20, alpha=0.01, seed=0, min_size=45, max_retries=5)
    with pytest.raises(PartitionError, match="cannot give 20 clients 60 samples"):
        partition_dirichlet(labels, 20, alpha=1.0, seed=0, min_size=60)


def test_split_fractions_are_exact_and_stratified_per_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, size=1000)
    train, val, test = split_train_val_test(labels, (0.7, 0.1, 0.2), seed=0)
    assert_exact_cover([train, val, test], len(labels))
    assert (len(train), len(val), len(test)) == (700, 100, 200)
    counts = np.bincount(labels, minlength=12)
    assert np.all(np.abs(np.bincount(labels[test], minlength=12) - 0.2 * counts) < 1 + 1e-9)
    assert np.all(np.abs(np.bincount(labels[val], minlength=12) - 0.1 * counts) < 1 + 1e-9)


def test_split_with_many_singleton_classes_still_fills_test_and_validation():
    labels = np.arange(100) % 80  # 80 classes, most with a single sample
    train, val, test = split_train_val_test(labels, (0.7, 0.1, 0.2), seed=1)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert_exact_cover([train, val, test], 100)


def test_split_is_seeded():
    labels = np.arange(200) % 7
    a = split_train_val_test(labels, (0.7, 0.1, 0.2), seed=5)
    b = split_train_val_test(labels, (0.7, 0.1, 0.2), seed=5)
    c = split_train_val_test(labels, (0.7, 0.1, 0.2), seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[2], c[2])


@pytest.mark.shared_data
@pytest.mark.slow
def test_cifar10_recipe_data_path_federates_the_test_split_with_dirichlet_skew():
    from transformers import ViTImageProcessor

    from fedml_pfedseq.config import load_recipe
    from fedml_pfedseq.data.federated import build_federated_data

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "cifar10_fedavg.yaml")
    data = build_federated_data(recipe.data_args, ViTImageProcessor(size={"height": 32, "width": 32}),
                                recipe.train_args.client_num_in_total, seed=0)
    sizes = [len(c.train) + len(c.validation) + len(c.test) for c in data.clients]
    assert len(data.clients) == 10 and sum(sizes) == 10_000  # the test split only, every image once
    assert min(sizes) >= recipe.data_args.partition_min_size
    labels = [np.bincount(np.asarray(c.train["labels"]), minlength=10) for c in data.clients]
    assert np.mean([lab.max() / lab.sum() for lab in labels]) > 0.4  # Dirichlet(0.1): one class dominates


def test_recipe_partition_errors_name_the_column_and_the_client_count(tmp_path):
    from transformers import ViTImageProcessor

    from fedml_pfedseq.config import DataArgs, RecipeError
    from fedml_pfedseq.data.federated import build_federated_data

    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    with pytest.raises(RecipeError,
                       match=r"omniglot28.parquet has no column 'writer', which data_args.partition_column names"):
        build_federated_data(DataArgs(partition_column="writer"), processor, None, seed=0)
    with pytest.raises(RecipeError, match="client_num_in_total is 5 but column 'drawer' has 20"):
        build_federated_data(DataArgs(), processor, 5, seed=0)
    with pytest.raises(RecipeError, match="required with partition_method 'dirichlet'"):
        build_federated_data(DataArgs(partition_method="dirichlet"), processor, None, seed=0)


def test_split_each_cuts_every_part_into_seeded_silos_of_equal_size():
    domains = np.repeat(np.arange(4), [20, 31, 9, 40])
    parts = split_each(partition_by_column(domains), 3, seed=0)
    assert len(parts) == 12
    assert_exact_cover(parts, len(domains))
    for client, part in enumerate(parts):
        assert set(domains[part]) == {client // 3}  # value v's j-th silo is client 3 v + j
    assert [len(p) for p in parts] == [7, 7, 6, 11, 10, 10, 3, 3, 3, 14, 13, 13]
    assert all(np.array_equal(a, b) for a, b in zip(parts, split_each(partition_by_column(domains), 3, seed=0)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, split_each(partition_by_column(domains), 3, seed=1)))
    assert all(np.array_equal(a, b) for a, b in zip(split_each(partition_by_column(domains), 1, seed=5),
                                                    partition_by_column(domains)))


@pytest.mark.shared_data
def test_pacs_domains_in_three_silos_each_give_12_clients_in_4_domain_clusters():
    from fedml_pfedseq.config import parse_recipe
    from fedml_pfedseq.data.federated import partition_indices

    ds = load_image_dataset("pacs")
    recipe = parse_recipe({"data_args": {"dataset": "pacs", "partition_column": "domain", "partition_splits": 3}})
    parts = partition_indices(ds, recipe.data_args, "label", 12, seed=0)
    domains = np.asarray(ds.data.column("domain").to_numpy())
    assert_exact_cover(parts, len(ds))
    assert [len(set(domains[p])) for p in parts] == [1] * 12
    assert [sum(len(p) for p in parts[3 * v:3 * v + 3]) for v in range(4)] == [2048, 2344, 1670, 3929]
    with pytest.raises(RecipeError, match="4 distinct values \\(3 client"):
        partition_indices(ds, recipe.data_args, "label", 4, seed=0)
    with pytest.raises(RecipeError, match="partition_splits"):
        parse_recipe({"data_args": {"partition_method": "dirichlet", "partition_splits": 2}})
