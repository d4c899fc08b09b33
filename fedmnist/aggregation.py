"""The server's job: check the members' updates, aggregate them with each rule, compare, write the next round.

Used by ``global_aggregation.py`` / ``fedmnist aggregate`` and by ``fedmnist demo``: the file flow's
adapter to the shared server step (``fedmnist.server``). It reads the members' files, checks what
only files can get wrong (model fingerprint, round, the start file), hands them to ``Server.step``
once per method with ``strict=True``, and writes the course's comparison. Every check runs before
any arithmetic and every output is computed before the first file is written, so a bad update leaves
the output directory untouched.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedmnist.config import DEFAULT_METHODS, DEFAULT_SEED, check_seed
from fedmnist.data import common_test_file, load_partition
from fedmnist.errors import ConfigError, FedMnistError, ValidationError
from fedmnist.evaluation import EvalResult, evaluate, intervals_overlap
from fedmnist.exchange import (
    ClientUpdate,
    GlobalWeights,
    find_updates,
    global_path,
    load_global,
    load_update,
    make_global,
    save_global,
)
from fedmnist.federation_files import checked_test_file, read_manifest
from fedmnist.federation_files import manifest_counts as partition_counts
from fedmnist.io import OutputSet, check_writable_dir, read_text_capped
from fedmnist.labels import method_name
from fedmnist.methods import DEFAULT_MU, SCAFFOLD, MethodConfig, build_methods
from fedmnist.model import initial_weights, model_fingerprint, save_keras_model
from fedmnist.outputs import json_text
from fedmnist.plots import plot_confusion_matrix, plot_method_comparison
from fedmnist.rounds import with_dp
from fedmnist.server import Reply, RoundRecord, Server, ServerState
from fedmnist.strategies import DEFAULT_NUM_MALICIOUS
from fedmnist.training import ClientTrainer

if TYPE_CHECKING:
    from fedmnist.privacy import DPConfig

log = logging.getLogger(__name__)

RESULTS_JSON = "resultados_agregacion.json"
RESULTS_CSV = "resultados_agregacion.csv"
COMPARISON_PLOT = "comparacion_metodos.png"


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
    state: dict = field(default_factory=dict)
    epsilon: float | None = None
    delta: float | None = None


@dataclass
class AggregationReport:
    """Everything the server computed for one round of the file flow.

    ``round`` is the training round (1 for the updates trained from ``pesos_globales_ronda_0.pkl``),
    numbered as in the simulation; the next global weights are ``pesos_globales_ronda_{round}.pkl``.
    """

    round: int
    start: GlobalWeights
    methods: dict[str, MethodResult]
    locals_: list[tuple[ClientUpdate, EvalResult]]
    best: str
    runner_up: str | None
    best_resolved: bool
    next_from: str
    notes: list[str] = field(default_factory=list)
    records: list[RoundRecord] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def start_sha256(self) -> str:
        """Hash of the global weights every update started from."""
        return self.start.sha256


def load_updates(weights_dir: str | Path) -> list[ClientUpdate]:
    """Safely read every ``pesos_cliente_N.pkl`` in ``weights_dir``, each checked as it is read."""
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise ValidationError(f"{weights_dir}: weights directory not found")
    paths = find_updates(weights_dir)
    if not paths:
        raise ValidationError(f"{weights_dir}: no pesos_cliente_N.pkl files to aggregate")
    return [load_update(p) for p in paths]


def manifest_counts(data_dir: str | Path | None) -> dict[int, int] | None:
    """Client id -> sample count from the federation manifest ``particion.json``, if there is one."""
    return partition_counts(read_manifest(data_dir) if data_dir else None)


def find_start(weights_dir: str | Path, updates: list[ClientUpdate], path: str | Path | None = None
               ) -> GlobalWeights | None:
    """The round's global weights: ``path`` if given, else ``pesos_globales_ronda_R.pkl`` beside the updates.

    R is the round the (non-bare) updates say they trained in, the earliest if they disagree (then
    ``to_replies`` refuses the others, naming them). None when no such file exists.
    """
    if path:
        return load_global(path)
    rounds = sorted({u.round for u in updates if not u.bare})
    if rounds and global_path(weights_dir, rounds[0]).exists():
        return load_global(global_path(weights_dir, rounds[0]))
    return None


def to_replies(updates: list[ClientUpdate], start: GlobalWeights, counts: dict[int, int] | None,
               expected_round: int | None = None) -> tuple[list[Reply], list[str]]:
    """The server's view of the updates: their file's claims, checked against what the file flow knows.

    Bare legacy updates (no sample count) take it from the manifest, else weight 1, with a note.

    Raises
    ------
    ValidationError
        An update made for another model or another round; the message names its file.
    """
    fingerprint = model_fingerprint()
    replies, notes = [], []
    for u in updates:
        if u.fingerprint is not None and u.fingerprint != fingerprint:
            raise ValidationError(f"{_label(u)}: made for model fingerprint {u.fingerprint}, "
                                  f"but this model's is {fingerprint}")
        if not u.bare and u.round != start.round:
            raise ValidationError(
                f"{_label(u)}: trained from the global weights of round {u.round}, but this aggregation uses "
                f"those of round {start.round} ({_label_start(start)}); updates from different rounds "
                "cannot be aggregated together"
            )
        if expected_round is not None and not u.bare and u.round != expected_round:
            raise ValidationError(f"{_label(u)}: trained in round {u.round}, but round {expected_round} was requested")
        count = u.num_examples
        if count is None:
            if counts and u.client_id in counts:
                count = counts[u.client_id]
                notes.append(f"{_label(u)}: sample count taken from particion.json ({count})")
            else:
                count = 1
                notes.append(f"{_label(u)}: sample count unknown; weighted as 1 (equal weights)")
        unclipped = u.metrics.get("unclipped")
        replies.append(Reply(u.client_id, u.weights, count, _label(u), None if u.bare else u.start_sha256,
                             _last_loss(u), u.mu, {"unclipped": unclipped} if isinstance(unclipped, bool) else {},
                             u.control_delta))
    for note in notes:
        log.warning(note)
    return replies, notes


def _last_loss(update: ClientUpdate) -> float | None:
    """The last local epoch's loss an update reports, if it is a finite number (it is only displayed)."""
    history = update.metrics.get("history")
    losses = history.get("loss") if isinstance(history, dict) else None
    last = losses[-1] if isinstance(losses, list) and losses else None
    if isinstance(last, bool) or not isinstance(last, (int, float)) or abs(last) > 1e300:
        return None
    return float(last) if math.isfinite(last) else None


