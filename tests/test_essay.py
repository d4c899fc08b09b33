"""The essay quotes only what the committed result files say."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from fedmnist.experiments import (
    ENV_FILE,
    PROFILES,
    TABLE_BLOCK,
    essay_tables,
    fill_essay_tables,
    render_tables,
)

REPO = Path(__file__).resolve().parents[1]
ESSAY = REPO / "ensayo_aprendizaje_federado.md"
RESULTS = REPO / "resultados"
EXPECTED_TABLES = {"curso", "inicializacion", "heterogeneidad", "fedprox_mu", "ataques", "mcmahan", "mcmahan_ajuste",
                   "privacidad", "privacidad_equipo"}


@pytest.fixture(scope="module")
def essay() -> str:
    return ESSAY.read_text(encoding="utf-8")


def test_every_experiment_has_its_table_in_the_essay(essay):
    assert set(essay_tables(essay)) == EXPECTED_TABLES


@pytest.mark.parametrize("name", sorted(EXPECTED_TABLES))
def test_essay_table_matches_the_result_files(essay, name):
    # Prepare: the table as the committed CSV files give it
    expected = render_tables(RESULTS)

    # Assert
    assert name in expected, f"resultados/ has no data for table '{name}'"
    assert essay_tables(essay)[name] == expected[name]


def test_no_hand_written_tables_outside_the_generated_blocks(essay):
    outside = TABLE_BLOCK.sub("", essay)

    assert not [line for line in outside.splitlines() if line.lstrip().startswith("|")]


def test_figures_exist(essay):
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", essay)

    assert figures, "the essay shows no figure"
    for figure in figures:
        assert (ESSAY.parent / figure).is_file(), figure


def test_results_record_command_seeds_and_versions():
    env = json.loads((RESULTS / ENV_FILE).read_text())

    assert env["command"].startswith("fedmnist experiments")
    assert env["seeds"]
    assert {"tensorflow", "numpy", "python"} <= set(env["software"])


def test_results_come_from_the_committed_profile():
    # the recorded profile must be the one `fedmnist experiments --profile full` runs today
    env = json.loads((RESULTS / ENV_FILE).read_text())
    profile = json.loads(json.dumps(dataclasses.asdict(PROFILES[env["profile"]["name"]])))

    assert env["profile"] == profile


def test_fill_essay_tables_rewrites_stale_numbers():
    text = "a\n<!-- tabla:x -->\n| old |\n<!-- /tabla -->\nb"

    assert fill_essay_tables(text, {"x": "| new |"}) == "a\n<!-- tabla:x -->\n| new |\n<!-- /tabla -->\nb"


def test_fill_essay_tables_keeps_the_text_between_empty_blocks():
    text = "<!-- tabla:a -->\n<!-- /tabla -->\nprose\n<!-- tabla:b -->\n<!-- /tabla -->"

    filled = fill_essay_tables(text, {"a": "| A |", "b": "| B |"})

    assert filled == "<!-- tabla:a -->\n| A |\n<!-- /tabla -->\nprose\n<!-- tabla:b -->\n| B |\n<!-- /tabla -->"
