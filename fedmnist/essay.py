"""The essay's tables, from the committed result files: render them, and write them into the essay.

Every table of ``ensayo_aprendizaje_federado.md`` sits between ``<!-- tabla:NAME -->`` and
``<!-- /tabla -->``. ``render_tables`` computes each one from the files ``fedmnist experiments`` wrote
(``fedmnist.result_tables`` draws them); ``update_essay`` replaces every block with its rendering, so
after new results ``python -m fedmnist.essay`` brings the essay up to date, and ``tests/test_essay.py``
checks that the essay's tables equal what the files give.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from fedmnist import result_tables as rt
from fedmnist.errors import ConfigError, DataError
from fedmnist.experiments.attacks import ATTACK_CSV, ATTACK_TUNING_CSV
from fedmnist.experiments.ceiling import CEILING_CSV
from fedmnist.experiments.common import read_csv
from fedmnist.experiments.course import COURSE_CSV, COURSE_TUNING_CSV, INIT_CSV
from fedmnist.experiments.drift import DRIFT_CSV
from fedmnist.experiments.fedprox_mu import PROX_CSV
from fedmnist.experiments.heterogeneity import HETERO_CSV, HETERO_TUNING_CSV
from fedmnist.experiments.mcmahan import MCMAHAN_CSV, MCMAHAN_TUNING_CSV
from fedmnist.experiments.privacy import METHOD as PRIVACY_METHOD
from fedmnist.experiments.privacy import PRIVACY_CSV, PRIVACY_TUNING_CSV, TEAM_PRIVACY_CSV, case_of, run_dir
from fedmnist.io import atomic_write_text, read_text_capped
from fedmnist.outputs import METRICS_CSV

log = logging.getLogger(__name__)

ESSAY_FILE = "ensayo_aprendizaje_federado.md"
TABLE_BLOCK = re.compile(
    r"<!-- tabla:(?P<name>[\w-]+) -->\n(?P<body>(?:(?!<!--).)*?)\n?<!-- /tabla -->", re.DOTALL
)

_SOURCES: tuple[tuple[str, Callable[[rt.Rows], dict[str, str]]], ...] = (
    (COURSE_CSV, lambda rows: {"curso": rt.course_table(rows)}),
    (INIT_CSV, lambda rows: {"inicializacion": rt.initialisation_table(rows)}),
    (CEILING_CSV, lambda rows: {"techo": rt.ceiling_table(rows)}),
    (DRIFT_CSV, rt.drift_tables),
    (HETERO_CSV, rt.heterogeneity_tables),
    (HETERO_CSV, lambda rows: {"heterogeneidad_peor_cliente": rt.heterogeneity_client_table(rows)}),
    (HETERO_CSV, lambda rows: {"heterogeneidad_cambio": rt.change_table(
        rows, "heterogeneidad.csv", ("partition", "method"), ("partición", "método"),
        lambda key: (rt.partition_name(key[0]), rt.method_name(key[1])))}),
    (PROX_CSV, lambda rows: {"fedprox_mu": rt.fedprox_mu_table(rows)}),
    (PROX_CSV, lambda rows: {"fedprox_mu_cambio": rt.change_table(
        rows, "fedprox_mu.csv", ("mu",), ("μ",), lambda key: (key[0],))}),
    (PROX_CSV, lambda rows: {"fedprox_mu_peor_cliente": rt.fedprox_mu_client_table(rows)}),
    (ATTACK_CSV, rt.attack_tables),
    (ATTACK_CSV, lambda rows: {"ataques_convergencia": rt.attack_convergence_table(rows)}),
    (ATTACK_CSV, lambda rows: {"ataques_peor_cliente": rt.attack_client_table(rows)}),
    (MCMAHAN_CSV, rt.mcmahan_tables),
    (MCMAHAN_TUNING_CSV, lambda rows: {"mcmahan_ajuste": rt.mcmahan_tuning_table(rows)}),
    (PRIVACY_CSV, lambda rows: {"privacidad": rt.privacy_table(rows)}),
    (PRIVACY_TUNING_CSV, lambda rows: {"privacidad_ajuste": rt.privacy_tuning_table(rows)}),
    (TEAM_PRIVACY_CSV, lambda rows: {"privacidad_equipo": rt.team_privacy_table(rows)}),
)
"""Result file → the tables drawn from its rows."""
_MU_TUNING = (COURSE_TUNING_CSV, HETERO_TUNING_CSV, ATTACK_TUNING_CSV)
"""The μ-tuning files that together give the ``ajuste_mu`` table."""

ESSAY_MAX_BYTES = 4 << 20
"""Largest essay read: the essay is about 100 KB."""


def render_tables(results_dir: str | Path) -> dict[str, str]:
    """The essay's Markdown tables, computed from the result files in ``results_dir``.

    A table whose file is absent is left out; a file written by an older version (columns missing) is
    skipped with a warning.
    """
    results_dir = Path(results_dir)
    tables: dict[str, str] = {}
    for name, render in _SOURCES:
        if (results_dir / name).exists():
            try:
                tables.update(render(read_csv(results_dir / name)))
            except rt.StaleResults as exc:
                log.warning("%s: %s", results_dir / name, exc)
    if (results_dir / PRIVACY_CSV).exists():
        try:
            tables["privacidad_estabilidad"] = _privacy_stability(results_dir)
        except rt.StaleResults as exc:
            log.warning("%s: %s", results_dir / PRIVACY_CSV, exc)
    tuning = [row for name in _MU_TUNING if (results_dir / name).exists() for row in read_csv(results_dir / name)]
    if tuning:
        try:
            tables["ajuste_mu"] = rt.tuning_table(tuning)
        except rt.StaleResults as exc:
            log.warning("%s: %s", results_dir, exc)
    return tables


def _privacy_stability(results_dir: Path) -> str:
    """The ``privacidad_estabilidad`` table: every final privacy run's per-round metrics, with the tuning runs'
    length (``privacidad_ajuste.csv``) as the round whose accuracy it quotes."""

    def per_round(row) -> rt.Rows:
        path = run_dir(results_dir, case_of(row), row["seed"]) / METRICS_CSV
        if not path.exists():
            raise rt.StaleResults(f"{path} is missing: run fedmnist experiments --only privacy")
        return [m for m in read_csv(path) if m.get("method", PRIVACY_METHOD) == PRIVACY_METHOD]

    tuning = results_dir / PRIVACY_TUNING_CSV
    lengths = {r.get("tuning_rounds", "") for r in read_csv(tuning) if r.get("stage") == "dp"} \
        if tuning.exists() else set()
    at_round = int(lengths.pop()) if len(lengths) == 1 and "" not in lengths else None
    return rt.privacy_stability_table(read_csv(results_dir / PRIVACY_CSV), per_round, at_round)


def essay_tables(text: str) -> dict[str, str]:
    """The generated table blocks of the essay, by name."""
    return {m.group("name"): m.group("body").strip() for m in TABLE_BLOCK.finditer(text)}


def fill_essay_tables(text: str, tables: dict[str, str]) -> str:
    """Replace every table block of the essay with the table rendered from the result files."""
    def body(match: re.Match) -> str:
        name = match.group("name")
        if name not in tables:
            raise ConfigError(f"the essay quotes table '{name}', but the results have no such table")
        return f"<!-- tabla:{name} -->\n{tables[name]}\n<!-- /tabla -->"

    return TABLE_BLOCK.sub(body, text)


def update_essay(essay: str | Path, results_dir: str | Path) -> list[str]:
    """Rewrite the essay's table blocks from ``results_dir`` (atomically); the names of the tables that changed.

    Raises:
        DataError: the essay or the results directory is missing.
        ConfigError: the essay quotes a table the results do not give (naming the essay and the table);
            the essay is left untouched.
    """
    essay, results_dir = Path(essay), Path(results_dir)
    if not essay.is_file():
        raise DataError(f"{essay}: essay not found")
    if not results_dir.is_dir():
        raise DataError(f"{results_dir}: results directory not found")
    text = read_text_capped(essay, ESSAY_MAX_BYTES, "essay", error=DataError)
    tables = render_tables(results_dir)
    try:
        filled = fill_essay_tables(text, tables)
    except ConfigError as exc:
        raise ConfigError(f"{essay}: {exc} (in {results_dir})") from None
    before = essay_tables(text)
    changed = [name for name, body in essay_tables(filled).items() if before.get(name) != body]
    if filled != text:
        atomic_write_text(essay, filled)
    return changed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``fedmnist essay`` (and ``python -m fedmnist.essay``)."""
    parser.add_argument("--results", default="resultados", help="result directory (default resultados)")
    parser.add_argument("--essay", default=ESSAY_FILE, help=f"the essay to update (default {ESSAY_FILE})")


def command(args: argparse.Namespace) -> int:
    """Rewrite the essay's tables from ``args.results`` and say which changed."""
    changed = update_essay(args.essay, args.results)
    print(f"{args.essay}: {len(changed)} table(s) updated" + (f" ({', '.join(changed)})" if changed else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedmnist.essay``, the same as ``fedmnist essay``."""
    from fedmnist.cli import run

    parser = argparse.ArgumentParser(prog="python -m fedmnist.essay",
                                     description="Rewrite the essay's tables from the result files.")
    add_arguments(parser)
    return run(command, parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
