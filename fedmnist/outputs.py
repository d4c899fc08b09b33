"""The one output writer of every mode: NaN-safe JSON, per-round metrics, plots, models and summaries.

File names are shared by the simulation and Flower (``metricas_por_ronda.csv``/``.json``,
``precision_por_ronda.png``, ``modelo_global_<method>.h5``, ``pesos_globales_<method>.pkl``,
``resumen.json``, ``configuracion.json``); the file flow adds its own comparison files in
``fedmnist.aggregation``. The writers stage their files in a ``fedmnist.io.OutputSet``, so the files
of one step (a round's metrics and checkpoint, a run's final models and summary) appear together or
not at all.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from fedmnist import __version__
from fedmnist.io import OutputSet, atomic_write_text
from fedmnist.server import RoundRecord

CONFIG_FILE = "configuracion.json"
METRICS_CSV = "metricas_por_ronda.csv"
METRICS_JSON = "metricas_por_ronda.json"
ACCURACY_PLOT = "precision_por_ronda.png"
SUMMARY_FILE = "resumen.json"
CSV_COLUMNS = [f.name for f in fields(RoundRecord)]


def json_safe(value):
    """``value`` with numpy scalars/arrays as builtins and NaN/±inf as None (JSON has no NaN)."""
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def json_text(payload) -> str:
    """``payload`` as indented JSON text without NaN or Infinity (they become null)."""
    return json.dumps(json_safe(payload), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def dump_json(path: str | Path, payload) -> None:
    """Write ``payload`` as indented UTF-8 JSON, atomically, never writing NaN or Infinity."""
    atomic_write_text(path, json_text(payload))


def software() -> dict:
    """Versions that produced a result."""
    return {"fedmnist": __version__, "numpy": np.__version__, "python": platform.python_version()}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return str(value)


def write_metrics(out: OutputSet, history: Sequence[RoundRecord], extra: Mapping | None = None) -> None:
    """Stage ``metricas_por_ronda.csv`` and ``.json``: one row per (round, method)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        values = asdict(row)
        for key in ("sampled_clients", "replied_clients", "malicious_sampled", "sampled_nodes"):
            values[key] = " ".join(map(str, values[key]))
        for key in ("failed", "notes"):
            values[key] = " | ".join(values[key])
        writer.writerow({k: _cell(v) for k, v in values.items()})
    out.write_text(METRICS_CSV, buffer.getvalue())
    methods = list(dict.fromkeys(r.method for r in history))
    out.write_text(METRICS_JSON, json_text({"methods": methods, **(extra or {}),
                                            "rounds": [asdict(r) for r in history]}))


def joined_curves(curves: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """Fill rounds that were not evaluated (``eval_every > 1``) by joining the evaluated ones.

    ``plot_accuracy_per_round`` plots ``values[i]`` at round ``i + 1``; NaN gaps would leave isolated
    points (invisible once markers are off, beyond 30 rounds).
    """
    joined = {}
    for method, curve in curves.items():
        values = np.asarray(curve, dtype=np.float64)
        known = np.flatnonzero(np.isfinite(values))
        if known.size < 2:
            joined[method] = values.tolist()
            continue
        joined[method] = np.interp(np.arange(values.size), known, values[known], left=np.nan,
                                   right=np.nan).tolist()
    return joined


def accuracy_curves(history: Sequence[RoundRecord]) -> dict[str, list[float]]:
    """Test accuracy per round for every method (NaN where not evaluated)."""
    curves: dict[str, list[float]] = {}
    for row in history:
        curves.setdefault(row.method, []).append(np.nan if row.test_accuracy is None else row.test_accuracy)
    return curves


def write_accuracy_plot(out: OutputSet, history: Sequence[RoundRecord], title: str,
                        target: float | None = None) -> Path:
    """Stage ``precision_por_ronda.png`` from the recorded rounds."""
    from fedmnist.plots import plot_accuracy_per_round

    with out.temp_path(ACCURACY_PLOT) as tmp:
        plot_accuracy_per_round(joined_curves(accuracy_curves(history)), tmp, title=title, target=target)
    return out.path(ACCURACY_PLOT)


def write_global(out: OutputSet, name: str, weights: list[np.ndarray], round_: int, method: str,
                 seed: int | None) -> dict[str, Path]:
    """Stage a global model as ``modelo_global_<method>.h5`` and ``<name>.pkl`` (the safe exchange format)."""
    from fedmnist.exchange import make_global, save_global
    from fedmnist.model import save_keras_model

    with out.temp_path(f"modelo_global_{method}.h5") as tmp:
        save_keras_model(weights, tmp)
    with out.temp_path(f"{name}.pkl") as tmp:
        save_global(tmp, make_global(weights, round_, method, seed))
    return {f"model_{method}": out.path(f"modelo_global_{method}.h5"), f"weights_{method}": out.path(f"{name}.pkl")}


def method_summary(rows: Sequence[RoundRecord], target: float | None) -> dict:
    """Final, best and rounds-to-target figures of one method's records."""
    from fedmnist.server import rounds_to_target

    accuracies = [r.test_accuracy for r in rows if r.test_accuracy is not None]
    final = next((r for r in reversed(rows) if r.test_accuracy is not None), None)
    return {
        "final_accuracy": final.test_accuracy if final else None,
        "final_loss": final.test_loss if final else None,
        "best_accuracy": max(accuracies) if accuracies else None,
        "rounds_to_target": rounds_to_target(rows, target) if target is not None else None,
        "rounds_run": rows[-1].round if rows else 0,
        "failed_replies": sum(len(r.failed) for r in rows),
        "epsilon": rows[-1].epsilon if rows else None,
        "delta": rows[-1].delta if rows else None,
        "seconds": sum(r.seconds for r in rows),
    }
