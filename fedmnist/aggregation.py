"""The server's job: check the members' updates, aggregate them with each rule, compare, write the next round.

Used by ``global_aggregation.py`` / ``fedmnist aggregate`` and by ``fedmnist demo``. Every check runs
before any arithmetic and every output is computed before the first file is written, so a bad update
leaves the output directory untouched.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedmnist.config import DEFAULT_METHODS
from fedmnist.data import common_test_file, load_partition
from fedmnist.errors import DataError, ValidationError
from fedmnist.evaluation import EvalResult, evaluate, intervals_overlap
from fedmnist.exchange import (
    ClientUpdate,
    GlobalWeights,
    find_updates,
    global_path,
    load_update,
    make_global,
    save_global,
)
from fedmnist.io import atomic_write_text
from fedmnist.model import model_fingerprint, save_keras_model, weights_mismatch
from fedmnist.partition import read_manifest
from fedmnist.plots import method_label, plot_confusion_matrix, plot_method_comparison
from fedmnist.strategies import AGGREGATORS, aggregate
from fedmnist.training import ClientTrainer

log = logging.getLogger(__name__)

RESULTS_JSON = "resultados_agregacion.json"
RESULTS_CSV = "resultados_agregacion.csv"
COMPARISON_PLOT = "comparacion_metodos.png"


@dataclass(frozen=True)
class AggregationParams:
    """Parameters of the robust rules."""

    trim_beta: float = 0.2
    num_malicious: int = 1
    num_to_keep: int | None = None


@dataclass
class MethodResult:
    """One aggregation rule's global model and its evaluation."""

    method: str
    weights: list[np.ndarray]
    evaluation: EvalResult
    clients: list[int]
    mu_values: dict[int, float]
    sha256: str = ""
    train_examples: int = 0


@dataclass
class AggregationReport:
    """Everything the server computed for one round."""

    round: int
    start_sha256: str | None
    methods: dict[str, MethodResult]
    locals_: list[tuple[ClientUpdate, EvalResult]]
    best: str
    runner_up: str | None
    best_resolved: bool
    next_from: str
    notes: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def load_updates(weights_dir: str | Path) -> list[ClientUpdate]:
    """Safely read every ``pesos_cliente_*.pkl`` in ``weights_dir``."""
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise ValidationError(f"{weights_dir}: weights directory not found")
    paths = find_updates(weights_dir)
    if not paths:
        raise ValidationError(f"{weights_dir}: no pesos_cliente_N.pkl files to aggregate")
    return [load_update(p) for p in paths]


def fill_missing_counts(updates: list[ClientUpdate], data_dir: str | Path | None) -> list[str]:
    """Give bare updates (no sample count) the count from the federation manifest, else equal weights."""
    notes = []
    missing = [u for u in updates if u.num_examples is None]
    if not missing:
        return notes
    manifest = read_manifest(data_dir) if data_dir else None
    counts = {c["client_id"]: c["num_examples"] for c in (manifest or {}).get("clients", [])}
    for update in missing:
        if update.client_id in counts:
            update.num_examples = int(counts[update.client_id])
            notes.append(f"{update.path}: sample count taken from particion.json ({update.num_examples})")
        else:
            update.num_examples = 1
            notes.append(f"{update.path}: sample count unknown; weighted as 1 (equal weights)")
    for note in notes:
        log.warning(note)
    return notes


def _label(update: ClientUpdate) -> str:
    """How messages name an update: its file, or its client id when it was never a file."""
    return str(update.path) if update.path is not None else f"client {update.client_id}"


