"""A loopback Flower deployment for tests and benchmarks: one SuperLink, N SuperNodes, the ``flwr`` CLI.

Everything listens on 127.0.0.1 on free ports, without TLS (``--insecure``), with a private
``FLWR_HOME``. Every process started here and every process they start (``flower-superexec``,
``flwr-serverapp``, ``flwr-clientapp``) is recorded by pid, and ``close()`` stops them all: leaves
first, then the SuperNodes, then the SuperLink, then SIGKILL for whatever is left. A SuperNode's
``flower-superexec`` outlives a SIGTERM to its SuperNode, which is why the descendants are recorded
while the processes still run (``track()``), not looked up at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
CONNECTION = "fedmnist-test"
REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nothing listens on right now, on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, depth) of every live descendant of ``pid``, parents before children."""
    tree, out, todo = _children(), [], [(pid, 0)]
    while todo:
        parent, depth = todo.pop(0)
        for child in tree.get(parent, []):
            out.append((child, depth + 1))
            todo.append((child, depth + 1))
    return out


def cmdline(pid: int) -> str:
    """The process's command line, or '' once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def toml_value(value) -> str:
    """A Python value as a TOML value for ``--run-config``/``--node-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def toml_pairs(values: dict) -> str:
    """``key=value`` pairs separated by spaces, values in TOML."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers 200; TimeoutError after ``timeout``, RuntimeError if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{' '.join(process.args)} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


@dataclass
class Started:
    """A process this harness started."""

    name: str
    process: subprocess.Popen
    log: Path
    port: int


@dataclass
class FlowerDeployment:
    """One SuperLink and its SuperNodes under ``root``; use as a context manager or call ``close()``."""

    root: Path
    app_dir: Path = REPO_ROOT
    simulation: bool = False
    startup_timeout: float = 120.0
    link: Started | None = None
    nodes: dict[str, Started] = field(default_factory=dict)
    known: dict[int, int] = field(default_factory=dict)  # pid -> depth below the process we started
    ended_at: float | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.home = self.root / "flwr_home"
        self.logs = self.root / "logs"
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(
            os.environ,
            FLWR_HOME=str(self.home),
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_TELEMETRY_ENABLED="0",
            TF_CPP_MIN_LOG_LEVEL="2",
            COLUMNS="200",
        )

    def __enter__(self) -> FlowerDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- processes ------------------------------------------------------------------------------

    def _start(self, name: str, args: list[str], port: int) -> Started:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as handle:
            process = subprocess.Popen(args, env=self.env, cwd=self.root, stdout=handle,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.known[process.pid] = 0
        return Started(name, process, log, port)

    def start_superlink(self) -> Started:
        """``flower-superlink`` on a free port (``--simulation`` for Flower's simulation engine)."""
        for _ in range(3):  # a free port can be taken between the check and the bind
            port = free_port()
            args = ["flower-superlink", "--insecure", "--host", HOST, "--port", str(port),
                    "--disable-runtime-dependency-installation"]
            if self.simulation:
                args.append("--simulation")
            self.link = self._start("superlink", args, port)
            try:
                wait_http(f"http://{HOST}:{port}/health", self.startup_timeout, self.link.process)
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError(f"flower-superlink did not start; see {self.link.log}")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{HOST}:{self.link.port}"\ninsecure = true\n'
        )
        return self.link

    def start_supernodes(self, node_configs: dict[str, dict], wait: bool = True) -> None:
        """One ``flower-supernode`` per entry (name -> node config), started together.

        With ``wait=False`` call ``wait_supernodes()`` later (e.g. after submitting the run, so the
        ServerApp starts while the SuperNodes do).
        """
        assert self.link is not None, "start the SuperLink first"
        for name, node_config in node_configs.items():
            port = free_port()
            args = ["flower-supernode", "--insecure", "--superlink", f"{HOST}:{self.link.port}",
                    "--host", HOST, "--port", str(port), "--max-wait-time", str(int(self.startup_timeout)),
                    "--node-config", toml_pairs(node_config)]
            self.nodes[name] = self._start(name, args, port)
        if wait:
            self.wait_supernodes()

    def wait_supernodes(self) -> None:
        """Wait until every SuperNode's health endpoint answers."""
        for node in self.nodes.values():
            wait_http(f"http://{HOST}:{node.port}/health", self.startup_timeout, node.process)

    def track(self) -> None:
        """Record every live descendant of the processes started here (call it while they run)."""
        for started in [self.link, *self.nodes.values()]:
            if started is not None:
                for pid, depth in descendants(started.process.pid):
                    self.known[pid] = max(depth, self.known.get(pid, 0))

    def clientapps(self, name: str) -> set[int]:
        """Pids of the ``flwr-clientapp`` processes running under SuperNode ``name``."""
        self.track()
        return {pid for pid, _ in descendants(self.nodes[name].process.pid) if "flwr-clientapp" in cmdline(pid)}

    def kill_supernode(self, name: str) -> None:
        """Stop SuperNode ``name`` as a crash would: SIGTERM to it, SIGKILL to its ClientApp and SuperExec."""
        node = self.nodes[name]
        self.track()
        below = [pid for pid, _ in descendants(node.process.pid)]
        node.process.send_signal(signal.SIGTERM)
        for pid in below:
            _signal(pid, signal.SIGKILL)
        try:
            node.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(timeout=5)

    def close(self) -> list[str]:
        """Stop everything started here; returns the command lines that needed SIGKILL."""
        self.track()
        roots = list(self.nodes.values()) + ([self.link] if self.link else [])
        root_pids = {s.process.pid for s in roots}
        leaves = sorted((p for p in self.known if p not in root_pids), key=lambda p: -self.known[p])
        for pid in leaves:
            _signal(pid, signal.SIGTERM)
        _wait_gone(leaves, 5)
        for group in (list(self.nodes.values()), [self.link] if self.link else []):
            for started in group:
                if started.process.poll() is None:
                    started.process.send_signal(signal.SIGTERM)
            _wait_gone([s.process.pid for s in group], 10)
        self.track()
        killed = []
        for pid in list(self.known):
            if alive(pid):
                killed.append(f"{pid} {cmdline(pid)}")
                _signal(pid, signal.SIGKILL)
        for started in roots:
            with contextlib.suppress(subprocess.TimeoutExpired):
                started.process.wait(timeout=5)
        return killed

    # --- the flwr CLI ---------------------------------------------------------------------------

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` with this deployment's FLWR_HOME; bounded by ``timeout``."""
        # Without a config.toml the CLI would create one whose default connection starts a detached
        # local SuperLink on a fixed port.
        assert (self.home / "config.toml").is_file(), "start the SuperLink first"
        return subprocess.run(["flwr", *args], check=False, env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    @staticmethod
    def _json(result: subprocess.CompletedProcess) -> dict:
        text = result.stdout
        if "{" not in text:
            raise RuntimeError(f"flwr printed no JSON (rc={result.returncode}): {text}{result.stderr}")
        return json.loads(text[text.index("{"):])

    def submit(self, run_config: dict, federation_config: str | None = None) -> int:
        """``flwr run APP CONNECTION --run-config ... --format json``: the new run's id."""
        args = ["run", str(self.app_dir), CONNECTION, "--run-config", toml_pairs(run_config), "--format", "json"]
        if federation_config:
            args += ["--federation-config", federation_config]
        result = self.flwr(*args)
        payload = self._json(result)
        if not payload.get("success"):
            raise RuntimeError(f"flwr run failed: {payload}\n{result.stderr}")
        return int(payload["run-id"])

    def status(self, run_id: int) -> dict:
        """``flwr ls --run-id`` as a dict (``status``, ``status-details``, ...)."""
        return self._json(self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"))["runs"][0]

    def app_processes(self) -> set[int]:
        """Pids of the running ``flwr-serverapp`` / ``flwr-simulation`` processes under the SuperLink."""
        self.track()
        if self.link is None:
            return set()
        return {pid for pid, _ in descendants(self.link.process.pid)
                if any(name in cmdline(pid) for name in ("flwr-serverapp", "flwr-simulation"))}

    def wait_finished(self, run_id: int, timeout: float, fallback_poll: float = 120.0) -> dict:
        """Wait until the run is ``finished:*`` and return its ``status``; TimeoutError after ``timeout``.

        Each ``flwr ls`` costs seconds of CPU (the CLI's imports), so the run's end is watched in /proc:
        once the ServerApp process seen running is gone, ``flwr ls`` confirms; it is also asked every
        ``fallback_poll`` seconds in case the process was never seen. ``ended_at`` is the
        ``time.perf_counter()`` at which the ServerApp process was found gone (None if it never was).
        """
        deadline = time.monotonic() + timeout
        seen: set[int] = set()
        next_ask = time.monotonic() + fallback_poll
        run: dict = {}
        self.ended_at = None
        while True:
            running = self.app_processes()
            seen |= running
            ended = bool(seen) and not running
            if ended:
                self.ended_at = time.perf_counter()
                seen = set()
            if ended or time.monotonic() >= next_ask:
                for _ in range(10 if ended else 1):
                    run = self.status(run_id)
                    if str(run.get("status", "")).startswith("finished"):
                        return run
                    if ended:
                        time.sleep(1.0)
                next_ask = time.monotonic() + fallback_poll
            if time.monotonic() >= deadline:
                raise TimeoutError(f"run {run_id} still {run.get('status')!r} after {timeout:g} s:\n"
                                   + self.server_log(run_id))
            time.sleep(0.5)

    def server_log(self, run_id: int) -> str:
        """The ServerApp's log (``flwr log RUN --show``)."""
        try:
            result = self.flwr("log", str(run_id), CONNECTION, "--show", timeout=60)
        except subprocess.TimeoutExpired:
            return "(flwr log timed out)"
        return result.stdout + result.stderr
