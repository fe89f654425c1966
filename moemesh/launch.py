"""A cluster on this machine: a coordinator and workers as separate processes, started with the same
commands a user types, for `moemesh demo`, the benchmarks and the tests. Wait until it serves, then tear
everything down. Traffic stays on `host` (127.0.0.1 unless a test's own network namespaces). The processes
stop when the launcher is gone, even if it dies without tearing them down."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .process import LIFELINE_FD

if TYPE_CHECKING:
    from .client import ClusterModel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, model: Path, workers: int, logdir: Path, coordinator_args: list[str] = (),
                 worker_args: list[str] = (), mdns: bool = False, prefix: list[str] = (), host: str = "127.0.0.1",
                 env: dict[str, str] | None = None):
        self.model, self.logdir, self.host = model, logdir, host
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: list = []
        # Idle OpenMP threads spin ~300k iterations before sleeping (libgomp's default): fine for one process
        # per machine, but processes sharing cores then steal them from each other on every step.
        self.env = os.environ | {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "GOMP_SPINCOUNT": "10000"} | (env or {})
        # The children must not outlive this process: each watches a pipe whose write end only this process holds
        # (moemesh.process.stop_on_signals). No preexec_fn: it would run Python's fork handlers in the child, and
        # gRPC's, with this process's channels open, can kill the child before it execs.
        self._lifeline, self._lifeline_w = os.pipe()
        mdns_args = ["--mdns-interface", host] if mdns else ["--no-mdns"]
        self.start("coordinator", [*prefix, sys.executable, "-m", "moemesh.cli", "coordinator", "start", "--model",
                                   str(model), "--host", host, "--port", str(self.port), "--expect", str(workers),
                                   *mdns_args, *coordinator_args])
        for i in range(workers):
            self.add_worker(f"w{i + 1}", [*worker_args, *([] if mdns else ["--coordinator", self.target])],
                            mdns_args=mdns_args, prefix=prefix)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "w")
        self.logs.append(log)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=(env or self.env) | {LIFELINE_FD: str(self._lifeline)}, pass_fds=(self._lifeline,))
        self.procs[name] = proc
        return proc

    def add_worker(self, name: str, args: list[str] = (), env: dict | None = None, mdns_args: list[str] | None = None,
                   prefix: list[str] = (), host: str | None = None) -> subprocess.Popen:
        return self.start(name, [*prefix, sys.executable, "-m", "moemesh.cli", "worker", "join", "--name", name,
                                 "--host", host or self.host, *(mdns_args or ["--no-mdns"]), *args], env)

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text()

    def wait_ready(self, timeout: float = 300.0, nodes: int | None = None) -> ClusterModel:
        """Wait until the coordinator serves (and, with `nodes`, has that many serving workers)."""
        from .client import ClusterModel  # torch: imported while the processes start, not before

        deadline = time.monotonic() + timeout
        model = None
        while time.monotonic() < deadline:
            if self.procs["coordinator"].poll() is not None:
                raise RuntimeError("the coordinator exited:\n" + self.log("coordinator"))
            try:
                if model is None and self._listening():
                    model = ClusterModel(self.target, timeout=5)
                if model is not None:
                    status = model.status()
                    serving = [n for n in status.nodes if n.state == "serving"]
                    if status.state == "ready" and (nodes is None or len(serving) == nodes):
                        return model
            except (ConnectionError, RuntimeError):
                pass
            time.sleep(0.1)
        raise TimeoutError("the cluster did not become ready:\n" + "\n".join(
            f"--- {n}\n{self.log(n)}" for n in self.procs))

    def _listening(self) -> bool:
        """Whether the coordinator accepts connections yet. Asked before gRPC is: a gRPC connection refused once
        waits a second or more before it tries again."""
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def kill(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        for log in self.logs:
            log.close()
        os.close(self._lifeline)
        os.close(self._lifeline_w)
