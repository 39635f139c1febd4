"""Shared handling of real wireguard-go processes in the tests."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def stop_wireguard_go(proc: subprocess.Popen, sock_path: Path) -> None:
    """Kill wireguard-go by its PID (`ip netns exec` execs it: same PID) and
    remove its control socket, whose path is global across namespaces."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    try:
        sock_path.unlink()  # SIGTERM removes it; SIGKILL does not
    except FileNotFoundError:
        pass
