"""A secured Flower deployment on loopback: TLS on every SuperLink API and SuperNode authentication.

One SuperLink with TLS (a CA and a server certificate generated here) and ``--enable-supernode-auth``;
two SuperNode keys registered with ``flwr supernode register``. Then:

- the SuperLink speaks only TLS, and only to clients that trust its CA;
- a SuperNode with an unregistered key, or with none, is refused and exits;
- a SuperNode that trusts another CA cannot connect, even with a registered key;
- the two registered SuperNodes join and train a round, and only they are sampled.

The README's section "Seguridad: --insecure, TLS y autenticación de nodos" documents these steps: its
certificate and key commands are run here, and its Flower commands are compared, token by token, with
the ones these tests run (built by the same functions of ``tests/flower_harness.py``).
"""

from __future__ import annotations

import http.client
import json
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import threading
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from flower_harness import (
    HOST,
    FlowerDeployment,
    TlsFiles,
    alive,
    connection_table,
    connection_toml,
    register_args,
    superlink_args,
    supernode_args,
    write_certificate_authority,
    write_node_keys,
    write_server_certificate,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED = 42
EXIT_TIMEOUT = 120.0  # a refused SuperNode exits once it has imported Flower and tried (~10 s when quiet)
RUN_TIMEOUT = 600.0  # one round on two tiny partitions: well under a minute on a quiet 2-core machine

# The placeholders of the README's commands (its example paths, the default ports).
DOC_TLS = Path("/srv/fedmnist/tls")
DOC_MEMBER = Path("/home/ana/fedmnist")
DOC_LINK_PORT, DOC_NODE_PORT = 9092, 9094
DOC_CONNECTION = "equipo"


# --- the README's section ----------------------------------------------------------------------


def _security_section() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("### Seguridad")
    end = text.find("\n### ", start + 1)
    return text[start:end if end >= 0 else None]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", _security_section(), flags=re.S)


def _documented_commands(program: str) -> list[list[str]]:
    """Every command of the section's bash blocks that starts with ``program``, split as the shell would."""
    found = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[: len(program.split())] == program.split():
                found.append(words)
    return found


def test_documented_flower_commands_are_the_ones_the_tests_run():
    doc_tls = TlsFiles(DOC_TLS / "ca.crt", DOC_TLS / "servidor.pem", DOC_TLS / "servidor.key")
    address = f"{HOST}:{DOC_LINK_PORT}"

    assert _documented_commands("flower-superlink") == [
        superlink_args(DOC_LINK_PORT, doc_tls, supernode_auth=True)
    ]
    assert _documented_commands("flower-supernode") == [
        supernode_args(address, DOC_NODE_PORT, {"data-file": str(DOC_MEMBER / "datos" / "cliente_1.npz")},
                       root_certificates=DOC_MEMBER / "tls" / "ca.crt",
                       private_key=DOC_MEMBER / "tls" / "nodo1")
    ]
    assert _documented_commands("flwr supernode register") == [
        ["flwr", *register_args(DOC_TLS / "nodo1.pub", DOC_CONNECTION)]
    ]
    (config,) = [tomllib.loads(block) for block in _blocks("toml")]
    expected = connection_toml(DOC_CONNECTION, connection_table(address, DOC_TLS / "ca.crt"))
    assert config == tomllib.loads(expected)


# --- certificates and keys ---------------------------------------------------------------------


def _handshake(cert: Path, key: Path, cafile: Path, hostname: str = HOST) -> None:
    """A TLS handshake between a server holding ``cert``/``key`` and a client trusting ``cafile``.

    The client checks as strictly as OpenSSL allows (``VERIFY_X509_STRICT``, the default of newer
    Pythons); a refused certificate raises ``ssl.SSLCertVerificationError``.
    """
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cafile))
    client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    server = server_context.wrap_socket(left, server_side=True, do_handshake_on_connect=False)
    client = client_context.wrap_socket(right, server_hostname=hostname, do_handshake_on_connect=False)
    with server, client:
        thread = threading.Thread(target=lambda: _quietly(server.do_handshake), daemon=True)
        thread.start()
        try:
            client.do_handshake()
        finally:
            thread.join(10)


