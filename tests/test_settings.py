"""Tests for fedmnist.settings: one declaration per setting, the same names and defaults in every mode
(``fedmnist train``, ``fedmnist simulate``, the Flower run config, the notebook), the deprecated spellings."""

import argparse
import ast
import dataclasses
import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import nbformat
import pytest

from fedmnist.cli import build_parser
from fedmnist.config import DEFAULT_SEED, TrainingConfig
from fedmnist.errors import ConfigError
from fedmnist.settings import (
    DEMO_PROXIMAL_MU,
    MEMBER_PROXIMAL_MU,
    SETTINGS,
    add_setting,
    format_value,
    member_default,
    renamed,
)

REPO = Path(__file__).resolve().parents[1]
TRAINING = ("local-epochs", "batch-size", "optimizer", "learning-rate", "momentum", "proximal-mu", "seed")
"""The settings the issue asks every mode to name alike."""


def subparser(command: str) -> argparse.ArgumentParser:
    """The ``fedmnist <command>`` parser."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


def flag_action(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def help_default(parser: argparse.ArgumentParser, flag: str) -> str:
    """The default a flag's help states: the text after "(default " up to ";" or ")"."""
    text = " ".join(flag_action(parser, flag).help.split())
    found = re.search(r"\(default ([^;)]+)", text)
    assert found, f"{flag}'s help states no default: {text!r}"
    return found.group(1)


def flower_defaults() -> dict:
    from fedmnist.flower_app import FlowerRunConfig

    return FlowerRunConfig().to_dict()


def pyproject_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


# --- the "done when": train, simulate and Flower name the training alike, with one default ----------


def test_train_simulate_and_flower_name_the_training_settings_alike_with_the_same_defaults():
    # Prepare
    train, simulate, flower = subparser("train"), subparser("simulate"), flower_defaults()

    for name in TRAINING:
        flag = SETTINGS[name].flag
        # Execute
        in_train, in_simulate = help_default(train, flag), help_default(simulate, flag)

        # Assert: the same flag, the same Flower key, the same default (μ aside: a member's job trains without
        # the proximal term unless asked, a FedProx run takes its μ)
        assert name in flower and name in pyproject_config()
        if name == "proximal-mu":
            assert in_train == format_value(MEMBER_PROXIMAL_MU)
            assert in_simulate == format_value(flower[name]) == format_value(SETTINGS[name].default)
        else:
            assert in_train == in_simulate == format_value(flower[name]) == format_value(SETTINGS[name].default), name
        assert flag_action(train, flag).dest == flag_action(simulate, flag).dest == SETTINGS[name].field


def test_every_mode_defaults_to_the_one_training():
    from fedmnist.demo import DemoConfig
    from fedmnist.flower_app import FlowerRunConfig
    from fedmnist.simulation import SimulationConfig
    from fedmnist.training import TrainConfig

    # Execute
    member = TrainConfig()
    shared = TrainingConfig(**{f.name: getattr(member, f.name) for f in dataclasses.fields(TrainingConfig)})
    args = build_parser().parse_args(["train", "--client", "1", "--data-dir", "d", "--out", "o"])

    # Assert
    assert (shared.optimizer, shared.learning_rate, shared.momentum, shared.epochs, shared.batch_size) == (
        "adam", 1e-3, 0.0, 2, 32)
    assert shared == TrainingConfig() == SimulationConfig().training == FlowerRunConfig().training
    assert DemoConfig().train_config() == member and DemoConfig().mu == DEMO_PROXIMAL_MU
    assert (args.local_epochs, args.batch_size, args.optimizer, args.learning_rate, args.momentum, args.seed,
            args.proximal_mu) == (2, 32, "adam", 1e-3, 0.0, DEFAULT_SEED, MEMBER_PROXIMAL_MU)


def test_simulate_flags_reach_the_simulation_config_under_their_old_and_new_names():
    from fedmnist.cli import config_from_args
    from fedmnist.simulation import SimulationConfig

    # Execute
    plain = config_from_args(build_parser().parse_args(BASE["simulate"]))
    new = config_from_args(build_parser().parse_args([*BASE["simulate"], "--fraction-train", "0.5", "--proximal-mu",
                                                      "0.1", "--learning-rate", "0.2", "--local-epochs", "3"]))
    with pytest.warns(FutureWarning):
        old = config_from_args(build_parser().parse_args([*BASE["simulate"], "--fraction", "0.5", "--mu", "0.1",
                                                          "--lr", "0.2", "--epochs", "3"]))

    # Assert
    assert plain == SimulationConfig()
    assert new == old == SimulationConfig.create(fraction=0.5, mu=0.1, learning_rate=0.2, local_epochs=3)


