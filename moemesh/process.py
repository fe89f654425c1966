"""Process lifecycle helpers shared by the coordinator and worker commands, and by the launcher that starts them."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

# Set by LocalCluster in the processes it starts: a pipe's read end whose write end only the launcher holds, so
# that it reads end-of-file once the launcher is gone, however it died.
LIFELINE_FD = "MOEMESH_LIFELINE_FD"
LIFELINE_GRACE_S = 5.0  # an orderly stop that takes longer than this after the launcher is gone is cut short


def stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM, or when the launcher that started this process is gone (LocalCluster),
    so that shutdown is orderly rather than a cancellation."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fd = os.environ.pop(LIFELINE_FD, None)  # popped: a process this one starts has no such pipe
    if fd is not None:
        threading.Thread(target=_watch_lifeline, args=(int(fd), loop, stop), name="lifeline", daemon=True).start()
    return stop


def _watch_lifeline(fd: int, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    while os.read(fd, 1):  # nobody writes: this returns b"" when the launcher's end closes
        pass
    try:
        loop.call_soon_threadsafe(stop.set)
    except RuntimeError:  # the loop already closed: the process is on its way out
        pass
    time.sleep(LIFELINE_GRACE_S)
    os._exit(1)