def _quietly(call) -> None:
    try:
        call()
    except (ssl.SSLError, OSError):
        pass  # the client's side reports why


def _check_tls_material(ca: Path, cert: Path, key: Path, other_ca: Path) -> None:
    _handshake(cert, key, ca, HOST)
    _handshake(cert, key, ca, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(cert, key, other_ca)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"(?i)mismatch"):
        _handshake(cert, key, ca, "fedmnist.example")


def _check_node_keys(private: Path, public: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    # what flower-supernode --auth-supernode-private-key and flwr supernode register read
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    pub = serialization.load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    assert pub.public_numbers() == key.public_key().public_numbers()
    assert private.stat().st_mode & 0o077 == 0  # not readable by others


def test_generated_material_is_what_tls_and_flower_accept(tmp_path):
    ca, ca_key = write_certificate_authority(tmp_path / "tls")
    tls = write_server_certificate(tmp_path / "tls", ca, ca_key)
    other_ca, _ = write_certificate_authority(tmp_path / "otra", "otra CA")

    _check_tls_material(tls.ca_cert, tls.server_cert, tls.server_key, other_ca)
    _check_node_keys(*write_node_keys(tmp_path / "claves", "nodo1"))


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                    reason="the README's commands need the openssl and ssh-keygen programs")
def test_documented_certificate_and_key_commands_give_working_material(tmp_path):
    blocks = [b for b in _blocks("bash") if re.search(r"^(openssl|ssh-keygen) ", b, flags=re.M)]
    assert len(blocks) == 2, "expected one block of openssl commands and one of ssh-keygen"
    for block in blocks:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], check=False, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
    other_ca, _ = write_certificate_authority(tmp_path / "otra", "otra CA")

    _check_tls_material(tmp_path / "ca.crt", tmp_path / "servidor.pem", tmp_path / "servidor.key", other_ca)
    _check_node_keys(tmp_path / "nodo1", tmp_path / "nodo1.pub")
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0


# --- the deployment ----------------------------------------------------------------------------


class Secured:
    """The module's deployment: a TLS SuperLink with SuperNode authentication and two registered keys."""

    def __init__(self, root: Path, federation: Path):
        self.federation = federation
        ca, ca_key = write_certificate_authority(root / "tls")
        self.tls = write_server_certificate(root / "tls", ca, ca_key)
        self.other_ca, _ = write_certificate_authority(root / "otra_ca", "otra CA")
        self.keys = {name: write_node_keys(root / "claves", name) for name in ("nodo1", "nodo2", "intruso")}
        self.flower = FlowerDeployment(root / "deployment", tls=self.tls, supernode_auth=True)
        self.ids: dict[str, int] = {}
        self.ports: list[int] = []

    def start(self) -> None:
        self.flower.start_superlink()
        self.ports.append(self.flower.link.port)
        for name in ("nodo1", "nodo2"):
            self.ids[name] = self.flower.register_supernode(self.keys[name][1])

    def node(self, name: str, client: int, private_key: Path | None, trust: Path | None = None) -> None:
        from fedmnist.data import client_file

        started = self.flower.start_supernode(name, {"data-file": str(client_file(self.federation, client))},
                                              private_key=private_key, trust=trust)
        self.ports.append(started.port)


@pytest.fixture(scope="module")
def secured(tmp_path_factory, small_federation):
    """The module's ``Secured`` deployment; afterwards every process is gone and every port free."""
    deployment = Secured(tmp_path_factory.mktemp("seguro"), small_federation)
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.flower.close()
    leftover = [pid for pid in deployment.flower.known if alive(pid)]
    assert not leftover, f"processes left running: {leftover}"
    for port in deployment.ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections may linger
            s.bind((HOST, port))  # still raises if anything listens there


