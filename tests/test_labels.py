"""Spanish names of the experiments' categories, and the partition labels' settings."""

from __future__ import annotations

import pytest

from fedmnist.errors import ConfigError
from fedmnist.labels import (
    attack_name,
    method_name,
    optimizer_name,
    partition_name,
    partition_settings,
)


def test_partition_labels_map_to_simulation_settings():
    assert partition_settings("iid") == {"partition": "iid"}
    assert partition_settings("dirichlet_0.3") == {"partition": "dirichlet", "alpha": 0.3}
    assert partition_settings("shards_2") == {"partition": "shards", "shards_per_client": 2}


@pytest.mark.parametrize(
    "label", ["noniid", "iid_2", "dirichlet_", "dirichlet_-1", "shards_0", "shards_x", ""]
)
def test_unknown_partition_labels_are_refused(label):
    with pytest.raises(ConfigError, match="unknown partition label"):
        partition_settings(label)


def test_spanish_names():
    assert partition_name("iid") == "IID"
    assert partition_name("dirichlet_0.1") == "Dirichlet (α = 0.1)"
    assert partition_name("shards_2") == "fragmentos (2 por cliente)"
    assert (attack_name("gaussian"), attack_name("signflip"), attack_name("none")) == (
        "ruido gaussiano",
        "signo invertido",
        "ninguno",
    )
    assert (method_name("bulyan"), method_name("multikrum"), method_name("trimmed")) == (
        "Bulyan",
        "Multi-Krum",
        "Media recortada",
    )
    assert optimizer_name("sgd", 0.05, 0.9) == "SGD, tasa 0.05, momento 0.9"
    assert optimizer_name("sgd", 0.01, 0.0) == "SGD, tasa 0.01, sin momento"
    assert optimizer_name("adam", 1e-3, 0.0) == "Adam, tasa 0.001"
