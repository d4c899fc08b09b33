"""Tests of fedmnist.methods: named methods over the pure rules, and their one config."""

from __future__ import annotations

import numpy as np
import pytest

from fedmnist.errors import ConfigError
from fedmnist.methods import MethodConfig, build_methods
from fedmnist.strategies import coordinate_median, krum, weighted_average


@pytest.mark.parametrize(("config", "message"), [
    (MethodConfig(()), "at least one"),
    (MethodConfig(("fedavg", "nope")), "unknown method"),
    (MethodConfig(("fedavg", "fedavg")), "twice"),
    (MethodConfig(("fedprox",), mu=0.0), "fedprox needs mu > 0"),
    (MethodConfig(mu=-1.0), "mu"),
    (MethodConfig(trim_beta=0.5), "beta"),
    (MethodConfig(krum_f=-1), "Krum's f"),
])
def test_bad_method_settings_are_refused_once(config, message):
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_methods_say_how_clients_train_and_call_the_pure_rules():
    rng = np.random.default_rng(0)
    results = [([rng.normal(size=(3, 2)).astype(np.float32)], n) for n in (1, 2, 3, 4, 5)]
    methods = {m.name: m for m in build_methods(MethodConfig(("fedavg", "fedprox", "fedmed", "krum"), mu=0.3,
                                                             krum_f=1))}
    assert {n: m.client_mu for n, m in methods.items()} == {"fedavg": 0.0, "fedprox": 0.3, "fedmed": 0.0, "krum": 0.0}
    for name, rule in (("fedavg", weighted_average), ("fedprox", weighted_average), ("fedmed", coordinate_median)):
        new, state = methods[name].aggregate(None, results, {})
        np.testing.assert_array_equal(new[0], rule(results)[0])
        assert state == {}
    np.testing.assert_array_equal(methods["krum"].aggregate(None, results, {})[0][0], krum(results, 1)[0])


def test_every_method_has_a_display_name_for_tables_and_figures():
    from fedmnist.labels import method_name
    from fedmnist.methods import available_methods

    assert all(method_name(m) != m for m in available_methods())
