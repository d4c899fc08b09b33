"""Tests of fedmnist.outputs: the writer every mode uses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedmnist.errors import ConfigError
from fedmnist.io import OutputSet, check_writable_dir
from fedmnist.outputs import CSV_COLUMNS, METRICS_CSV, METRICS_JSON, dump_json, write_metrics
from fedmnist.server import RoundRecord


def _refuse(constant):
    raise AssertionError(f"JSON holds {constant}")


def test_json_writer_never_writes_nan_or_infinity(tmp_path):
    payload = {"a": math.nan, "b": [np.float32(np.inf), -math.inf, 1.5], "c": {"d": np.float64(np.nan)},
               "e": np.arange(3), "f": np.int64(4)}
    dump_json(tmp_path / "x.json", payload)
    loaded = json.loads((tmp_path / "x.json").read_text(), parse_constant=_refuse)
    assert loaded == {"a": None, "b": [None, None, 1.5], "c": {"d": None}, "e": [0, 1, 2], "f": 4}


def test_metrics_of_a_diverged_round_are_empty_cells_and_nulls(tmp_path):
    row = RoundRecord(1, "fedavg", 0.098, math.nan, math.inf, 1.0, 0.5, 0.1, 1.2, 0.0, 3, 2, [1, 2, 3], [1, 2], [3],
                      [], ["client 3: weight 0 holds NaN or infinite values"], [], "abc")
    with OutputSet(tmp_path) as staged:
        write_metrics(staged, [row])
    header, line = (tmp_path / METRICS_CSV).read_text().splitlines()
    assert header.split(",") == CSV_COLUMNS
    assert ",0.098,,," in line and "1 2 3" in line
    saved = json.loads((tmp_path / METRICS_JSON).read_text(), parse_constant=_refuse)
    assert saved["rounds"][0]["test_loss"] is None and saved["methods"] == ["fedavg"]


def test_output_dir_that_is_a_file_or_read_only_is_refused(tmp_path):
    target = tmp_path / "f"
    target.write_text("x")
    with pytest.raises(ConfigError, match="file"):
        check_writable_dir(target, "output directory")
    check_writable_dir(tmp_path / "new" / "dir", "output directory")
    assert not (tmp_path / "new").exists()  # checked, not created: nothing appears before the outputs
