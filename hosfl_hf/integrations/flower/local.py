"""Flower on this machine: one `flower-superlink` and N `flower-supernode`s on 127.0.0.1 (the Deployment Engine), or
one simulation SuperLink (`simulation=True`, N simulated nodes), then `flwr run`. For trying Flower locally, tests and
benchmarks; every process it starts is stopped by pid (its process group) when the context exits. Local only: it runs
with `--insecure` (see docs/federated.md for a real deployment)."""

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

__all__ = ["LocalDeployment", "free_port", "run_config_string", "stop_process"]


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
    return " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in config.items())


class LocalDeployment(contextlib.AbstractContextManager):
    """`with LocalDeployment(num_nodes=3, state_dir=...) as d: d.run(run_config)`.

    Args:
        num_nodes: SuperNodes to start; node `i` gets `partition-id=i num-partitions=num_nodes state-dir=...`. With
            `simulation=True`, the number of simulated nodes (Flower gives them `partition-id`/`num-partitions`;
            the state folder then comes from the run config's `state-dir`).
        simulation: start a simulation SuperLink instead of SuperNodes.
        state_dir: the clients' state folder (node config `state-dir`).
        workdir: where the processes run and `FLWR_HOME` lives (a temporary folder by default).
        connect_timeout: seconds to wait for the SuperLink's port.
    """

    def __init__(
        self,
        num_nodes: int,
        state_dir: str | os.PathLike,
        workdir: str | os.PathLike | None = None,
        connect_timeout: float = 60.0,
        simulation: bool = False,
    ):
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
        connection = (
            f'[superlink]\ndefault = "local"\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        if simulation:
            connection += f"options.num-supernodes = {num_nodes}\noptions.backend.client-resources.num-cpus = 1\n"
        (home / "config.toml").write_text(connection)
        # SuperLink and SuperNodes start flower-superexec / flwr-serverapp / flwr-clientapp from PATH.
        self.env = dict(os.environ, FLWR_HOME=str(home))
        self.env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + self.env.get("PATH", "")

    def _start(self, *command: str) -> None:
        self.processes.append(
            subprocess.Popen(
                command,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def __enter__(self) -> LocalDeployment:
        try:
            mode = ["--simulation"] if self.simulation else []
            self._start(
                "flower-superlink",
                *mode,
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            )
            self._wait_for_port()
            for partition in range(0 if self.simulation else self.num_nodes):
                node_config = f'partition-id={partition} num-partitions={self.num_nodes} state-dir="{self.state_dir}"'
                self._start(
                    "flower-supernode",
                    "--insecure",
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
        process = subprocess.Popen(
            ["flwr", "run", str(app_dir), "local", "--stream", "--run-config", run_config_string(run_config)],
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