def _label(update: ClientUpdate) -> str:
    """How messages name an update: its file, or its client id when it was never a file."""
    return str(update.path) if update.path is not None else f"client {update.client_id}"


def _label_start(start: GlobalWeights) -> str:
    return str(start.path) if start.path is not None else f"global weights {start.sha256[:12]}"


def run_aggregation(
    updates: list[ClientUpdate],
    x_test: np.ndarray,
    y_test: np.ndarray,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    params: MethodConfig | None = None,
    prox_updates: list[ClientUpdate] | None = None,
    next_from: str | None = None,
    evaluator: ClientTrainer | None = None,
    evaluate_locals: bool = True,
    start: GlobalWeights | None = None,
    counts: dict[int, int] | None = None,
    expected_round: int | None = None,
    max_count_ratio: float | None = None,
    privacy: DPConfig | None = None,
    seeded_noise: bool = False,
) -> AggregationReport:
    """Run the server step for every method over the same updates, evaluate the locals, pick the best.

    ``start`` is the round's global weights (every non-bare update must have started from them);
    without it only bare legacy updates are accepted, assumed to start from ``build_model(seed)``.
    ``prox_updates``, when given, are the same federation's updates trained with mu > 0; FedProx
    aggregates those (its server step is the weighted average), the other rules ``updates``.
    ``counts`` are the manifest's sample counts by client id: a claim that differs is refused.
    Without them, ``max_count_ratio`` caps every claim at that many times the median claim.
    A method that keeps server state (a server optimiser, DP-FedAvg with ``privacy``) resumes the
    state ``start`` carries when ``start`` was written by that method, and starts afresh otherwise;
    the next round's file carries the chosen method's new state. DP noise comes from the operating
    system unless ``seeded_noise`` (reproducible, and predictable to anyone who knows the seed).
    """
    config = replace(params or MethodConfig(), methods=tuple(methods), mu=DEFAULT_MU)
    try:
        # SCAFFOLD's N: the federation's members (the manifest), else every member who sent an update
        built = build_methods(config, krum_f=DEFAULT_NUM_MALICIOUS, num_clients=len(counts) if counts else None)
        if privacy is not None:
            from fedmnist.privacy import check_dp_method

            for method in config.methods:
                check_dp_method(method)
    except ConfigError as exc:
        raise ValidationError(str(exc)) from None
    if next_from is not None and next_from not in config.methods:
        raise ValidationError(f"--next-from {next_from} is not among the methods run ({', '.join(config.methods)})")
    notes: list[str] = []
    if start is None:
        if any(not u.bare for u in updates + (prox_updates or [])):
            raise ValidationError(
                "cannot check where the updates started: the round's global weights were not found. Pass "
                "--global-weights pesos_globales_ronda_R.pkl (the file every member trained from) or put it "
                "beside the updates"
            )
        start = make_global(initial_weights(DEFAULT_SEED), 0, "init", DEFAULT_SEED)
        notes.append(f"no global-weights file: the bare updates are assumed to start from build_model({DEFAULT_SEED}), "
                     "round 0")
    replies, more = to_replies(updates, start, counts, expected_round)
    notes += more
    prox_replies = None
    if prox_updates is not None:
        prox_replies, more = to_replies(prox_updates, start, counts, expected_round)
        notes += more
    if privacy is not None:
        # Every member who sent an update took part: nobody was sampled at random, so q = m/K = 1 (a
        # manifest's absent members were not randomly left out and give no amplification).
        seed = (start.seed if start.seed is not None else DEFAULT_SEED) if seeded_noise else None
        built = with_dp(built, privacy, len(replies), len(replies), seed)
    state = ServerState.initial(built, start.weights, start.round)
    for method in built:
        if start.state is not None and start.method == method.name:
            try:
                method.check_state(start.state, start.weights)
            except ValidationError as exc:
                raise ValidationError(f"{_label_start(start)}: server state of {method.name}: {exc}") from None
            state.method_state[method.name] = start.state
        elif method.initial_state() or method.name == SCAFFOLD:
            notes.append(f"{method.name}: {_label_start(start)} carries no {method.name} state; it starts afresh"
                         + (" (server control variate c = 0)" if method.name == SCAFFOLD else ""))
    if SCAFFOLD in config.methods and not counts:
        notes.append(f"SCAFFOLD without the federation manifest (--data-dir): N = the {len(replies)} members who sent "
                     "updates; if some member did not, c is no longer the mean of every member's c_i")
    evaluator = evaluator or ClientTrainer()
    server = Server(built, state, lambda w: evaluate(evaluator, w, x_test, y_test), counts, max_count_ratio)
    round_ = start.round + 1
    results: dict[str, MethodResult] = {}
    for method in config.methods:
        source = prox_replies if (method == "fedprox" and prox_replies is not None) else replies
        step = server.step(round_, method, source, strict=True)
        notes += [w for w in step.warnings if w not in notes]
        mus = {r.client_id: r.mu for r in step.accepted}
        if method == "fedprox":
            if all(mu == 0 for mu in mus.values()):
                notes.append("FedProx: no update was trained with mu > 0, so for this set FedProx equals "
                             "FedAvg (its server step is the same weighted average)")
            else:
                notes.append("FedProx: clients trained with mu = "
                             + ", ".join(f"{cid}: {mu:g}" for cid, mu in sorted(mus.items())))
        gw = make_global(step.weights, round_, method, start.seed)
        results[method] = MethodResult(method, gw.weights, step.evaluation, sorted(mus), mus, gw.sha256,
                                       sum(r.num_examples for r in step.accepted),
                                       server.state.method_state[method], step.record.epsilon, step.record.delta)
        if step.record.epsilon is not None:
            from fedmnist.privacy import privacy_verdict

            verdict = privacy_verdict(server.methods[method].accountant, server.state.method_state[method]["releases"])
            notes.append(f"{method} (DP-FedAvg): {verdict.message}")
    records = server.end_round(round_)
    locals_ = []
    if evaluate_locals:
        used = {r.client_id: r.num_examples for r in replies}
        locals_ = [(replace(u, num_examples=used.get(u.client_id, u.num_examples)),
                    evaluate(evaluator, u.weights, x_test, y_test)) for u in updates]

    ranking = sorted(results.values(), key=lambda r: (-r.evaluation.accuracy, r.evaluation.loss))
    best = ranking[0]
    runner_up = ranking[1] if len(ranking) > 1 else None
    resolved = runner_up is None or not intervals_overlap(best.evaluation, runner_up.evaluation)
    if runner_up is not None and not resolved:
        notes.append(
            f"{method_name(best.method)} is best, but {method_name(runner_up.method)}'s accuracy lies "
            "within its 95% interval: the difference is not statistically resolved on this test set"
        )
    return AggregationReport(
        round=round_, start=start, methods=results, locals_=locals_, best=best.method,
        runner_up=runner_up.method if runner_up else None, best_resolved=resolved,
        next_from=next_from or best.method, notes=notes, records=records,
    )


