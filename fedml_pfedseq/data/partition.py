"""Split one dataset into federated clients, and each client's data into train / validation / test.

Partitioners work on index arrays (numpy) and leave the images alone: each client is ``dataset.select(indices)``,
an index map over the same Arrow table. Every partitioner is seeded and deterministic.
"""
from __future__ import annotations

import numpy as np

from fedml_pfedseq.errors import UserError


class PartitionError(UserError, ValueError):
    """A partition that cannot satisfy its constraints (e.g. the minimum client size)."""


def partition_by_column(values: np.ndarray) -> list[np.ndarray]:
    """One client per distinct value of a column (e.g. Omniglot's ``drawer``, PACS's ``domain``), in sorted order."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    _, starts = np.unique(values[order], return_index=True)
    return [np.sort(chunk) for chunk in np.split(order, starts[1:])]


def split_each(parts: list[np.ndarray], splits: int, seed: int) -> list[np.ndarray]:
    """Each part cut at random into ``splits`` parts of (nearly) equal size, in order: part v's j-th piece is client
    v * splits + j (several silos of one domain). Seeded; every row stays in exactly one piece."""
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    rng = np.random.default_rng(seed)
    return [np.sort(piece) for part in parts for piece in np.array_split(rng.permutation(part), splits)]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Label skew: each class's samples are spread over clients with proportions drawn from Dirichlet(alpha).

    The draw is repeated (at most ``max_retries`` times, each from the same seeded generator) until every client
    holds at least ``min_size`` samples; if no draw does, PartitionError says so instead of looping forever.
    """
    labels = np.asarray(labels)
    if num_clients < 1:
        raise PartitionError(f"num_clients must be >= 1, got {num_clients}")
    if min_size * num_clients > len(labels):
        raise PartitionError(
            f"cannot give {num_clients} clients {min_size} samples each from {len(labels)} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    smallest = 0
    for _ in range(max_retries):
        clients: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, chunk in zip(clients, np.split(members, cuts)):
                client.append(chunk)
        parts = [np.sort(np.concatenate(chunks)) for chunks in clients]
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return parts
    raise PartitionError(
        f"Dirichlet(alpha={alpha}) over {num_clients} clients: no draw in {max_retries} tries gave every client "
        f">= {min_size} samples (smallest in the last try: {smallest}); raise alpha or lower partition_min_size")


def _allocate(counts: np.ndarray, fraction: float, total: int, rng: np.random.Generator) -> np.ndarray:
    """Give each class floor(count * fraction) samples, then hand the ``total - sum`` left over, one each, to the
    classes with the largest remainders (random tie-break), never more than a class has."""
    share = counts * fraction
    taken = np.minimum(np.floor(share).astype(np.int64), counts)
    priority = np.lexsort((rng.random(len(counts)), -(share - taken)))  # largest remainder first
    for c in priority[: max(0, total - int(taken.sum()))]:
        taken[c] += taken[c] < counts[c]
    return taken


def split_train_val_test(
    labels: np.ndarray, fractions: tuple[float, float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split one client's positions 0..n-1 into train / validation / test, stratified by label.

    Split sizes are round(n * fraction) for validation and test (train takes the rest); within them each class
    gets its share up to one sample (largest-remainder allocation), so classes with a single sample still land
    in test or validation at the right overall rate. Returns sorted position arrays that together cover 0..n-1
    exactly once.
    """
    labels = np.asarray(labels)
    _, val_fraction, test_fraction = fractions
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    n = len(labels)
    n_test = int(n * test_fraction + 0.5)  # round half up
    n_val = int(n * val_fraction + 0.5)
    test_counts = _allocate(counts, test_fraction, n_test, rng)
    rest = counts - test_counts
    val_counts = _allocate(rest, val_fraction / max(1e-12, 1 - test_fraction), n_val, rng)
    train, val, test = [], [], []
    for c, n_c_test, n_c_val in zip(classes, test_counts, val_counts):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[:n_c_test])
        val.append(members[n_c_test : n_c_test + n_c_val])
        train.append(members[n_c_test + n_c_val :])
    return tuple(np.sort(np.concatenate(part)).astype(np.int64) for part in (train, val, test))
