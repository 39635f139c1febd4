"""The data path's UDP offloads (actors/datapath.py) on real loopback sockets, no root:
[split] of what UDP_GRO joined, the send batch leaving in one UDP_SEGMENT sendmsg,
the fallback when the kernel refuses GSO, the `offloads` status string, `[node] offload`.

On loopback a GSO send to a socket with UDP_GRO arrives joined, in one receive (the
loopback device does no GRO of its own: what one sendmsg sent is what one recvmsg
gets), and a datagram is queued before `sendmsg` returns, so readiness callbacks are
called directly (as in test_datapath_stages.py)."""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.datapath import DataPath
from actors.edges import UdpBind
from tests.conftest import unavailable
from tests.support.memnet import MemoryTun
from tests.support.wire import A_IP, B_IP, PeerPair, ipv4_packet, seeded_rng
from tests.unit.test_config import MINIMAL, load, load_error
from tests.unit.test_datapath_stages import FixedClock, _Owner, path
from tunnelmesh.wireguard.constants import TRANSPORT_MIN_SIZE

__all__ = ["path"]  # the fixture, used by name

SOL_UDP = 17  # the numbers of linux/udp.h, written out here rather than taken from the code under test
UDP_SEGMENT = 103
UDP_GRO = 104
MAX_RECEIVES = 1000  # bound on every drain loop of a test socket


def gro_socket() -> socket.socket:
    """A non-blocking loopback UDP socket with UDP_GRO on: joined datagrams arrive in one receive."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        sock.close()
        unavailable("this kernel has no UDP_GRO (Linux 5.0+)")
    return sock


def send_segmented(sender: socket.socket, datagrams: list[bytes], to: tuple[str, int]) -> None:
    """`datagrams` (equal size but the last) in one sendmsg with UDP_SEGMENT."""
    try:
        sender.sendmsg([b"".join(datagrams)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(datagrams[0])))], 0, to)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL):
            unavailable(f"this kernel has no UDP_SEGMENT (Linux 4.18+): {exc.strerror}")
        raise


def receive_groups(receiver: socket.socket) -> list[list[bytes]]:
    """Everything waiting at `receiver`, a list of datagrams per receive (split at the
    UDP_GRO segment size the kernel reports)."""
    groups: list[list[bytes]] = []
    for _ in range(MAX_RECEIVES):
        try:
            data, ancillary, _, _ = receiver.recvmsg(65536, socket.CMSG_SPACE(4))
        except BlockingIOError:
            return groups
        step = len(data)
        for level, kind, value in ancillary:
            if (level, kind) == (SOL_UDP, UDP_GRO):
                step = struct.unpack("=i", value[:4])[0]
        groups.append([data[start:start + step] for start in range(0, len(data), step)] or [b""])
    raise AssertionError(f"more than {MAX_RECEIVES} receives waiting")


# --------------------------------------------------------------------------- [split]


def test_datagrams_the_kernel_joined_reach_the_handler_one_by_one(path: tuple[DataPath, socket.socket, MemoryTun]) -> None:
    datapath, sender, _ = path
    if not datapath.bind.gro:
        unavailable("this kernel has no UDP_GRO (Linux 5.0+)")
    seen: list[tuple[bytes, tuple[str, int]]] = []
    datapath.register_datagrams(lambda datagram, source: seen.append((bytes(datagram), source)) is None)
    # Not WireGuard (first byte 0x17), each different; the last shorter, as GSO allows.
    datagrams = [bytes([0x17, i]) * 300 for i in range(7)] + [b"\x17\xff" * 100]
    send_segmented(sender, datagrams, ("127.0.0.1", datapath.port))
    datapath._on_udp_readable()
    assert seen == [(datagram, sender.getsockname()) for datagram in datagrams]
    assert not datapath.drops and not datapath.device.drops


def test_joined_wireguard_lookalikes_are_each_a_counted_drop(path: tuple[DataPath, socket.socket, MemoryTun]) -> None:
    datapath, sender, _ = path
    if not datapath.bind.gro:
        unavailable("this kernel has no UDP_GRO (Linux 5.0+)")
    taken: list[bytes] = []
    datapath.register_datagrams(lambda datagram, source: taken.append(bytes(datagram)) is None)
    rng = seeded_rng(11)
    # Transport messages (type 4) to receiver indexes nobody has: the core's to judge, one by one.
    lookalikes = [b"\x04\x00\x00\x00" + rng(TRANSPORT_MIN_SIZE + 60) for _ in range(5)]
    send_segmented(sender, lookalikes, ("127.0.0.1", datapath.port))
    datapath._on_udp_readable()
    assert datapath.device.drops == {"unknown receiver index": 5}
    assert taken == [] and not datapath.drops


# --------------------------------------------------------------------------- batch (GSO)


class Sealing:
    """Node A's data path (A's Device with a session to B, the in-memory TUN) whose peer B
    is a loopback socket with UDP_GRO on; B's Device opens what arrives there."""

    def __init__(self, bind: UdpBind) -> None:
        self.pair = PeerPair()
        self.pair.handshake()
        self.pair.a_peer.owner = _Owner()
        self.receiver = gro_socket()
        self.pair.a_peer.endpoint = self.receiver.getsockname()
        self.tun = MemoryTun("tm-test")
        self.bind = bind
        self.datapath = DataPath(self.pair.a, self.tun, bind, FixedClock(self.pair.now, self.pair.wall))

    def send(self, packets: list[bytes]) -> list[list[bytes]]:
        """Packets into the TUN, one readiness callback; the datagrams B's socket got, per receive."""
        for packet in packets:
            self.tun.app.send(packet)
        self.datapath._on_tun_readable()
        return receive_groups(self.receiver)

    def opened(self, groups: list[list[bytes]]) -> list[bytes]:
        """What B's Device makes of the datagrams, in the order they arrived."""
        plaintext = []
        for datagram in (datagram for group in groups for datagram in group):
            before = len(self.pair.delivered_to_b)
            assert self.pair.inject("b", datagram, ("127.0.0.1", self.bind.port)), (
                f"B could not open a datagram of {len(datagram)} B: {self.pair.b.drops}")
            plaintext.append(self.pair.delivered_to_b[before])
        return plaintext

    def close(self) -> None:
        self.receiver.close()
        self.bind.close()
        self.tun.close()