def validate_updates(updates: list[ClientUpdate], expected_round: int | None = None) -> list[str]:
    """Refuse sets of updates that cannot be aggregated; return warnings for what can only be trusted.

    Raises:
        ValidationError: naming the file and the reason (model mismatch, shapes, non-finite values,
            duplicate clients, mixed rounds, mixed starting points).
    """
    notes: list[str] = []
    fingerprint = model_fingerprint()
    seen: dict[int, str] = {}
    for u in updates:
        if u.fingerprint is not None and u.fingerprint != fingerprint:
            raise ValidationError(
                f"{_label(u)}: made for model fingerprint {u.fingerprint}, but this model's is {fingerprint}"
            )
        problem = weights_mismatch(u.weights)
        if problem:
            raise ValidationError(f"{_label(u)}: {problem}")
        for i, array in enumerate(u.weights):
            if not np.all(np.isfinite(array)):
                raise ValidationError(f"{_label(u)}: weight {i} holds NaN or infinite values")
        if u.client_id in seen:
            raise ValidationError(
                f"{_label(u)}: client id {u.client_id} appears twice (also in {seen[u.client_id]})"
            )
        seen[u.client_id] = _label(u)
    rounds = Counter(u.round for u in updates if not u.bare)
    if len(rounds) > 1:
        detail = ", ".join(f"{_label(p)}: round {p.round}" for p in updates if not p.bare)
        raise ValidationError(f"updates from different rounds cannot be aggregated together ({detail})")
    if expected_round is not None and rounds and expected_round not in rounds:
        first = next(u for u in updates if not u.bare)
        raise ValidationError(f"{_label(first)}: trained in round {first.round}, but round {expected_round} was requested")
    starts = {u.start_sha256 for u in updates if u.start_sha256}
    if len(starts) > 1:
        groups: dict[str, list[str]] = {}
        for u in updates:
            if u.start_sha256:
                groups.setdefault(u.start_sha256[:12], []).append(u.path.name if u.path else f"client {u.client_id}")
        detail = "; ".join(f"{h}: {', '.join(names)}" for h, names in groups.items())
        raise ValidationError(
            "the updates started from different global weights "
            f"({detail}). Averaging networks trained from different starting points gives "
            "chance-level accuracy (about 10% on MNIST), because their hidden units are not aligned: "
            "every member must train from the same pesos_globales_ronda_R.pkl"
        )
    for u in updates:
        if u.bare:
            notes.append(f"{_label(u)}: bare list of weights: its round and starting point cannot be verified")
    return notes


def _round_of(updates: list[ClientUpdate]) -> int:
    rounds = [u.round for u in updates if not u.bare]
    return rounds[0] if rounds else 0


def _start_of(updates: list[ClientUpdate]) -> str | None:
    return next((u.start_sha256 for u in updates if u.start_sha256), None)


def aggregate_updates(method: str, updates: list[ClientUpdate], params: AggregationParams) -> list[np.ndarray]:
    """Apply rule ``method`` from the registry to the updates' (weights, num_examples)."""
    results = [(u.weights, int(u.num_examples or 1)) for u in updates]
    return aggregate(method, results, trim_beta=params.trim_beta, num_malicious=params.num_malicious,
                     num_to_keep=params.num_to_keep)


