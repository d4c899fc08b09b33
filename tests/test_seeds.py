"""Tests of fedmnist.seeds: one formula per purpose, and the sampling rule of every mode."""

from __future__ import annotations

import pytest

from fedmnist.seeds import clients_per_round, sample_positions, training_seed, validation_seed


@pytest.mark.parametrize(("n", "fraction", "expected"), [(100, 0.1, 10), (7, 0.3, 2), (3, 0.5, 1), (10, 0.01, 1),
                                                         (4, 1.0, 4), (10, 0.3, 3)])
def test_clients_per_round_is_the_floor_with_at_least_one(n, fraction, expected):
    assert clients_per_round(n, fraction) == expected


def test_sampling_depends_on_seed_and_round_only():
    first = sample_positions(100, 0.1, 3, 1)
    assert first == sorted(first) and len(set(first)) == 10 and all(0 <= p < 100 for p in first)
    assert first == sample_positions(100, 0.1, 3, 1)
    assert first != sample_positions(100, 0.1, 3, 2) and first != sample_positions(100, 0.1, 4, 1)


def test_seeds_differ_by_purpose_round_and_client():
    seeds = {training_seed(5, r, k) for r in (1, 2) for k in (1, 2, 3)} | {validation_seed(5, k) for k in (1, 2, 3)}
    assert len(seeds) == 9 and all(0 <= s < 2**31 for s in seeds)
    assert training_seed(5, 2, 3) == training_seed(5, 2, 3)