def report_to_dict(report: AggregationReport) -> dict:
    """JSON-ready summary of an aggregation round."""
    def metrics(e: EvalResult) -> dict:
        return {"accuracy": e.accuracy, "ci_low": e.ci_low, "ci_high": e.ci_high, "loss": e.loss,
                "num_examples": e.num_examples, "per_class_accuracy": e.per_class_accuracy}

    return {
        "round": report.round,
        "start_round": report.start.round,
        "next_round": report.round,
        "start_sha256": report.start_sha256,
        "model_fingerprint": model_fingerprint(),
        "methods": {
            name: {**metrics(r.evaluation), "clients": r.clients,
                   "mu": {str(k): v for k, v in r.mu_values.items()}, "sha256": r.sha256,
                   "epsilon": r.epsilon, "delta": r.delta,
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
        lines.append(f"{method_name(name):<16} {e.accuracy:>9.4f} {e.ci_low:>8.4f}-{e.ci_high:<8.4f} {e.loss:>8.4f}")
    for u, e in report.locals_:
        label = f"local {u.client_id}" + (f" (mu={u.mu:g})" if u.mu else "")
        lines.append(f"{label:<16} {e.accuracy:>9.4f} {e.ci_low:>8.4f}-{e.ci_high:<8.4f} {e.loss:>8.4f}")
    verdict = f"best method: {method_name(report.best)}"
    if report.runner_up and not report.best_resolved:
        verdict += f" (within the 95% interval of {method_name(report.runner_up)}: not a resolved difference)"
    lines.append(verdict)
    return "\n".join(lines)


def write_outputs(report: AggregationReport, out_dir: str | Path) -> dict[str, Path]:
    """Write models, plots, result tables and the next round's global weights as one all-or-nothing set.

    Every file is staged under a temporary name and the set appears at once (``fedmnist.io.OutputSet``):
    a run killed while writing leaves the previous complete set, and the next run sweeps its temporary
    files. Outputs of the previous set that this one does not produce (a method not run again) are
    removed with it, so ``resultados_agregacion.json`` always describes exactly what is there.
    """
    out_dir = Path(out_dir)
    files: dict[str, Path] = {}
    with OutputSet(out_dir, "--out directory") as out:
        for name, r in report.methods.items():
            with out.temp_path(f"modelo_global_{name}.h5") as tmp:
                save_keras_model(r.weights, tmp)
            with out.temp_path(f"matriz_confusion_{name}.png") as tmp:
                plot_confusion_matrix(r.evaluation.confusion, tmp, title=f"{method_name(name)} — ronda "
                                      f"{report.round} (precisión {r.evaluation.accuracy:.2%})")
            files[f"model_{name}"] = out.path(f"modelo_global_{name}.h5")
            files[f"confusion_{name}"] = out.path(f"matriz_confusion_{name}.png")
        with out.temp_path(COMPARISON_PLOT) as tmp:
            plot_method_comparison(
                [(method_name(n), r.evaluation.accuracy, r.evaluation.ci_low, r.evaluation.ci_high)
                 for n, r in report.methods.items()],
                [(f"local {u.client_id}", e.accuracy, e.ci_low, e.ci_high) for u, e in report.locals_],
                tmp, title=f"Ronda {report.round}: modelos globales frente a modelos locales (IC 95%)",
            )
        files["comparison"] = out.path(COMPARISON_PLOT)
        nxt = report.methods[report.next_from]
        next_name = global_path(".", report.round).name
        with out.temp_path(next_name) as tmp:
            save_global(tmp, GlobalWeights(report.round, nxt.weights, nxt.sha256, model_fingerprint(),
                                           report.start.seed, report.next_from, state=nxt.state or None))
        files["next_round"] = out.path(next_name)
        files["csv"] = out.write_text(RESULTS_CSV, _csv_text(report))
        files["json"] = out.path(RESULTS_JSON)
        summary = report_to_dict(report)
        summary["files"] = {k: p.name for k, p in files.items()}
        out.write_text(RESULTS_JSON, json_text(summary))
        for stale in _previous_outputs(out_dir) - {p.name for p in files.values()}:
            out.discard(stale)
    report.files = files
    return files


_OUTPUT_NAME = re.compile(r"(modelo_global|matriz_confusion)_[a-z]+\.(h5|png)")


def _previous_outputs(out_dir: Path) -> set[str]:
    """The per-method files the previous set in ``out_dir`` listed (only names this writer makes)."""
    previous = out_dir / RESULTS_JSON
    try:  # a stale FIFO or device in its place is ignored unread (read_text_capped refuses it)
        listed = json.loads(read_text_capped(previous, 1 << 20, "previous results", error=FedMnistError)
                            ).get("files", {})
    except (FedMnistError, ValueError, AttributeError, RecursionError):
        return set()
    if not isinstance(listed, dict):
        return set()
    return {name for name in listed.values() if isinstance(name, str) and _OUTPUT_NAME.fullmatch(name)}


def aggregate_directory(
    weights_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    params: MethodConfig | None = None,
    expected_round: int | None = None,
    prox_dir: str | Path | None = None,
    next_from: str | None = None,
    global_weights: str | Path | None = None,
    max_count_ratio: float | None = None,
    privacy: DPConfig | None = None,
    seeded_noise: bool = False,
    seed: int = DEFAULT_SEED,
) -> AggregationReport:
    """The whole server step over files: check the output, load, validate, aggregate, evaluate, write.

    ``global_weights`` is the round's ``pesos_globales_ronda_R.pkl``; without it the file of the
    updates' round is looked for beside them, and for round 0 the server rebuilds ``build_model(seed)``
    (what ``--init`` and the notebook's ``GLOBAL_WEIGHTS = None`` start from).
    """
    check_seed(seed, "--seed")
    check_writable_dir(out_dir, "--out directory")
    test_path = checked_test_file(common_test_file(data_dir))
    updates = load_updates(weights_dir)
    prox_updates = load_updates(prox_dir) if prox_dir else None
    start = find_start(weights_dir, updates, global_weights)
    rebuilt = start is None and updates and all(u.round == 0 for u in updates if not u.bare) and \
        any(not u.bare for u in updates)
    if rebuilt:  # round 0's weights are build_model(seed): the server can hold them without the file
        start = make_global(initial_weights(seed), 0, "init", seed)
    if start is not None and expected_round is not None and start.round != expected_round:
        raise ValidationError(f"{_label_start(start)}: holds the global weights of round {start.round}, "
                              f"but round {expected_round} was requested")
    x_test, y_test = load_partition(test_path)
    report = run_aggregation(updates, x_test, y_test, methods, params, prox_updates, next_from,
                             start=start, counts=manifest_counts(data_dir), expected_round=expected_round,
                             max_count_ratio=max_count_ratio, privacy=privacy, seeded_noise=seeded_noise)
    if rebuilt:
        report.notes.insert(0, f"no pesos_globales_ronda_0.pkl beside the updates: the server rebuilt round 0's "
                               f"weights, build_model(seed={seed}), and checked every update against them")
    write_outputs(report, out_dir)
    return report