def test_mcmahan_presets_keep_their_own_training_and_the_help_says_why():
    from fedmnist.simulation import PRESETS

    # Execute
    text = " ".join(flag_action(subparser("simulate"), "--preset").help.split())

    # Assert
    for preset in PRESETS.values():
        assert preset.training != TrainingConfig() and preset.training.optimizer == "sgd"
    assert "their own local training" in text and "as the paper" in text


# --- Flower: FlowerRunConfig and [tool.flwr.app.config] against the declaration -----------------------------


def test_flower_run_config_fields_are_declared_settings_with_their_defaults():
    from fedmnist.flower_app import FlowerRunConfig

    for field in dataclasses.fields(FlowerRunConfig):
        key = field.name.replace("_", "-")
        # Assert: the same words, the same default and type (TOML's stand-in for None where unset)
        assert key in SETTINGS, f"FlowerRunConfig.{field.name} is not declared in fedmnist.settings"
        setting = SETTINGS[key]
        value = getattr(FlowerRunConfig(), field.name)
        assert value == setting.flower_default and type(value) is type(setting.flower_default), key
        assert setting.kind is type(value) or (setting.kind is float and type(value) is float), key


def test_pyproject_run_config_is_the_declaration():
    # Execute
    table = pyproject_config()

    # Assert: every key declared, with the declared default and type ("resume" too, once Flower reads it)
    for key, value in table.items():
        assert key in SETTINGS, f"[tool.flwr.app.config] {key} is not declared in fedmnist.settings"
        expected = SETTINGS[key].flower_default
        assert value == expected and type(value) is type(expected), (key, value, expected)
    assert set(flower_defaults()) <= set(table)


# --- the notebook's parameters cell against the declaration -------------------------------------------------


def parameters_cell() -> dict:
    notebook = nbformat.read(REPO / "local_training.ipynb", as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell.source).body}


def test_notebook_parameters_are_the_declared_names_and_member_defaults():
    # Execute
    values = parameters_cell()

    # Assert: UPPER_SNAKE of the same words, a member's defaults, the old names declared as None
    for name in TRAINING:
        setting = SETTINGS[name]
        assert values[setting.notebook] == member_default(name), setting.notebook
        for old in setting.notebook_aliases:
            assert values[old] is None, old
    assert {"EPOCHS", "PROX_MU"} <= {old for s in SETTINGS.values() for old in s.notebook_aliases}


def test_renamed_notebook_parameter_resolves_the_old_name_with_a_warning():
    # Execute / Assert: the old name unset (None): the new value, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert renamed("EPOCHS", None, "LOCAL_EPOCHS", 5) == 5
    # the old name given by papermill: its value, with a warning naming the new spelling
    with pytest.warns(FutureWarning, match="EPOCHS is deprecated.*use LOCAL_EPOCHS"):
        assert renamed("EPOCHS", 3, "LOCAL_EPOCHS", member_default("local-epochs")) == 3
    with pytest.warns(FutureWarning, match="PROX_MU is deprecated.*use PROXIMAL_MU"):
        assert renamed("PROX_MU", 0.01, "PROXIMAL_MU", MEMBER_PROXIMAL_MU) == 0.01
    # both given, and different: which one was meant?
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="both EPOCHS = 3 and LOCAL_EPOCHS = 4"):
        renamed("EPOCHS", 3, "LOCAL_EPOCHS", 4)


# --- deprecated flags -----------------------------------------------------------------------------------------

BASE = {
    "train": ["train", "--client", "1", "--data-dir", "d", "--out", "o"],
    "demo": ["demo"],
    "simulate": ["simulate", "--out", "o"],
    "aggregate": ["aggregate"],
}


