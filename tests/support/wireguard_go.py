"""Shared handling of real wireguard-go processes in the tests."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.wait import wait_for
from tools.lab import clean_environment, find_tool

#: wireguard-go's control sockets: one directory for every namespace (names must not clash).
UAPI_DIR = Path("/var/run/wireguard")


def start_wireguard_go(node: Any, ifname: str, finalizer: Callable[[Callable[[], None]], None],
                       timeout: float = 10.0) -> subprocess.Popen:
    """wireguard-go for `ifname` in `node`'s namespace, stopped at the end of the test
    (`finalizer`: request.addfinalizer); returns once its control socket answers to its path."""
    sock_path = UAPI_DIR / f"{ifname}.sock"
    assert not sock_path.exists(), f"{sock_path} exists already"
    env = {**clean_environment(), "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": "verbose"}
    proc = node.popen(find_tool("wireguard-go"), "-f", ifname, env=env, log_name="wireguard-go")
    finalizer(lambda: stop_wireguard_go(proc, sock_path))

    def ready() -> bool:
        assert proc.poll() is None, f"wireguard-go exited with {proc.returncode}:\n{node.log('wireguard-go')}"
        return sock_path.exists()

    wait_for(f"wireguard-go's control socket {sock_path}", ready, timeout, lambda: node.log("wireguard-go"))
    return proc


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
