"""Our sans-IO WireGuard core against REAL wireguard-go, inside a network
namespace this test creates.

Layout (one namespace per test, from the shared `lab` fixture, so it is
deleted with everything in it whatever happens):

    namespace <run prefix>wg, lo up
    ├── wireguard-go -f <unique ifname>     listens on 127.0.0.1:51820
    │   └── <ifname> 100.100.0.2/24         the kernel answers pings on it
    └── our UDP socket on 127.0.0.1:<any>   created by a short-lived thread that
                                            setns()'d into the namespace; the
                                            test's own threads never leave the
                                            host namespace

The Device runs in this process with real monotonic and wall time; the test
drains `device.transmits` onto the socket and feeds every datagram it reads
to `device.receive`. wireguard-go's control socket
/var/run/wireguard/<ifname>.sock is global, hence a unique interface name per
run, removed in the finalizer together with the process (killed by PID).

Needs root, wireguard-go, wg and ping: without them the tests skip, except
under CI=true, where they fail.
"""

from __future__ import annotations

import base64
import ctypes
import ipaddress
import os
import secrets
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import unavailable
from tests.support.wireguard_go import UAPI_DIR, start_wireguard_go

from tools.lab import find_tool
from tunnelmesh.wireguard import Device, HandshakeCompleted
from tunnelmesh.wireguard.crypto import derive_psk, x25519_private, x25519_public

pytestmark = pytest.mark.interop

OUR_IP = "100.100.0.1"
THEIR_IP = "100.100.0.2"
WG_PORT = 51820
WAIT = 5.0  # seconds for any one thing to arrive
CLONE_NEWNET = 0x40000000


# --- IPv4 / ICMP, with real checksums ------------------------------------------------------


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def icmp_echo(src: str, dst: str, ident: int, seq: int, payload: bytes, *, reply: bool = False) -> bytes:
    icmp = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), secrets.randbelow(0x10000), 0x4000, 64, 1, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )
    header = header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]
    return header + icmp


def parse_icmp(packet: bytes) -> dict | None:
    """The fields of an ICMP echo request/reply in IPv4 with valid checksums, else None."""
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    ihl = (packet[0] & 0xF) * 4
    total = int.from_bytes(packet[2:4], "big")
    if inet_checksum(packet[:ihl]) != 0 or total != len(packet):
        return None
    icmp = packet[ihl:total]
    if inet_checksum(icmp) != 0:
        return None
    kind, code, _, ident, seq = struct.unpack("!BBHHH", icmp[:8])
    return {
        "src": str(ipaddress.IPv4Address(packet[12:16])), "dst": str(ipaddress.IPv4Address(packet[16:20])),
        "type": kind, "code": code, "id": ident, "seq": seq, "payload": bytes(icmp[8:]),
    }


# --- a UDP socket inside the namespace ----------------------------------------------------


