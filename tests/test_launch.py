"""A local cluster's processes end with the process that launched them, however it ends: the launcher's pipe
closes and each of them stops."""

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from procs import running

from moemesh.demo import build_demo_checkpoint
from moemesh.process import LIFELINE_FD

LAUNCHER = """
import json, sys
from pathlib import Path
from moemesh.launch import LocalCluster

cluster = LocalCluster(Path(sys.argv[1]), 2, Path(sys.argv[2]), ["--split", "even", "--dtype", "float32"])
cluster.wait_ready(nodes=2, timeout=150)
print(json.dumps({name: proc.pid for name, proc in cluster.procs.items()}), flush=True)
sys.stdin.read()  # until it is killed
"""

WATCHER = """
import asyncio
from moemesh.process import stop_on_signals

async def main():
    stop = stop_on_signals()
    print("watching", flush=True)
    await stop.wait()
    print("stopping", flush=True)

asyncio.run(main())
"""


def first_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout:.0f} s"
    return proc.stdout.readline()


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still running after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def start(script: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, start_new_session=True, **kwargs)


def kill_all(procs: list[subprocess.Popen], pids: list[int]) -> None:
    for pid in [p.pid for p in procs] + pids:
        if running(pid):
            os.killpg(pid, signal.SIGKILL)
    for proc in procs:
        proc.wait(10)


def test_cluster_processes_end_with_a_killed_launcher(tmp_path):
    ckpt = build_demo_checkpoint(tmp_path / "demo")
    launcher = start(LAUNCHER, str(ckpt), str(tmp_path))
    pids: list[int] = []
    try:
        pids = list(json.loads(first_line(launcher, 180)).values())
        assert len(pids) == 3 and all(running(p) for p in pids)
        launcher.kill()  # SIGKILL: no teardown runs in the launcher
        assert launcher.wait(10) == -signal.SIGKILL
        assert wait_gone(pids, 15) == [], "the coordinator or a worker outlived its launcher"
    finally:
        kill_all([launcher], pids)


def test_a_closed_lifeline_stops_the_process():
    """The portable path alone: the pipe's write end closes, the process stops in order."""
    read, write = os.pipe()
    watcher = start(WATCHER, env=os.environ | {LIFELINE_FD: str(read)}, pass_fds=(read,))
    os.close(read)
    lifeline = os.fdopen(write, "wb")
    try:
        assert first_line(watcher, 30) == "watching\n"
        lifeline.close()
        assert watcher.wait(10) == 0 and watcher.stdout.read() == "stopping\n"
    finally:
        lifeline.close()
        kill_all([watcher], [])
