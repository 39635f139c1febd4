"""A real `ssh-agent -D` for tests: started on a socket of the test's own, stopped (killed)
at the end whatever happens."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import unavailable

TOOLS = ("ssh-keygen", "ssh-agent", "ssh-add")


def require_openssh() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        unavailable(f"needs OpenSSH's {', '.join(missing)} (run tools/setup.sh)")


@dataclass
class Agent:
    sock: str
    proc: subprocess.Popen[bytes]

    def add(self, key: Path, *options: str) -> None:
        subprocess.run(
            ["ssh-add", *options, str(key)],
            check=True,
            env={"SSH_AUTH_SOCK": self.sock, "PATH": os.environ.get("PATH", "")},
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)


@contextmanager
def running_agent(sock: str) -> Iterator[Agent]:
    """An agent listening on `sock` until the block ends."""
    # Clean environment; SSH_ASKPASS=/bin/false makes `ssh-add -c` keys be refused at
    # once and every time (no display, no prompt), so that refusal is deterministic.
    proc = subprocess.Popen(
        ["ssh-agent", "-D", "-a", sock],
        env={"PATH": "/usr/bin:/bin", "SSH_ASKPASS": "/bin/false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    agent = Agent(sock, proc)
    try:
        deadline = time.monotonic() + 5
        while not os.path.exists(sock):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("ssh-agent did not start")
            time.sleep(0.01)
        yield agent
    finally:
        agent.stop()


def keygen(path: Path, *args: str, comment: str = "test", passphrase: str = "") -> Path:
    # -a 4: few bcrypt rounds, so passphrase tests stay fast (the format is the same).
    subprocess.run(
        ["ssh-keygen", "-q", "-a", "4", "-N", passphrase, "-C", comment, "-f", str(path), *args],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path


def openssh_fingerprint(pub: Path) -> str:
    return subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)], check=True, capture_output=True, text=True
    ).stdout.split()[1]
