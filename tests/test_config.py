"""Tests for fedmnist.config.check_int: the one integer check of counts, seeds, indices and sizes."""

from __future__ import annotations

import numpy as np
import pytest

from fedmnist.config import check_int
from fedmnist.errors import ConfigError


def test_check_int_returns_the_value_as_a_plain_int():
    assert check_int(3, "rounds", 1) == 3
    assert check_int(0, "seed") == 0
    assert check_int(5, "m", 1, 5) == 5
    value = check_int(np.int64(4), "num_sampled", 1, numpy=True)
    assert value == 4 and type(value) is int


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (True, {}, "rounds must be an integer >= 0 (got True)"),
        (2.0, {}, "rounds must be an integer >= 0 (got 2.0)"),
        ("3", {}, "rounds must be an integer >= 0 (got '3')"),
        (None, {}, "rounds must be an integer >= 0 (got None)"),
        (0, {"minimum": 1}, "rounds must be an integer >= 1 (got 0)"),
        (6, {"minimum": 1, "maximum": 5}, "rounds must be an integer in [1, 5] (got 6)"),
        (np.int64(3), {}, "rounds must be an integer >= 0 (got np.int64(3))"),
        (np.bool_(True), {"numpy": True}, "rounds must be an integer >= 0 (got np.True_)"),
    ],
    ids=["bool", "float", "string", "none", "below", "above", "numpy-not-allowed", "numpy-bool"],
)
def test_check_int_refuses_with_one_message(value, bounds, message):
    with pytest.raises(ConfigError) as excinfo:
        check_int(value, "rounds", **bounds)

    assert str(excinfo.value) == message


def test_check_int_raises_the_callers_error():
    class Refused(ValueError):
        pass

    with pytest.raises(Refused, match="client id must be an integer >= 1"):
        check_int(0, "client id", 1, error=Refused)