def udp_socket_in_netns(netns: str) -> socket.socket:
    """A UDP socket bound to 127.0.0.1:<ephemeral> in `netns`.

    A socket belongs to the network namespace of the thread that creates it,
    for its whole life. A fresh thread enters the namespace (setns affects
    only the calling thread), creates the socket and ends; the caller's
    threads stay where they are.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, object] = {}

    def enter_and_create() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            result["sock"] = sock
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=enter_and_create, name=f"setns-{netns}")
    thread.start()
    thread.join(10)
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    assert "sock" in result, "the setns thread did not finish"
    return result["sock"]  # type: ignore[return-value]


# --- wireguard-go in its namespace ----------------------------------------------------------


class WireGuardGo:
    def __init__(self, node, ifname: str, proc: subprocess.Popen, public: bytes, psk: bytes) -> None:
        self.node, self.ifname, self.proc, self.public, self.psk = node, ifname, proc, public, psk

    def wg(self, *args: str) -> str:
        return self.node.run("wg", *args).stdout

    def dump(self) -> str:
        try:
            return self.node.run("wg", "show", self.ifname, "dump", check=False, timeout=10).stdout
        except Exception as exc:  # noqa: BLE001 - only for failure messages
            return f"(wg show failed: {exc})"

    def log_tail(self) -> str:
        return self.node.log("wireguard-go")[-2500:]

    def peer_line(self, our_public: bytes) -> list[str]:
        """`wg show dump`'s line for our peer: public-key, preshared-key, endpoint,
        allowed-ips, latest-handshake, transfer-rx, transfer-tx, persistent-keepalive."""
        b64 = base64.b64encode(our_public).decode()
        for line in self.dump().splitlines()[1:]:
            fields = line.split("\t")
            if fields[0] == b64:
                return fields
        raise AssertionError(f"our peer {b64} is not in wg show dump:\n{self.dump()}")


@pytest.fixture
def interop_tools() -> None:
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces, TUN)")
    missing = [t for t in ("wireguard-go", "wg", "ping", "ip") if find_tool(t) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} (apt-get install wireguard-go wireguard-tools iputils-ping iproute2)")
    if not os.path.exists("/dev/net/tun"):
        unavailable("no /dev/net/tun")


@pytest.fixture
def wg_go(interop_tools, lab, request) -> tuple[WireGuardGo, Path]:
    node = lab.add_node("wg")
    ifname = f"tmwg{secrets.token_hex(4)}"  # 12 characters, unique per run
    proc = start_wireguard_go(node, ifname, request.addfinalizer, WAIT)
    sock_path = UAPI_DIR / f"{ifname}.sock"

    private = x25519_private()
    psk = derive_psk(secrets.token_bytes(32))
    assert psk != bytes(32)
    key_dir = Path(lab.workdir) / "keys"  # the lab removes its workdir at teardown
    key_dir.mkdir(mode=0o700)
    (key_dir / "private").write_text(base64.b64encode(private).decode() + "\n")
    (key_dir / "psk").write_text(base64.b64encode(psk).decode() + "\n")
    return WireGuardGo(node, ifname, proc, x25519_public(private), psk), key_dir


class OurSide:
    """Our Device, its one peer (wireguard-go) and a UDP socket in the namespace."""

    def __init__(self, wg: WireGuardGo, key_dir: Path) -> None:
        self.wg = wg
        self.sock = udp_socket_in_netns(wg.node.netns)
        self.port = self.sock.getsockname()[1]
        self.device = Device(x25519_private())
        self.peer = self.device.add_peer(
            wg.public, preshared_key=wg.psk, allowed_ips=(ipaddress.ip_network(f"{THEIR_IP}/32"),),
            endpoint=("127.0.0.1", WG_PORT), owner="wireguard-go",
        )
        self.received: list[bytes] = []  # every datagram, in order
        self.sent: list[bytes] = []
        self.packets: list[bytes] = []  # decrypted inner packets
        self._out = bytearray(65536)
        self._buf = bytearray(65536)
        # Configure wireguard-go with us as its peer.
        ours = base64.b64encode(self.device.static_public).decode()
        wg.wg(
            "set", wg.ifname, "private-key", str(key_dir / "private"), "listen-port", str(WG_PORT),
            "peer", ours, "preshared-key", str(key_dir / "psk"), "allowed-ips", f"{OUR_IP}/32",
            "endpoint", f"127.0.0.1:{self.port}",
        )
        wg.node.run("ip", "addr", "add", f"{THEIR_IP}/24", "dev", wg.ifname)
        wg.node.run("ip", "link", "set", wg.ifname, "up")
        listening = wg.node.run("ss", "-Hnul").stdout
        assert f"127.0.0.1:{self.port} " in listening, f"our socket is not in the namespace:\n{listening}"
        assert f":{WG_PORT} " in listening, f"wireguard-go does not listen on {WG_PORT}:\n{listening}"

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        for datagram, endpoint in self.device.transmits:
            self.sock.sendto(datagram, endpoint)
            self.sent.append(datagram)
        self.device.transmits.clear()

    def send_ip(self, packet: bytes) -> None:
        self._buf[: len(packet)] = packet
        size = self.peer.encrypt(self._buf, len(packet), self._out, time.monotonic(), time.time())
        if size:
            datagram = bytes(self._out[:size])
            self.sock.sendto(datagram, self.peer.endpoint)
            self.sent.append(datagram)
        self.flush()

    def state(self) -> str:
        return (
            f"drops={dict(self.device.drops)} received types={[d[0] for d in self.received]} "
            f"sent types={[d[0] for d in self.sent]} events={list(self.device.events)}\n"
            f"wg show dump:\n{self.wg.dump()}\nwireguard-go log (tail):\n{self.wg.log_tail()}"
        )

    def pump(
        self, until: Callable[[], bool], what: str, timeout: float = WAIT, on_packet: Callable[[bytes], None] | None = None
    ) -> None:
        """Run the core on real time until `until()` holds; fail saying what did not arrive."""
        deadline = time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            if now >= deadline:
                raise AssertionError(f"{what}: not within {timeout} s. {self.state()}")
            timer = self.device.get_timer()
            if timer is not None and timer <= now:
                self.device.handle_timer(now, time.time())
                self.flush()
                continue
            wait = min(deadline - now, 0.1 if timer is None else max(0.0, timer - now), 0.1)
            readable, _, _ = select.select([self.sock], [], [], wait)
            if not readable:
                continue
            while True:
                try:
                    datagram, source = self.sock.recvfrom(65536)
                except BlockingIOError:
                    break
                self.received.append(datagram)
                n = self.device.receive(datagram, source, time.monotonic(), time.time(), self._out)
                self.flush()
                if n:
                    packet = bytes(self._out[:n])
                    self.packets.append(packet)
                    if on_packet is not None:
                        on_packet(packet)


@pytest.fixture
def our_side(wg_go) -> OurSide:
    wg, key_dir = wg_go
    side = OurSide(wg, key_dir)
    yield side
    side.close()


def assert_wg_saw_a_session(side: OurSide) -> None:
    fields = side.wg.peer_line(side.device.static_public)
    assert fields[1] == base64.b64encode(side.wg.psk).decode(), "wireguard-go has another preshared key"
    assert fields[2] == f"127.0.0.1:{side.port}", f"endpoint {fields[2]!r}"
    latest, rx, tx = int(fields[4]), int(fields[5]), int(fields[6])
    assert latest > 0, f"wireguard-go reports no handshake: {fields}"
    assert abs(latest - time.time()) < 60, f"latest handshake {latest} is not now: {fields}"
    assert rx > 0 and tx > 0, f"wireguard-go transfer counters rx={rx} tx={tx}"


# --- the tests --------------------------------------------------------------------------------


def test_we_initiate_and_wireguard_go_answers_pings(our_side: OurSide) -> None:
    side = our_side
    t0 = time.monotonic()
    side.peer.send_keepalive(time.monotonic(), time.time())  # no session: starts a handshake
    side.flush()
    assert [len(d) for d in side.sent] == [148] and side.sent[0][:4] == b"\x01\x00\x00\x00"

    side.pump(lambda: side.peer.current is not None, "wireguard-go's handshake response")
    assert side.received[0][:4] == b"\x02\x00\x00\x00" and len(side.received[0]) == 92
    assert [(e.peer, e.initiator) for e in side.device.events if isinstance(e, HandshakeCompleted)] == [(side.peer, True)]
    # Key confirmation: the keepalive went out right after the response.
    assert side.sent[-1][:4] == b"\x04\x00\x00\x00" and len(side.sent[-1]) == 32

    ident = secrets.randbelow(0x10000)
    for seq in (1, 2, 3):
        payload = f"tunnelmesh interop {seq} ".encode() * 3
        side.send_ip(icmp_echo(OUR_IP, THEIR_IP, ident, seq, payload))

        def got_reply(seq: int = seq) -> bool:
            return any(
                (p := parse_icmp(pkt)) is not None and p["type"] == 0 and p["seq"] == seq for pkt in side.packets
            )

        side.pump(got_reply, f"echo reply {seq} from {THEIR_IP}")
        (reply,) = [p for p in map(parse_icmp, side.packets) if p and p["type"] == 0 and p["seq"] == seq]
        assert reply == {
            "src": THEIR_IP, "dst": OUR_IP, "type": 0, "code": 0, "id": ident, "seq": seq, "payload": payload,
        }, reply
    assert time.monotonic() - t0 < 4 * WAIT
    assert not side.device.drops, dict(side.device.drops)
    assert_wg_saw_a_session(side)


def test_wireguard_go_initiates_and_we_answer_its_pings(our_side: OurSide) -> None:
    side = our_side
    answered: list[int] = []

    def answer(packet: bytes) -> None:
        p = parse_icmp(packet)
        if p is None or p["type"] != 8 or p["src"] != THEIR_IP or p["dst"] != OUR_IP:
            return
        side.send_ip(icmp_echo(OUR_IP, THEIR_IP, p["id"], p["seq"], p["payload"], reply=True))
        answered.append(p["seq"])

    ping = side.wg.node.popen("ping", "-n", "-c", "3", "-W", "2", OUR_IP, log_name="ping")
    try:
        side.pump(
            lambda: bool(side.received), "wireguard-go's handshake initiation (triggered by ping)", on_packet=answer
        )
        assert side.received[0][:4] == b"\x01\x00\x00\x00" and len(side.received[0]) == 148
        side.pump(lambda: side.sent != [], "our handshake response", on_packet=answer)
        assert side.sent[0][:4] == b"\x02\x00\x00\x00" and len(side.sent[0]) == 92, side.state()
        side.pump(
            lambda: side.peer.current is not None, "wireguard-go's first transport message (key confirmation)",
            on_packet=answer,
        )
        assert [(e.peer, e.initiator) for e in side.device.events if isinstance(e, HandshakeCompleted)] == [
            (side.peer, False)
        ]
        side.pump(lambda: ping.poll() is not None, "the end of ping -c 3", timeout=15, on_packet=answer)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait(5)
    output = side.wg.node.log("ping")
    assert ping.returncode == 0, f"ping exited {ping.returncode}:\n{output}\n{side.state()}"
    assert " 3 received" in output, output
    assert sorted(answered) == [1, 2, 3], f"answered echo requests {answered}"
    assert not side.device.drops, dict(side.device.drops)
    assert_wg_saw_a_session(side)


def test_checksum_helpers_match_the_kernel_convention() -> None:
    """The example from RFC 1071 and a packet whose checksums verify to zero."""
    assert inet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2) & 0xFFFF
    packet = icmp_echo(OUR_IP, THEIR_IP, 7, 9, b"abc")
    assert parse_icmp(packet) == {
        "src": OUR_IP, "dst": THEIR_IP, "type": 8, "code": 0, "id": 7, "seq": 9, "payload": b"abc",
    }
    assert parse_icmp(packet[:-1] + bytes([packet[-1] ^ 1])) is None
