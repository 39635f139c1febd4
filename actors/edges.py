"""The data path's two OS edges, as small interfaces (wireguard-go's `tun.Device` and
`conn.Bind`): the TUN device and the UDP socket.

The data path waits for readiness on `fileno()` (`loop.add_reader`) and then calls
`readv`/`write` or `recvfrom_into`/`sendto` until they raise BlockingIOError. The real
edges make those the C functions themselves (`functools.partial(os.readv, fd)`, the
socket's bound methods), so the interface costs no Python frame per packet. The TUN's
real implementation is actors/tun.py; tests/support/memnet.py has in-memory doubles
that run whole nodes in one process.

Both edges say which offloads they have. A TUN with `vnet_hdr` puts a virtio-net header
before every packet and may hand over super-packets (tunnelmesh.offload). A bind with
`gso` sends several equal-size datagrams to one address in one `sendmsg` (UDP_SEGMENT);
with `gro` the kernel may join received datagrams from one source, and `recvmsg_into`
says their size (UDP_GRO). Where the kernel lacks them, they are off and the data path
goes a packet per call.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable
from typing import Any, Protocol

Address = tuple[str, int]
SOCKET_BUFFER = 8 << 20
SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: sendmsg's segment size (GSO)
UDP_GRO = 104  # receive coalesced datagrams and their segment size
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)


class Tun(Protocol):
    vnet_hdr: bool  # every packet behind a virtio-net header; super-packets possible
    offloads: str  # what the kernel took: "csum tso uso", "csum", "none"; "" without the header

    @property
    def name(self) -> str: ...

    @property
    def readv(self) -> Callable[[list[bytearray]], int]: ...  # one packet into the buffers; BlockingIOError when none waits

    @property
    def write(self) -> Callable[[Any], int]: ...  # one packet

    def fileno(self) -> int: ...  # readable while a packet waits

    def close(self) -> None: ...


class Bind(Protocol):
    gso: bool  # `sendmsg` takes a UDP_SEGMENT size
    gro: bool  # `recvmsg_into` may return joined datagrams (see gro_segment_size)

    @property
    def port(self) -> int: ...

    @property
    def recvfrom_into(self) -> Callable[[bytearray], tuple[int, Address]]: ...  # BlockingIOError when none waits

    @property
    def sendto(self) -> Callable[[Any, Address], int]: ...

    @property
    def recvmsg_into(self) -> Callable[..., tuple[int, list[tuple[int, int, bytes]], int, Address]]: ...  # with gro

    @property
    def sendmsg(self) -> Callable[..., int]: ...  # with gso

    def fileno(self) -> int: ...

    def close(self) -> None: ...


def gro_segment_size(ancillary: list[tuple[int, int, bytes]], size: int) -> int:
    """The size of each datagram in what one `recvmsg_into` returned (the last may be
    shorter): UDP_GRO's control message, or the whole when the kernel joined nothing."""
    for level, kind, data in ancillary:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
            segment = int.from_bytes(data[:4], sys.byteorder)
            return segment if 0 < segment < size else size
    return size


class UdpError(Exception):
    pass


class UdpBind:
    """The node's one UDP socket (IPv4, every address), non-blocking, 8 MiB buffers,
    GSO and GRO where the kernel has them (Linux 4.18 and 5.0)."""

    def __init__(self, sock: socket.socket, *, gso: bool = False, gro: bool = False) -> None:
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.gso = gso
        self.gro = gro
        self.recvfrom_into = sock.recvfrom_into
        self.recvmsg_into = sock.recvmsg_into
        self.sendto = sock.sendto
        self.sendmsg = sock.sendmsg
        self.fileno = sock.fileno

    @classmethod
    def open(cls, port: int, *, offload: bool = True) -> UdpBind:
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
        return cls(sock, gso=offload and _turn_on(sock, UDP_SEGMENT, 0), gro=offload and _turn_on(sock, UDP_GRO, 1))

    def close(self) -> None:
        self.sock.close()


def _turn_on(sock: socket.socket, option: int, value: int) -> bool:
    """Set a SOL_UDP option; False where the kernel does not know it."""
    try:
        sock.setsockopt(SOL_UDP, option, value)
    except OSError:
        return False
    return True
