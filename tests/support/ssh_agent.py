"""A real `ssh-agent -D` for tests: started on a socket of the test's own, stopped (killed)
at the end whatever happens. And a scripted peer on an agent socket (`scripted_agent`):
one that accepts and never answers, or answers with bytes that break the protocol."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
        done = subprocess.run(
            ["ssh-add", *options, str(key)],
            env={"SSH_AUTH_SOCK": self.sock, "PATH": os.environ.get("PATH", "")},
            capture_output=True,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        if done.returncode != 0:  # ssh-add says why only on stderr
            raise RuntimeError(f"ssh-add {' '.join(options)} {key} failed (exit {done.returncode}): "
                               f"{done.stderr.strip() or '(no message)'}")

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
        wait_accepting(sock, proc)
        yield agent
    finally:
        agent.stop()


def wait_accepting(sock: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 5.0) -> None:
    """Return once a connection to `sock` succeeds. The socket file exists from bind(),
    before listen(): a client in between is refused, so its existence is no signal."""
    deadline, failure = time.monotonic() + timeout, "never tried"
    for _ in range(int(timeout / 0.01) + 2):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(sock)
            except OSError as exc:
                failure = exc.strerror or str(exc)
            else:
                return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"ssh-agent on {sock} exited ({proc.returncode}) before accepting")
        if time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    raise RuntimeError(f"nothing accepted connections on {sock} within {timeout:g} s (last: {failure})")


@dataclass
class ScriptedAgent:
    sock: str
    connections: int = 0  # accepted so far
    asked: threading.Event = field(default_factory=threading.Event)  # settle() waits
    idle: threading.Event = field(default_factory=threading.Event)  # none open or waiting since it asked

    def settle(self, timeout: float = 5.0) -> int:
        """The number of connections accepted, once every connection made before this call
        has been accepted and closed by its client."""
        self.idle.clear()
        self.asked.set()
        if not self.idle.wait(timeout):
            raise RuntimeError(f"connections to {self.sock} still open after {timeout:g} s")
        return self.connections


@contextmanager
def scripted_agent(sock: str, answer: bytes | None = None) -> Iterator[ScriptedAgent]:
    """A peer on `sock` that accepts every connection and, to each request, sends `answer`;
    None: never answers (holds the connection open: a hung or busy agent). Stopped, and
    its connections closed, when the block ends."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock)
    listener.listen(16)
    peer = ScriptedAgent(sock)
    stop = threading.Event()
    clients: list[socket.socket] = []

    def serve() -> None:
        while not stop.is_set():  # bounded by the block: stop is set on the way out
            asked = peer.asked.is_set()  # before the select: an empty one then proves idle since
            ready, _, _ = select.select([listener, *clients], [], [], 0.05)
            if asked and not ready and not clients:
                peer.asked.clear()
                peer.idle.set()
            for conn in ready:
                if conn is listener:
                    client, _ = listener.accept()
                    clients.append(client)
                    peer.connections += 1
                    continue
                try:
                    request = conn.recv(65536)
                    if request and answer is not None:
                        conn.sendall(answer)
                except OSError:  # reset by the client
                    request = b""
                if not request:  # the client hung up
                    clients.remove(conn)
                    conn.close()

    thread = threading.Thread(target=serve, name=f"scripted agent {sock}", daemon=True)
    thread.start()
    try:
        yield peer
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in clients:
            conn.close()
        listener.close()
        Path(sock).unlink(missing_ok=True)


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
