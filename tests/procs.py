"""Commands run as the leader of their own process group, killed with the whole group if they overstay: a test
that times out must not leave behind what its command started. (A LocalCluster's processes have sessions of
their own; they follow their launcher out, see moemesh.process.)"""

import os
import signal
import subprocess
from pathlib import Path


def run_group(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout), the group killed on timeout."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def running(pid: int) -> bool:
    """Whether `pid` is a live process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # Linux: an exited process that its new parent has not reaped yet (a zombie) answers kill() too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # reaped just now, or no /proc (not Linux: kill() answered)
        return not Path("/proc/self").exists()
