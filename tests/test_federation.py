"""Tests for fedmnist.federation: every client's label counts, on a tiny hand-made pool."""

from __future__ import annotations

import numpy as np
import pytest

from fedmnist.data import Mnist
from fedmnist.federation import FederationConfig, prepare_federation


def tiny_pool() -> Mnist:
    """40 training images, four of each digit, and 10 test images (random pixels)."""
    rng = np.random.default_rng(0)
    y_train = np.repeat(np.arange(10, dtype=np.uint8), 4)
    return Mnist(rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), y_train,
                 rng.integers(0, 256, (10, 28, 28), dtype=np.uint8), np.arange(10, dtype=np.uint8))


@pytest.mark.parametrize("partition", ["iid", "shards", "dirichlet"])
def test_label_counts_are_each_clients_labels(partition):
    # Prepare
    config = FederationConfig(num_clients=4, partition=partition, alpha=0.5, shards_per_client=2)

    # Execute
    fed = prepare_federation(config, seed=3, mnist=tiny_pool())

    # Assert: one row per client, its own labels, together the whole pool
    counts = fed.label_counts
    assert counts.shape == (4, 10)
    for client in range(1, 5):
        assert counts[client - 1].tolist() == np.bincount(fed.client_data(client)[1], minlength=10).tolist()
    assert counts.sum(axis=0).tolist() == [4] * 10
    assert counts.sum(axis=1).tolist() == fed.client_sizes


def test_label_counts_of_an_iid_split_are_even():
    fed = prepare_federation(FederationConfig(num_clients=2, partition="iid"), seed=1, mnist=tiny_pool())

    assert fed.label_counts.tolist() == [[2] * 10, [2] * 10]