@pytest.fixture
def sealing(request: pytest.FixtureRequest) -> Iterator[Sealing]:
    bind = UdpBind.open(0, offload=request.param)
    if request.param and not bind.gso:
        bind.close()
        unavailable("this kernel has no UDP_SEGMENT (Linux 4.18+)")
    try:
        side = Sealing(bind)
    except BaseException:  # a skip too: the socket is closed whatever stops the set-up
        bind.close()
        raise
    try:
        yield side
    finally:
        side.close()


def packets_of(sizes: list[int]) -> list[bytes]:
    """IPv4 packets A -> B of these payload sizes, each payload telling which it is."""
    return [ipv4_packet(A_IP, B_IP, (b"%04d" % i) * (size // 4)) for i, size in enumerate(sizes)]


@pytest.mark.parametrize("sealing", [True], indirect=True, ids=["offload"])
def test_sealed_packets_to_one_address_leave_in_one_segmented_send(sealing: Sealing) -> None:
    # Equal packets share one send; a shorter one ends the batch (it may only be last),
    # the next full-size one starts another.
    packets = packets_of([1000] * 6 + [300] + [1000] * 2)
    groups = sealing.send(packets)
    assert [len(group) for group in groups] == [7, 2]
    assert sealing.opened(groups) == packets  # each opened, in order
    assert not sealing.datapath.drops and not sealing.pair.b.drops


@pytest.mark.parametrize("sealing", [True], indirect=True, ids=["offload"])
def test_a_batch_holds_at_most_64_datagrams(sealing: Sealing) -> None:
    packets = packets_of([200] * 100)
    groups = sealing.send(packets)
    assert [len(group) for group in groups] == [64, 36]
    assert sealing.opened(groups) == packets


@pytest.mark.parametrize("sealing", [True], indirect=True, ids=["offload"])
def test_a_batch_stops_short_of_the_largest_udp_payload(sealing: Sealing) -> None:
    packets = packets_of([1400] * 60)
    groups = sealing.send(packets)
    sizes = [len(group) for group in groups]
    assert sum(sizes) == 60 and len(sizes) > 1 and max(sizes) < 60, sizes
    assert all(sum(map(len, group)) <= 65507 for group in groups)  # each send fit one UDP payload
    assert sealing.opened(groups) == packets


@pytest.mark.parametrize("sealing", [False], indirect=True, ids=["no offload"])
def test_without_offloads_every_packet_is_a_send_of_its_own(sealing: Sealing) -> None:
    packets = packets_of([1000] * 6 + [300] + [1000] * 2)
    groups = sealing.send(packets)
    assert [len(group) for group in groups] == [1] * len(packets)
    assert sealing.opened(groups) == packets
    assert not sealing.datapath.drops


@pytest.mark.parametrize("sealing", [True], indirect=True, ids=["offload"])
def test_a_refused_segmented_send_goes_a_datagram_at_a_time_from_then_on(
        sealing: Sealing, caplog: pytest.LogCaptureFixture) -> None:
    """A device without checksum offload makes the kernel refuse UDP_SEGMENT with EIO."""
    refusals: list[tuple[object, ...]] = []

    def refuse(*args: object) -> int:
        refusals.append(args)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    sealing.bind.sendmsg = refuse  # type: ignore[method-assign]
    assert "gso" in sealing.datapath.offloads
    packets = packets_of([1000] * 4 + [300])  # the last shorter: split at the others' size
    with caplog.at_level(logging.WARNING, logger="tunnelmesh.datapath"):
        groups = sealing.send(packets)
        assert [len(group) for group in groups] == [1] * 5  # the batch still arrived
        assert sealing.opened(groups) == packets
        again = packets_of([1000] * 3)
        groups = sealing.send(again)
    assert sealing.opened(groups) == again
    assert len(refusals) == 1  # not asked again
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "refused a batched UDP send" in warnings[0].getMessage(), caplog.text
    assert "gso" not in sealing.datapath.offloads and "gro" in sealing.datapath.offloads
    assert not sealing.datapath.drops


@pytest.mark.parametrize("sealing", [True], indirect=True, ids=["offload"])
def test_segments_too_large_for_the_route_are_sent_one_by_one_for_that_batch_only(
        sealing: Sealing, caplog: pytest.LogCaptureFixture) -> None:
    """EINVAL (segments larger than the route's MTU, e.g. one peer behind a smaller link)
    is about that batch: it goes a datagram at a time, batching stays on for the next."""
    real_sendmsg = sealing.bind.sendmsg
    refusals: list[tuple[object, ...]] = []

    def refuse_once(*args: object) -> int:
        if not refusals:
            refusals.append(args)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_sendmsg(*args)  # type: ignore[no-any-return]

    sealing.bind.sendmsg = refuse_once  # type: ignore[method-assign]
    packets = packets_of([1000] * 4)
    with caplog.at_level(logging.WARNING, logger="tunnelmesh.datapath"):
        groups = sealing.send(packets)
        assert [len(group) for group in groups] == [1] * 4  # the refused batch still arrived
        assert sealing.opened(groups) == packets
        again = packets_of([1000] * 3)
        groups = sealing.send(again)
    assert [len(group) for group in groups] == [3]  # batched again
    assert sealing.opened(groups) == again
    assert "gso" in sealing.datapath.offloads and not caplog.records
    assert not sealing.datapath.drops


# --------------------------------------------------------------------------- status and config


@pytest.mark.parametrize("offload, expected", [(False, "none"), (True, "udp gso gro")], ids=["off", "on"])
def test_offloads_says_what_is_in_use(offload: bool, expected: str) -> None:
    tun, bind = MemoryTun("tm-test"), UdpBind.open(0, offload=offload)  # the in-memory TUN has no header
    try:
        if offload and not (bind.gso and bind.gro):
            unavailable("this kernel has no UDP_SEGMENT or UDP_GRO")
        datapath = DataPath(PeerPair().a, tun, bind)
        assert datapath.offloads == expected
    finally:
        bind.close()
        tun.close()


def test_node_offload_is_true_unless_turned_off(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL).offload is True
    assert load(tmp_path, MINIMAL + "offload = false\n").offload is False
    assert load(tmp_path, MINIMAL + "offload = true\n").offload is True


@pytest.mark.parametrize("value", ['"yes"', "1", '"false"'])
def test_node_offload_must_be_a_boolean(tmp_path: Path, value: str) -> None:
    error = load_error(tmp_path, MINIMAL + f"offload = {value}\n")
    assert "offload must be true or false" in str(error)
