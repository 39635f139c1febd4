"""The data path's stages (actors/datapath.py): the UDP demux and the one delivery function.

A real UDP socket on loopback (UdpBind) and the in-memory TUN of tests/support/memnet.py;
datagrams are sent from a second loopback socket and the data path's readiness callback
is called directly (a loopback datagram is queued before `sendto` returns)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from actors.datapath import DataPath
from actors.edges import UdpBind
from tests.support.memnet import MemoryTun
from tests.support.wire import A_IP, B_IP, PSK, PeerPair, ipv4_packet, seeded_rng
from tunnelmesh.packets import icmp_echo
from tunnelmesh.wireguard import Device

STUN_BINDING_RESPONSE = bytes.fromhex("0101000c2112a442") + bytes(12) + bytes.fromhex("0020000800011f90c0000201")


@pytest.fixture
def path() -> Iterator[tuple[DataPath, socket.socket, MemoryTun]]:
    rng = seeded_rng(3)
    device = Device(rng(32), rng=seeded_rng(4))
    tun, bind = MemoryTun("tm-test"), UdpBind.open(0)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    try:
        yield DataPath(device, tun, bind), sender, tun
    finally:
        sender.close()
        bind.close()
        tun.close()


def send(path: tuple[DataPath, socket.socket, MemoryTun], datagram: bytes) -> None:
    datapath, sender, _ = path
    sender.sendto(datagram, ("127.0.0.1", datapath.port))
    datapath._on_udp_readable()


def test_a_datagram_that_is_not_wireguard_goes_to_the_handler_that_takes_it(path: tuple[DataPath, socket.socket, MemoryTun]) -> None:
    datapath, sender, _ = path
    seen: list[tuple[bytes, tuple[str, int]]] = []
    declined: list[bytes] = []
    datapath.register_datagrams(lambda d, s: declined.append(bytes(d)) is not None)  # looks, declines
    datapath.register_datagrams(lambda d, s: seen.append((bytes(d), s)) is None)  # takes it
    send(path, STUN_BINDING_RESPONSE)
    assert seen == [(STUN_BINDING_RESPONSE, sender.getsockname())]
    assert declined == [STUN_BINDING_RESPONSE]
    assert not datapath.drops and not datapath.device.drops


@pytest.mark.parametrize("datagram", [b"", b"\x01", b"\x00\x01\x00\x00" + bytes(40), b"\x17" * 60,
                                      b"\x01\x00\x00\x01" + bytes(144)],
                         ids=["empty", "one byte", "type 0", "type 0x17", "reserved bytes set"])
def test_a_datagram_nobody_takes_is_a_counted_drop(path: tuple[DataPath, socket.socket, MemoryTun], datagram: bytes) -> None:
    datapath = path[0]
    send(path, datagram)
    assert datapath.drops == {"not a WireGuard message": 1}
    assert not datapath.device.drops  # never reached the core


def test_wireguard_messages_go_to_the_core_not_the_handlers(path: tuple[DataPath, socket.socket, MemoryTun]) -> None:
    datapath = path[0]
    taken: list[bytes] = []
    datapath.register_datagrams(lambda d, s: taken.append(bytes(d)) is None)
    stranger = Device(seeded_rng(9)(32))
    peer = stranger.add_peer(datapath.device.static_public, preshared_key=PSK, endpoint=("127.0.0.1", datapath.port))
    peer.send_handshake_initiation(0.0, 0.0)
    ((initiation, _),) = stranger.transmits
    send(path, initiation)
    send(path, b"\x04\x00\x00\x00" + bytes(28))  # a transport message with an unknown index
    assert taken == []
    assert datapath.device.drops == {"initiation from unknown key": 1, "unknown receiver index": 1}


@contextmanager
def b_on_loopback() -> Iterator[tuple[PeerPair, DataPath, MemoryTun, socket.socket]]:
    """Node B's data path (the in-memory TUN, a loopback UdpBind) with its session to A up;
    A's end is a loopback socket, B's endpoint for A, and A's Device (PeerPair) seals."""
    pair = PeerPair()
    pair.handshake()
    pair.b_peer.owner = _Owner()
    tun, bind = MemoryTun("tm-test"), UdpBind.open(0)
    a_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a_socket.bind(("127.0.0.1", 0))
    a_socket.settimeout(2)
    try:
        pair.b_peer.use_endpoint(a_socket.getsockname())
        yield pair, DataPath(pair.b, tun, bind, FixedClock(pair.now, pair.wall)), tun, a_socket
    finally:
        a_socket.close()
        bind.close()
        tun.close()