def run_aggregation(
    updates: list[ClientUpdate],
    x_test: np.ndarray,
    y_test: np.ndarray,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    params: AggregationParams = AggregationParams(),
    prox_updates: list[ClientUpdate] | None = None,
    next_from: str | None = None,
    evaluator: ClientTrainer | None = None,
    evaluate_locals: bool = True,
) -> AggregationReport:
    """Aggregate, evaluate every global model (and each local one), and pick the best method.

    ``prox_updates``, when given, are the same federation's updates trained with μ > 0; FedProx
    aggregates those (its server step is the weighted average), the other rules aggregate ``updates``.
    """
    unknown = [m for m in methods if m not in AGGREGATORS]
    if unknown:
        raise ValidationError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(AGGREGATORS)}")
    if not methods:
        raise ValidationError("no aggregation method requested")
    if next_from is not None and next_from not in methods:
        raise ValidationError(f"--next-from {next_from} is not among the methods run ({', '.join(methods)})")
    notes = validate_updates(updates)
    round_, start = _round_of(updates), _start_of(updates)
    if prox_updates is not None:
        notes += validate_updates(prox_updates, expected_round=round_)
        prox_start = _start_of(prox_updates)
        if start and prox_start and prox_start != start:
            raise ValidationError(
                "the FedProx updates started from other global weights than the main updates "
                f"({prox_start[:12]} vs {start[:12]}); both must start from the same round file"
            )
    evaluator = evaluator or ClientTrainer()
    results: dict[str, MethodResult] = {}
    for method in methods:
        source = prox_updates if (method == "fedprox" and prox_updates is not None) else updates
        weights = aggregate_updates(method, source, params)
        mus = {u.client_id: u.mu for u in source}
        if method == "fedprox":
            if all(mu == 0 for mu in mus.values()):
                notes.append("FedProx: no update was trained with mu > 0, so for this set FedProx equals "
                             "FedAvg (its server step is the same weighted average)")
            else:
                notes.append("FedProx: clients trained with mu = "
                             + ", ".join(f"{cid}: {mu:g}" for cid, mu in sorted(mus.items())))
        evaluation = evaluate(evaluator, weights, x_test, y_test)
        gw = make_global(weights, round_ + 1, method)
        results[method] = MethodResult(method, gw.weights, evaluation, sorted(mus), mus, gw.sha256,
                                       sum(int(u.num_examples or 1) for u in source))
    locals_ = []
    if evaluate_locals:
        locals_ = [(u, evaluate(evaluator, u.weights, x_test, y_test)) for u in updates]

    ranking = sorted(results.values(), key=lambda r: (-r.evaluation.accuracy, r.evaluation.loss))
    best = ranking[0]
    runner_up = ranking[1] if len(ranking) > 1 else None
    resolved = runner_up is None or not intervals_overlap(best.evaluation, runner_up.evaluation)
    if runner_up is not None and not resolved:
        notes.append(
            f"{method_label(best.method)} is best, but {method_label(runner_up.method)}'s accuracy lies "
            "within its 95% interval: the difference is not statistically resolved on this test set"
        )
    return AggregationReport(
        round=round_, start_sha256=start, methods=results, locals_=locals_, best=best.method,
        runner_up=runner_up.method if runner_up else None, best_resolved=resolved,
        next_from=next_from or best.method, notes=notes,
    )


def report_to_dict(report: AggregationReport) -> dict:
    """JSON-ready summary of an aggregation round."""
    def metrics(e: EvalResult) -> dict:
        return {"accuracy": e.accuracy, "ci_low": e.ci_low, "ci_high": e.ci_high, "loss": e.loss,
                "num_examples": e.num_examples, "per_class_accuracy": e.per_class_accuracy}

    return {
        "round": report.round,
        "next_round": report.round + 1,
        "start_sha256": report.start_sha256,
        "model_fingerprint": model_fingerprint(),
        "methods": {
            name: {**metrics(r.evaluation), "clients": r.clients,
                   "mu": {str(k): v for k, v in r.mu_values.items()}, "sha256": r.sha256,
                   "model_file": f"modelo_global_{name}.h5"}
            for name, r in report.methods.items()
        },
        "locals": [
            {"client_id": u.client_id, "mu": u.mu, **metrics(e), "train_examples": u.num_examples}
            for u, e in report.locals_
        ],
        "best": report.best,
        "runner_up": report.runner_up,
        "best_resolved": report.best_resolved,
        "next_from": report.next_from,
        "notes": report.notes,
    }


def _csv_text(report: AggregationReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["kind", "name", "accuracy", "ci_low", "ci_high", "loss", "train_examples"])
    for name, r in report.methods.items():
        e = r.evaluation
        writer.writerow(["global", name, f"{e.accuracy:.6f}", f"{e.ci_low:.6f}", f"{e.ci_high:.6f}",
                         f"{e.loss:.6f}", r.train_examples])
    for u, e in report.locals_:
        writer.writerow(["local", f"cliente_{u.client_id}", f"{e.accuracy:.6f}", f"{e.ci_low:.6f}",
                         f"{e.ci_high:.6f}", f"{e.loss:.6f}", u.num_examples])
    return buffer.getvalue()


