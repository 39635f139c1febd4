"""The data path's two OS edges, as small interfaces (wireguard-go's `tun.Device` and
`conn.Bind`): the TUN device and the UDP socket.

The data path waits for readiness on `fileno()` (`loop.add_reader`) and then calls
`readv`/`write` or `recvfrom_into`/`sendto` until they raise BlockingIOError. The real
edges make those the C functions themselves (`functools.partial(os.readv, fd)`, the
socket's bound methods), so the interface costs no Python frame per packet. The TUN's
real implementation is actors/tun.py; tests/support/memnet.py has in-memory doubles
that run whole nodes in one process.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any, Protocol

Address = tuple[str, int]
SOCKET_BUFFER = 8 << 20


class Tun(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def readv(self) -> Callable[[list[bytearray]], int]: ...  # one packet into the buffers; BlockingIOError when none waits

    @property
    def write(self) -> Callable[[Any], int]: ...  # one packet

    def fileno(self) -> int: ...  # readable while a packet waits

    def close(self) -> None: ...


class Bind(Protocol):
    @property
    def port(self) -> int: ...

    @property
    def recvfrom_into(self) -> Callable[[bytearray], tuple[int, Address]]: ...  # BlockingIOError when none waits

    @property
    def sendto(self) -> Callable[[Any, Address], int]: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class UdpError(Exception):
    pass


class UdpBind:
    """The node's one UDP socket (IPv4, every address), non-blocking, 8 MiB buffers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.recvfrom_into = sock.recvfrom_into
        self.sendto = sock.sendto
        self.fileno = sock.fileno

    @classmethod
    def open(cls, port: int) -> UdpBind:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                except OSError:
                    pass
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise UdpError(
                    f"UDP port {port} is in use (another tunnelmesh or WireGuard?); set listen_port in the config"
                ) from None
            raise UdpError(f"cannot bind UDP port {port}: {exc.strerror}") from None
        sock.setblocking(False)
        return cls(sock)

    def close(self) -> None:
        self.sock.close()