def from_a(pair: PeerPair, a_socket: socket.socket, datapath: DataPath, packet: bytes) -> None:
    """A seals `packet` and sends it to B's UDP port."""
    pair.a.transmits.clear()
    pair.send_packet("a", packet)
    ((datagram, _),) = pair.a.transmits
    pair.a.transmits.clear()
    a_socket.sendto(datagram, ("127.0.0.1", datapath.port))


def test_decrypted_packets_leave_by_the_one_delivery_function() -> None:
    """A packet from the peer reaches the TUN; an echo reply the daemon's own ping waits
    for is taken before the TUN (the same function serves links: DataPath.receive)."""
    with b_on_loopback() as (pair, datapath, tun, a_socket):
        packet = ipv4_packet(A_IP, B_IP, b"through the tunnel")
        from_a(pair, a_socket, datapath, packet)
        datapath._on_udp_readable()
        assert tun.app.recv(65536) == packet
        # An echo reply for the daemon's own ping is answered to the ping, not written to the TUN.
        loop = asyncio.new_event_loop()
        try:
            waiting: asyncio.Future[float] = loop.create_future()
            datapath.pings[(0x1234, 7)] = waiting
            reply = icmp_echo(ipaddress.IPv4Address(A_IP), ipaddress.IPv4Address(B_IP), 0x1234, 7, b"pong", reply=True)
            pair.send_packet("a", reply)
            ((datagram, _),) = pair.a.transmits
            datapath.receive(_Link(pair.a.static_public), datagram)  # by a link this time
            assert waiting.done() and waiting.result() == pair.now
        finally:
            loop.close()
        with pytest.raises(BlockingIOError):
            tun.app.recv(65536)
        assert not datapath.drops


def test_what_the_kernel_answers_to_a_write_leaves_in_the_same_batch() -> None:
    """The kernel queues its answer to a packet written to the TUN (an echo reply, an
    ACK) before the write returns: the inbound batch ends with the outbound drain, so the
    answer is sealed and sent without waiting for the TUN's own readiness callback."""
    with b_on_loopback() as (pair, datapath, tun, a_socket):
        request = icmp_echo(ipaddress.IPv4Address(A_IP), ipaddress.IPv4Address(B_IP), 9, 1, b"are you there")
        reply = icmp_echo(ipaddress.IPv4Address(B_IP), ipaddress.IPv4Address(A_IP), 9, 1, b"are you there", reply=True)
        write = tun.write

        def kernel_answers(data: bytes) -> int:
            written = write(data)
            tun.app.send(reply)  # queued before the write returns, as the kernel's would be
            return written

        tun.write = kernel_answers  # type: ignore[method-assign]
        from_a(pair, a_socket, datapath, request)
        datapath._on_udp_readable()  # the TUN's readiness callback is never called
        assert tun.app.recv(65536) == request
        assert pair.inject("a", a_socket.recv(65536)) and pair.delivered_to_a == [reply]
        assert not datapath.drops and not pair.a.drops and not pair.b.drops


class FixedClock:
    def __init__(self, monotonic: float, wall: float) -> None:
        self._monotonic, self._wall = monotonic, wall

    def monotonic(self) -> float:
        return self._monotonic

    def wall(self) -> float:
        return self._wall


class _Link:
    """A link from the peer, as the SSH and relay rungs deliver (the core checks its peer)."""

    rung = "ssh"
    description = "ssh test"
    closed = False

    def __init__(self, peer_key: bytes) -> None:
        self.peer_key = peer_key


class _Owner:
    """What the data path calls on a peer's owner after a batch (a session's hooks)."""

    def on_event(self, event: object) -> None:
        pass

    def reschedule(self) -> None:
        pass
