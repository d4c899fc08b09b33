"""A loopback Flower deployment for tests and benchmarks: one SuperLink, N SuperNodes, the ``flwr`` CLI.

Everything listens on 127.0.0.1 on free ports with a private ``FLWR_HOME``: without TLS
(``--insecure``) by default, or with TLS and SuperNode authentication (``tls=``, ``supernode_auth=``)
from certificates and keys written by ``write_certificate_authority``, ``write_server_certificate`` and
``write_node_keys``. The command lines are built by pure functions (``superlink_args``,
``supernode_args``, ``register_args``, ``connection_table``) so tests can compare them with the README's.

Every process started here and every process they start (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``) is recorded by pid, and ``close()`` stops them all: leaves
first, then the SuperNodes, then the SuperLink, then SIGKILL for whatever is left. A SuperNode's
``flower-superexec`` outlives a SIGTERM to its SuperNode, which is why the descendants are recorded
while the processes still run (``track()``), not looked up at the end.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Sequence
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


def wait_http(url: str, timeout: float, process: subprocess.Popen | None = None,
              cafile: Path | None = None) -> None:
    """Wait until ``url`` answers 200; TimeoutError after ``timeout``, RuntimeError if ``process`` exits.

    An ``https://`` URL is verified against ``cafile`` (the CA that signed the server's certificate).
    """
    context = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{' '.join(process.args)} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


# --- TLS material and command lines --------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS files: the CA that signed its certificate, the certificate and its key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_certificate_authority(directory: Path, name: str = "fedmnist CA",
                                days: int = 2) -> tuple[Path, Path]:
    """A self-signed CA (EC P-384) as ``ca.crt``/``ca.key`` in ``directory``: (certificate, key).

    The same files as the README's ``openssl req -x509 ...`` line; written with ``cryptography`` (a
    Flower dependency) so the tests need no ``openssl`` binary.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, _pem_key(key))
    return cert_path, key_path


def write_server_certificate(directory: Path, ca_cert: Path, ca_key: Path,
                             hosts: Sequence[str] = (HOST, "localhost"), days: int = 2) -> TlsFiles:
    """``servidor.pem``/``servidor.key`` signed by the CA, naming ``hosts`` (IPs or DNS names) as SANs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    authority = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    authority_key = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmnist SuperLink")]))
        .issuer_name(authority.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority_key.public_key()),
                       critical=False)
        .sign(authority_key, hashes.SHA384())
    )
    cert_path, key_path = directory / "servidor.pem", directory / "servidor.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, _pem_key(key))
    return TlsFiles(Path(ca_cert), cert_path, key_path)


def write_node_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair as ``ssh-keygen -t ecdsa -b 384 -N "" -f NAME`` writes it: (private, public).

    OpenSSH format, which is what ``flower-supernode --auth-supernode-private-key`` and
    ``flwr supernode register`` read.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / name, directory / f"{name}.pub"
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    openssh = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH)
    public.write_bytes(openssh + b" " + name.encode() + b"\n")
    return private, public


def superlink_args(port: int, tls: TlsFiles | None = None, supernode_auth: bool = False,
                   simulation: bool = False, host: str = HOST) -> list[str]:
    """The ``flower-superlink`` command line: ``--insecure``, or TLS (and SuperNode authentication)."""
    if tls is None:
        if supernode_auth:
            raise ValueError("SuperNode authentication needs TLS")
        security = ["--insecure"]
    else:
        security = ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                    "--ssl-keyfile", str(tls.server_key)]
        if supernode_auth:
            security.append("--enable-supernode-auth")
    args = ["flower-superlink", *security, "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    return [*args, "--simulation"] if simulation else args


def supernode_args(superlink: str, port: int, node_config: dict, root_certificates: Path | None = None,
                   private_key: Path | None = None, max_wait_time: float | None = None,
                   host: str = HOST) -> list[str]:
    """The ``flower-supernode`` command line: ``--insecure`` unless it trusts ``root_certificates``."""
    if root_certificates is None:
        if private_key is not None:
            raise ValueError("SuperNode authentication needs TLS")
        security = ["--insecure"]
    else:
        security = ["--root-certificates", str(root_certificates)]
        if private_key is not None:
            security += ["--auth-supernode-private-key", str(private_key)]
    args = ["flower-supernode", *security, "--superlink", superlink, "--host", host, "--port", str(port)]
    if max_wait_time is not None:
        args += ["--max-wait-time", str(int(max_wait_time))]
    return [*args, "--node-config", toml_pairs(node_config)]


def register_args(public_key: Path, connection: str) -> list[str]:
    """``flwr`` arguments that register a SuperNode's public key with the SuperLink of ``connection``."""
    return ["supernode", "register", str(public_key), connection]