@pytest.mark.parametrize(
    ("command", "old", "new", "value"),
    [
        ("train", "--epochs", "--local-epochs", "3"),
        ("train", "--lr", "--learning-rate", "0.05"),
        ("train", "--mu", "--proximal-mu", "0.01"),
        ("demo", "--epochs", "--local-epochs", "3"),
        ("demo", "--lr", "--learning-rate", "0.05"),
        ("demo", "--mu", "--proximal-mu", "0.1"),
        ("simulate", "--lr", "--learning-rate", "0.05"),
        ("simulate", "--mu", "--proximal-mu", "0.1"),
        ("simulate", "--fraction", "--fraction-train", "0.5"),
        ("simulate", "--beta1", "--beta-1", "0.8"),
        ("aggregate", "--num-malicious", "--krum-f", "2"),
        ("aggregate", "--beta2", "--beta-2", "0.9"),
    ],
)
def test_old_flag_still_works_with_a_warning_naming_the_new_one(command, old, new, value):
    # Execute
    with pytest.warns(FutureWarning, match=f"{old} is deprecated and will be removed in the next release; use {new}"):
        via_old = build_parser().parse_args([*BASE[command], old, value])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        via_new = build_parser().parse_args([*BASE[command], new, value])

    # Assert
    assert vars(via_old) == vars(via_new)


def test_old_flags_stay_out_of_the_usage_but_the_help_names_them():
    # Execute
    parser = subparser("train")
    usage = parser.format_usage()
    text = " ".join(parser.format_help().split())

    # Assert
    assert "--local-epochs" in usage and "--epochs" not in usage and "--lr" not in usage
    assert "[deprecated spelling: --epochs]" in text and "[deprecated spelling: --lr]" in text


def test_malicious_and_krum_f_are_different_settings():
    # Execute
    simulate = build_parser().parse_args([*BASE["simulate"], "--malicious", "2", "--krum-f", "1"])

    # Assert: --malicious injects attackers; Krum's f has its own flag and no old alias in simulate
    assert (simulate.malicious, simulate.krum_f) == (2, 1)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*BASE["simulate"], "--num-malicious", "1"])


def test_add_setting_switch_and_override():
    # Prepare
    parser = argparse.ArgumentParser()
    add_setting(parser, "resume")
    add_setting(parser, "learning-rate", default=None, shown=0.5, aliases=())

    # Execute
    given, absent = parser.parse_args(["--resume", "--learning-rate", "0.2"]), parser.parse_args([])

    # Assert
    assert (given.resume, given.learning_rate) == (True, 0.2)
    assert (absent.resume, absent.learning_rate) == (False, None)
    assert "(default 0.5)" in flag_action(parser, "--learning-rate").help
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr", "0.1"])


# --- one source per setting -------------------------------------------------------------------------------


def test_declaration_is_consistent():
    flags = [s.flag for s in SETTINGS.values()]
    aliases = [a for s in SETTINGS.values() for a in s.aliases]
    for name, setting in SETTINGS.items():
        assert setting.name == name and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name
        assert setting.default is None or setting.kind is type(setting.default), name
        assert setting.choices is None or setting.default in (None, *setting.choices), name
        assert setting.help and not re.search(r"default \d", setting.help), name
    assert len(set(aliases)) == len(aliases) and not set(aliases) & set(flags)
    assert SETTINGS["resume"].default is False and SETTINGS["resume"].kind is bool
    assert SETTINGS["resume"].help == "continue from the checkpoint in output-dir"


def test_cli_help_copies_no_default_number():
    # Execute: every help string literal of cli.py
    tree = ast.parse((REPO / "fedmnist" / "cli.py").read_text())
    texts = [ast.unparse(kw.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
             for kw in node.keywords if kw.arg in ("help", "note", "epilog")]

    # Assert: defaults come from the declaration, never typed into the help
    copied = [t for t in texts if re.search(r"default:? \d|\(\d+(\.\d+)?\)|defaults: \w+ \d", t)]
    assert texts and not copied, copied


def test_seed_42_is_declared_once():
    # Execute
    hits = [f"{path.name}: {line.strip()}" for path in sorted((REPO / "fedmnist").glob("*.py"))
            for line in path.read_text().splitlines()
            if re.search(r"(seed\w*\s*[:=][^=]*\b42\b(?!, \d)|\b42\)|= 42\b)", line) and path.name != "settings.py"]
    # (a profile's list of seeds, (42, 43, ...), is data, not the default)

    # Assert
    assert DEFAULT_SEED == SETTINGS["seed"].default == 42
    assert not hits, hits


def test_settings_and_config_import_without_tensorflow():
    # Execute
    code = ("import sys, fedmnist.settings, fedmnist.config; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO)

    # Assert
    assert proc.returncode == 0, proc.stderr