def _health(url: str, cafile: Path | None = None) -> int:
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return response.status


@pytest.mark.slow
def test_superlink_speaks_only_tls_to_clients_that_trust_its_ca(secured):
    port = secured.flower.link.port

    assert _health(f"https://{HOST}:{port}/health", secured.tls.ca_cert) == 200
    with pytest.raises(urllib.error.URLError) as refused:
        _health(f"https://{HOST}:{port}/health", secured.other_ca)
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)
    with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP is not served
        _health(f"http://{HOST}:{port}/health")


@pytest.mark.slow
def test_unregistered_or_keyless_supernodes_are_refused(secured):
    secured.node("intruso", 3, private_key=secured.keys["intruso"][0])
    secured.node("sin_clave", 3, private_key=None)  # would register itself on a SuperLink without auth

    logs = {}
    for name in ("intruso", "sin_clave"):
        code, logs[name] = secured.flower.wait_exit(name, EXIT_TIMEOUT)
        assert code != 0, logs[name]
        assert "Failed to initialize the connection to the SuperLink" in logs[name], logs[name]
    # the SuperLink's reasons, as the SuperNodes report them
    assert "Failed to activate SuperNode" in logs["intruso"], logs["intruso"]
    assert "must be registered" in logs["sin_clave"], logs["sin_clave"]
    # the SuperLink knows only the two registered keys, still waiting for their SuperNodes
    statuses = secured.flower.supernode_statuses()
    assert set(statuses) == set(secured.ids.values()), statuses


@pytest.mark.slow
def test_supernode_trusting_another_ca_cannot_connect(secured):
    secured.node("otra_ca", 2, private_key=secured.keys["nodo2"][0], trust=secured.other_ca)

    code, log = secured.flower.wait_exit("otra_ca", EXIT_TIMEOUT)

    assert code != 0, log
    assert "Failed to initialize the connection to the SuperLink" in log, log
    assert "CERTIFICATE_VERIFY_FAILED" in log, log
    # its key is registered, yet it never got as far as presenting it
    assert secured.flower.supernode_statuses()[secured.ids["nodo2"]] == "registered"


@pytest.mark.slow
def test_registered_supernodes_join_and_train_a_round(secured, tmp_path):
    from fedmnist.data import common_test_file
    from fedmnist.exchange import load_global

    out = tmp_path / "salida"
    secured.node("nodo1", 1, private_key=secured.keys["nodo1"][0])
    secured.node("nodo2", 2, private_key=secured.keys["nodo2"][0])
    run_config = {
        "num-server-rounds": 1, "local-epochs": 1, "batch-size": 32, "optimizer": "adam",
        "learning-rate": 0.001, "momentum": 0.0, "method": "fedavg", "seed": SEED,
        "min-train-nodes": 2, "min-available-nodes": 2, "wait-nodes-timeout": 120.0, "round-timeout": 300.0,
        "output-dir": str(out), "test-file": str(common_test_file(secured.federation)),
    }

    run_id = secured.flower.submit(run_config)  # its ServerApp waits for the two SuperNodes
    secured.flower.wait_supernodes(["nodo1", "nodo2"])
    run = secured.flower.wait_finished(run_id, RUN_TIMEOUT)

    assert run["status"] == "finished:completed", secured.flower.server_log(run_id)
    assert secured.flower.supernode_statuses() == dict.fromkeys(secured.ids.values(), "online")
    (row,) = json.loads((out / "metricas_por_ronda.json").read_text())["rounds"]
    assert sorted(row["sampled_nodes"]) == sorted(secured.ids.values())  # no one else was there to sample
    assert row["num_sampled"] == row["num_replies"] == 2 and row["replied_clients"] == [1, 2]
    assert load_global(out / "pesos_globales_ronda_1.pkl").round == 1
    assert (out / "modelo_global_fedavg.h5").is_file()
    assert all(secured.flower.nodes[name].process.poll() is None for name in ("nodo1", "nodo2"))