def connection_table(address: str, root_certificates: Path | None = None) -> dict:
    """One ``[superlink.NAME]`` table of ``config.toml``: ``insecure = true`` or the CA to trust."""
    if root_certificates is None:
        return {"address": address, "insecure": True}
    return {"address": address, "root-certificates": str(root_certificates)}


def connection_toml(name: str, table: dict) -> str:
    """A ``config.toml`` whose default connection ``name`` is ``table``."""
    lines = [f'[superlink]\ndefault = "{name}"\n', f"[superlink.{name}]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


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
    tls: TlsFiles | None = None  # None: --insecure everywhere
    supernode_auth: bool = False  # --enable-supernode-auth (needs tls)
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
        ca = self.tls.ca_cert if self.tls else None
        scheme = "https" if self.tls else "http"
        for _ in range(3):  # a free port can be taken between the check and the bind
            port = free_port()
            args = superlink_args(port, self.tls, self.supernode_auth, self.simulation)
            self.link = self._start("superlink", args, port)
            try:
                wait_http(f"{scheme}://{HOST}:{port}/health", self.startup_timeout, self.link.process, ca)
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError(f"flower-superlink did not start; see {self.link.log}")
        table = connection_table(f"{HOST}:{self.link.port}", ca)
        (self.home / "config.toml").write_text(connection_toml(CONNECTION, table))
        return self.link

    def start_supernodes(self, node_configs: dict[str, dict], wait: bool = True) -> None:
        """One ``flower-supernode`` per entry (name -> node config), started together.

        With ``wait=False`` call ``wait_supernodes()`` later (e.g. after submitting the run, so the
        ServerApp starts while the SuperNodes do).
        """
        for name, node_config in node_configs.items():
            self.start_supernode(name, node_config, max_wait_time=self.startup_timeout)
        if wait:
            self.wait_supernodes()

    def start_supernode(self, name: str, node_config: dict, private_key: Path | None = None,
                        trust: Path | None = None, max_wait_time: float | None = None) -> Started:
        """Start one ``flower-supernode`` named ``name`` (not waited for).

        With TLS it trusts ``trust`` (default: the deployment's CA) and authenticates with
        ``private_key`` when given. ``max_wait_time`` bounds its reconnection attempts (None: no
        ``--max-wait-time``, as in the README's commands).
        """
        assert self.link is not None, "start the SuperLink first"
        ca = (trust or self.tls.ca_cert) if self.tls else None
        port = free_port()
        args = supernode_args(f"{HOST}:{self.link.port}", port, node_config, ca, private_key, max_wait_time)
        self.nodes[name] = self._start(name, args, port)
        return self.nodes[name]

    def wait_exit(self, name: str, timeout: float) -> tuple[int, str]:
        """Wait until SuperNode ``name`` exits (exit code, its log); TimeoutError after ``timeout``.

        Its children are recorded meanwhile (``track()``), so that ``close()`` also stops any it orphans.
        """
        node = self.nodes[name]
        deadline = time.monotonic() + timeout
        while node.process.poll() is None:
            self.track()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{name} still running after {timeout:g} s:\n{node.log.read_text()}")
            time.sleep(0.2)
        return node.process.returncode, node.log.read_text(errors="replace")

    def wait_supernodes(self, names: Sequence[str] | None = None) -> None:
        """Wait until the health endpoint of SuperNodes ``names`` (default: all) answers."""
        for node in (self.nodes[n] for n in names) if names is not None else self.nodes.values():
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

    def register_supernode(self, public_key: Path) -> int:
        """``flwr supernode register PUBLIC_KEY CONNECTION``: the node id the SuperLink gives the key."""
        result = self.flwr(*register_args(public_key, CONNECTION))
        match = re.search(r"SuperNode (\d+) registered", result.stdout)
        if result.returncode != 0 or match is None:
            raise RuntimeError(f"flwr supernode register failed (rc={result.returncode}): "
                               f"{result.stdout}{result.stderr}")
        return int(match.group(1))

    def supernode_statuses(self) -> dict[int, str]:
        """``flwr supernode list --format json``: node id -> status (registered, online, offline, ...)."""
        nodes = self._json(self.flwr("supernode", "list", CONNECTION, "--format", "json"))["nodes"]
        return {int(node["node-id"]): node["status"] for node in nodes}

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
