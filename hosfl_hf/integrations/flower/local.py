"""Flower on this machine: one `flower-superlink` and N `flower-supernode`s on 127.0.0.1 (the Deployment Engine), or
one simulation SuperLink (`simulation=True`, N simulated nodes), then `flwr run`. For trying Flower locally, tests and
benchmarks; every process it starts is stopped by pid (its process group) when the context exits.

By default it runs with `--insecure` (local tests only). With `secure=True` it runs as a production deployment
should: TLS on the SuperLink (a test CA and server certificate made here with `cryptography`) and SuperNode
authentication (each node's key registered with `flwr supernode register`; an unregistered node is refused). See
docs/federated.md for a real deployment, where the certificates come from your own CA."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import write_app

__all__ = [
    "LocalDeployment",
    "free_port",
    "run_config_string",
    "stop_process",
    "write_node_key",
    "write_test_certificates",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stops a process started with `start_new_session=True` and everything in its group: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_config_string(config: Mapping[str, Any]) -> str:
    """`--run-config` syntax: space-separated `key=value`, strings in double quotes."""
    from .config import toml_value

    return " ".join(f"{k}={toml_value(v)}" for k, v in config.items())


def write_test_certificates(folder: str | os.PathLike, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> dict:
    """A throw-away CA and a SuperLink certificate for `hosts` (valid one day), as PEM files in `folder`; returns
    their paths (`ca`, `certificate`, `key`). For tests and local trials only: a real deployment uses its own CA."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(subject: str, issuer: x509.Name | None, public_key, signing_key, extensions):
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = issue("hosfl-hf test CA", None, ca_key.public_key(), ca_key, [(x509.BasicConstraints(True, None), True)])
    key = ec.generate_private_key(ec.SECP384R1())
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    san = x509.SubjectAlternativeName(names)
    certificate = issue(hosts[-1], ca.subject, key.public_key(), ca_key, [(san, False)])
    paths = {"ca": folder / "ca.pem", "certificate": folder / "superlink.pem", "key": folder / "superlink.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["certificate"].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    paths["key"].write_bytes(private)
    os.chmod(paths["key"], 0o600)
    return paths


def write_node_key(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """A SuperNode authentication key pair (ECDSA P-384, OpenSSH format, what `flower-supernode
    --auth-supernode-private-key` and `flwr supernode register` read); returns `(private, public)` paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    os.chmod(private, 0o600)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


class LocalDeployment(contextlib.AbstractContextManager):
    """`with LocalDeployment(num_nodes=3, state_dir=...) as d: d.run(run_config)`.

    Args:
        num_nodes: SuperNodes to start; node `i` gets `partition-id=i num-partitions=num_nodes state-dir=...`. With
            `simulation=True`, the number of simulated nodes (Flower gives them `partition-id`/`num-partitions`;
            the state folder then comes from the run config's `state-dir`).
        simulation: start a simulation SuperLink instead of SuperNodes.
        state_dir: the clients' state folder (node config `state-dir`).
        workdir: where the processes run and `FLWR_HOME` lives (a temporary folder by default); every process logs
            to `logs/<name>.log` there.
        connect_timeout: seconds to wait for the SuperLink's port.
        secure: TLS and SuperNode authentication instead of `--insecure` (deployment only): certificates in
            `tls/`, node keys in `keys/`, every started node's public key registered before it starts.
    """

    def __init__(
        self,
        num_nodes: int,
        state_dir: str | os.PathLike,
        workdir: str | os.PathLike | None = None,
        connect_timeout: float = 60.0,
        simulation: bool = False,
        secure: bool = False,
    ):
        if secure and simulation:
            raise ValueError("secure=True is for the deployment (SuperNodes); a simulation has no network to secure.")
        self.secure = secure
        self.num_nodes = num_nodes
        self.simulation = simulation
        self.state_dir = str(state_dir)
        self._tmp = tempfile.TemporaryDirectory() if workdir is None else None
        self.workdir = Path(workdir if workdir is not None else self._tmp.name)
        self.connect_timeout = connect_timeout
        self.port = free_port()
        self.processes: list[subprocess.Popen] = []
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tls = write_test_certificates(self.workdir / "tls") if secure else None
        transport = f'root-certificates = "{self.tls["ca"]}"' if secure else "insecure = true"
        connection = (
            f'[superlink]\ndefault = "local"\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n{transport}\n'
        )
        self.node_processes: dict[int, subprocess.Popen] = {}
        # The simulation's size goes to `flwr run --federation-config` (flwr 1.42 deprecates `options.*` here).
        (home / "config.toml").write_text(connection)
        # SuperLink and SuperNodes start flower-superexec / flwr-serverapp / flwr-clientapp from PATH.
        self.env = dict(os.environ, FLWR_HOME=str(home))
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")

    def _start(self, name: str, *command: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                command, env=self.env, cwd=self.workdir, start_new_session=True, stdout=log, stderr=subprocess.STDOUT
            )
        self.processes.append(process)
        return process

    def flwr(self, *arguments: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Runs `flwr <arguments>` against this deployment's SuperLink (bounded; never raises on its exit code)."""
        return subprocess.run(
            ["flwr", *arguments], env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout
        )

    def register(self, public_key: str | os.PathLike) -> None:
        """Registers a SuperNode's public key with the SuperLink (`flwr supernode register`)."""
        done = self.flwr("supernode", "register", str(public_key), "local")
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def supernodes(self) -> list[dict]:
        """The SuperNodes the SuperLink knows (`flwr supernode list --format json`): node ids and status."""
        import json

        done = self.flwr("supernode", "list", "local", "--format", "json")
        text = done.stdout[done.stdout.find("{") :]
        return json.loads(text).get("nodes", []) if text else []

    def start_node(
        self, partition: int, private_key: str | os.PathLike | None = None, name: str | None = None
    ) -> subprocess.Popen:
        """Starts one SuperNode for `partition` (with `secure`, authenticated by `private_key`)."""
        node_config = f'partition-id={partition} num-partitions={self.num_nodes} state-dir="{self.state_dir}"'
        if self.secure:
            security = ["--root-certificates", str(self.tls["ca"]), "--auth-supernode-private-key", str(private_key)]
        else:
            security = ["--insecure"]
        return self._start(
            name or f"supernode-{partition}",
            "flower-supernode",
            *security,
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
            "--max-retries",
            "20",
            "--max-wait-time",
            "60",
        )

    def __enter__(self) -> LocalDeployment:
        try:
            mode = ["--simulation"] if self.simulation else []
            if self.secure:
                tls = self.tls
                mode += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["certificate"])]
                mode += ["--ssl-keyfile", str(tls["key"]), "--enable-supernode-auth"]
            else:
                mode.append("--insecure")
            self._start(
                "superlink",
                "flower-superlink",
                *mode,
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            )
            self._wait_for_port()
            for partition in range(0 if self.simulation else self.num_nodes):
                key = None
                if self.secure:
                    key, public = write_node_key(self.workdir / "keys", f"node-{partition}")
                    self.register(public)
                self.node_processes[partition] = self.start_node(partition, key)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_for_port(self) -> None:
        deadline = time.monotonic() + self.connect_timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"flower-superlink did not open 127.0.0.1:{self.port} within {self.connect_timeout} s.")

    def run(
        self, run_config: Mapping[str, Any], app_dir: str | os.PathLike | None = None, timeout: float = 900.0
    ) -> tuple[int | None, str]:
        """`flwr run app_dir local --stream --run-config ...` (bounded); returns `(exit code, output)`. `flwr run`
        exits 0 even when the ServerApp failed: judge a run by what it wrote. By default the app folder is written
        by [`write_app`] into the work folder."""
        if app_dir is None:
            app_dir = write_app(self.workdir / "app")
        command = ["flwr", "run", str(app_dir), "local", "--stream", "--run-config", run_config_string(run_config)]
        if self.simulation:
            command += ["--federation-config", f"num-supernodes={self.num_nodes} client-resources-num-cpus=1"]
        process = subprocess.Popen(
            command,
            env=self.env,
            cwd=self.workdir,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            output = ""
        finally:
            stop_process(process)
        return process.returncode, output

    def close(self) -> None:
        for process in reversed(self.processes):
            stop_process(process)
        self.processes.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __exit__(self, *exc: Any) -> None:
        self.close()