def format_table(report: AggregationReport) -> str:
    """The printed comparison table, naming the best method."""
    lines = [f"{'model':<16} {'accuracy':>9} {'95% CI':>17} {'loss':>8}"]
    for name, r in report.methods.items():
        e = r.evaluation
        lines.append(f"{method_label(name):<16} {e.accuracy:>9.4f} {e.ci_low:>8.4f}-{e.ci_high:<8.4f} {e.loss:>8.4f}")
    for u, e in report.locals_:
        label = f"local {u.client_id}" + (f" (mu={u.mu:g})" if u.mu else "")
        lines.append(f"{label:<16} {e.accuracy:>9.4f} {e.ci_low:>8.4f}-{e.ci_high:<8.4f} {e.loss:>8.4f}")
    verdict = f"best method: {method_label(report.best)}"
    if report.runner_up and not report.best_resolved:
        verdict += f" (within the 95% interval of {method_label(report.runner_up)}: not a resolved difference)"
    lines.append(verdict)
    return "\n".join(lines)


def write_outputs(report: AggregationReport, out_dir: str | Path, seed: int | None = None) -> dict[str, Path]:
    """Write models, plots, result tables and the next round's global weights, each atomically."""
    out_dir = Path(out_dir)
    files: dict[str, Path] = {}
    for name, r in report.methods.items():
        files[f"model_{name}"] = out_dir / f"modelo_global_{name}.h5"
        save_keras_model(r.weights, files[f"model_{name}"])
        files[f"confusion_{name}"] = plot_confusion_matrix(
            r.evaluation.confusion, out_dir / f"matriz_confusion_{name}.png",
            title=f"{method_label(name)} — ronda {report.round} (precisión {r.evaluation.accuracy:.2%})",
        )
    files["comparison"] = plot_method_comparison(
        [(method_label(n), r.evaluation.accuracy, r.evaluation.ci_low, r.evaluation.ci_high)
         for n, r in report.methods.items()],
        [(f"local {u.client_id}", e.accuracy, e.ci_low, e.ci_high) for u, e in report.locals_],
        out_dir / COMPARISON_PLOT,
        title=f"Ronda {report.round}: modelos globales frente a modelos locales (IC 95%)",
    )
    nxt = report.methods[report.next_from]
    files["next_round"] = global_path(out_dir, report.round + 1)
    save_global(files["next_round"], GlobalWeights(report.round + 1, nxt.weights, nxt.sha256,
                                                   model_fingerprint(), seed, report.next_from))
    files["csv"] = out_dir / RESULTS_CSV
    atomic_write_text(files["csv"], _csv_text(report))
    files["json"] = out_dir / RESULTS_JSON
    summary = report_to_dict(report)
    summary["files"] = {k: p.name for k, p in files.items()}
    atomic_write_text(files["json"], json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    report.files = files
    return files


def aggregate_directory(
    weights_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    params: AggregationParams = AggregationParams(),
    expected_round: int | None = None,
    prox_dir: str | Path | None = None,
    next_from: str | None = None,
) -> AggregationReport:
    """The whole server step over files: load, check, aggregate, evaluate, write."""
    updates = load_updates(weights_dir)
    prox_updates = load_updates(prox_dir) if prox_dir else None
    notes = fill_missing_counts(updates, data_dir)
    if prox_updates:
        notes += fill_missing_counts(prox_updates, data_dir)
    validate_updates(updates, expected_round)
    test_path = common_test_file(data_dir)
    if not test_path.exists():
        raise DataError(f"{test_path}: common test set not found (the --data-dir written by split_data.py)")
    x_test, y_test = load_partition(test_path)
    report = run_aggregation(updates, x_test, y_test, methods, params, prox_updates, next_from)
    report.notes = notes + report.notes
    write_outputs(report, out_dir)
    return report
