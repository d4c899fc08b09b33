"""``fedmnist experiments``: run a profile's experiments into one directory and record their environment."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from fedmnist.config import AGGRESSIVE_TRAINING
from fedmnist.errors import ConfigError, FedMnistError
from fedmnist.experiments.attacks import run_attacks
from fedmnist.experiments.ceiling import run_ceiling
from fedmnist.experiments.common import WORKERS
from fedmnist.experiments.course import run_course
from fedmnist.experiments.drift import run_drift
from fedmnist.experiments.fedprox_mu import run_fedprox_mu
from fedmnist.experiments.heterogeneity import run_heterogeneity
from fedmnist.experiments.mcmahan import run_mcmahan
from fedmnist.experiments.privacy import run_privacy
from fedmnist.experiments.profiles import PROFILES, Profile
from fedmnist.io import atomic_write_text, quote, read_text_capped

log = logging.getLogger(__name__)

ENV_FILE = "entorno.json"
EXPERIMENTS = ("course", "ceiling", "drift", "heterogeneity", "fedprox_mu", "attacks", "mcmahan", "privacy")


def environment(profile: Profile, out_dir: Path, seconds: dict[str, float]) -> dict:
    """Command, profile, seeds and software versions, saved beside the results."""
    import keras
    import tensorflow as tf

    from fedmnist import __version__

    try:
        import flwr

        flwr_version = flwr.__version__ if hasattr(flwr, "__version__") else "installed"
    except ImportError:
        flwr_version = None
    return {
        "command": f"fedmnist experiments --profile {profile.name} --out {out_dir.name} --data MNIST.npz",
        "profile": asdict(profile),
        "seeds": list(profile.seeds),
        "seconds_per_experiment": {k: round(v, 1) for k, v in seconds.items()},
        "seconds_note": "wall time of the latest run of each experiment; every multi-round run continues "
                        "its checkpoint (the drift grid its finished blocks), so after an interrupted or "
                        "repeated command a run's own cost is run_seconds in its CSV (sum of its round times)",
        "software": {"fedmnist": __version__, "python": platform.python_version(),
                     "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
                     "flwr": flwr_version},
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": os.cpu_count()},
    }


def _previous_environment(path: Path) -> dict:
    """What an earlier run of this directory recorded in ``ENV_FILE``, or {} if absent or unusable.

    The file is this command's own output; a damaged one, or a FIFO or device in its place, is
    ignored (never read unbounded) and rewritten.
    """
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        previous = json.loads(read_text_capped(path, 1 << 20, "environment record", error=FedMnistError))
    except (FedMnistError, ValueError, RecursionError) as exc:
        log.warning("ignoring %s: %s", quote(path, 200), quote(exc, 200))
        return {}
    if not isinstance(previous, dict) or not isinstance(previous.get("profile", {}), dict) \
            or not isinstance(previous.get("seconds_per_experiment", {}), dict):
        return {}
    return previous


def run_experiments(
    profile_name: str,
    data: str | None,
    out_dir: str | Path,
    only: tuple[str, ...] = EXPERIMENTS,
    quiet: bool = False,
    workers: int | str | None = None,
) -> dict[str, list[dict]]:
    """Run the selected experiments of a profile into ``out_dir`` (simulations in ``workers`` processes)."""
    from fedmnist.data import load_raw_mnist, normalize_images

    if profile_name not in PROFILES:
        raise ConfigError(f"unknown profile '{profile_name}'; choose one of {', '.join(PROFILES)}")
    unknown = [e for e in only if e not in EXPERIMENTS]
    if unknown:
        raise ConfigError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    profile = PROFILES[profile_name]
    WORKERS.clear()
    if workers is not None:
        WORKERS["workers"] = workers
    say = (lambda *_: None) if quiet else (lambda msg: print(msg, flush=True))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mnist = load_raw_mnist(data)
    full_test = (normalize_images(mnist.x_test), mnist.y_test)
    trainer = AGGRESSIVE_TRAINING.build_trainer()
    runners = {
        "course": lambda: run_course(profile, mnist, out_dir, trainer, say),
        "ceiling": lambda: run_ceiling(profile, mnist, out_dir, trainer, full_test, say),
        "drift": lambda: run_drift(profile, mnist, out_dir, trainer, full_test, say),
        "heterogeneity": lambda: run_heterogeneity(profile, mnist, out_dir, trainer, full_test, say),
        "fedprox_mu": lambda: run_fedprox_mu(profile, mnist, out_dir, trainer, full_test, say),
        "attacks": lambda: run_attacks(profile, mnist, out_dir, trainer, full_test, say),
        "mcmahan": lambda: run_mcmahan(profile, mnist, out_dir, trainer, full_test, say),
        "privacy": lambda: run_privacy(profile, mnist, out_dir, trainer, full_test, say),
    }
    results = {}
    env_path = out_dir / ENV_FILE
    for name in only:
        say(f"experiment {name} ({profile.name} profile)")
        t0 = time.perf_counter()
        results[name] = runners[name]()
        # merge with what other runs of the same profile (e.g. --only) recorded in this directory
        previous = _previous_environment(env_path)
        same = previous.get("profile", {}).get("name") == profile.name
        seconds = dict(previous.get("seconds_per_experiment", {})) if same else {}
        seconds[name] = time.perf_counter() - t0
        atomic_write_text(env_path, json.dumps(environment(profile, out_dir, seconds),
                                               indent=2, ensure_ascii=False) + "\n")
    return results
