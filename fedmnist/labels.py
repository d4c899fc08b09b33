"""Spanish names of the experiments' categories (partitions, attacks, local optimisers, methods).

The result files keep short machine names (``iid``, ``dirichlet_0.3``, ``shards_2``, ``gaussian``,
``signflip``); tables and figures show these names instead, so the essay never prints an English label.
"""

from __future__ import annotations

from fedmnist.errors import ConfigError

METHOD_NAMES = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedmed": "FedMed",
    "trimmed": "Media recortada",
    "krum": "Krum",
    "multikrum": "Multi-Krum",
    "bulyan": "Bulyan",
    "fedavgm": "FedAvgM",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
    "scaffold": "SCAFFOLD",
}
ATTACK_NAMES = {
    "none": "ninguno",
    "gaussian": "ruido gaussiano",
    "signflip": "signo invertido",
    "scale": "actualización escalada",
    "labelflip": "etiquetas invertidas",
}


def method_name(method: str) -> str:
    """Display name of an aggregation method (the name itself if unknown)."""
    return METHOD_NAMES.get(method, method)


def partition_settings(label: str) -> dict:
    """Simulation settings of a partition label: ``iid``, ``dirichlet_<α>`` or ``shards_<s>``.

    Raises ConfigError for any other label.
    """
    kind, _, value = label.partition("_")
    try:
        if kind == "iid" and not value:
            return {"partition": "iid"}
        if kind == "dirichlet":
            alpha = float(value)
            if alpha > 0:
                return {"partition": "dirichlet", "alpha": alpha}
        if kind == "shards" and int(value) >= 1:
            return {"partition": "shards", "shards_per_client": int(value)}
    except ValueError:
        pass
    raise ConfigError(f"unknown partition label '{label}': use iid, dirichlet_<alpha> or shards_<number>")


def partition_name(label: str) -> str:
    """Spanish name of a partition label (``shards_2`` → ``fragmentos (2 por cliente)``)."""
    settings = partition_settings(label)
    if settings["partition"] == "iid":
        return "IID"
    if settings["partition"] == "dirichlet":
        return f"Dirichlet (α = {settings['alpha']:g})"
    return f"fragmentos ({settings['shards_per_client']} por cliente)"


def attack_name(attack: str) -> str:
    """Spanish name of an attack (``gaussian`` → ``ruido gaussiano``)."""
    return ATTACK_NAMES.get(attack, attack)


def optimizer_name(optimizer: str, learning_rate: float, momentum: float) -> str:
    """Spanish name of a local optimiser setting (``SGD, tasa 0.05, momento 0.9``)."""
    if optimizer == "adam":
        return f"Adam, tasa {learning_rate:g}"
    if momentum:
        return f"SGD, tasa {learning_rate:g}, momento {momentum:g}"
    return f"SGD, tasa {learning_rate:g}, sin momento"
