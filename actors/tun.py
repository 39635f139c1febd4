"""The TUN device edge: created and configured with ioctls (netlink, through pyroute2, only for IPv6 and routes).

Closing the file descriptor of a non-persistent TUN device removes the
interface, and the kernel removes its addresses and routes with it, so
shutdown (or a crash) leaves nothing behind.

The device is opened with `IFF_VNET_HDR` and the offloads `TUNSETOFFLOAD` accepts
(checksum, TSO for IPv4 and IPv6, USO where the kernel has it, Linux 6.2+): every
packet then carries a 10-byte virtio-net header and the kernel hands over and takes
back super-packets of up to 64 KiB (tunnelmesh.offload splits and joins them). Where
the kernel refuses an offload the next smaller set is tried, down to none.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable


TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
TUN_PATH = "/dev/net/tun"
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
IFF_UP = 0x1
#: Offload sets to ask for, largest first, and how `status` names them.
OFFLOADS = (
    (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6, "csum tso uso"),
    (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6, "csum tso"),
    (TUN_F_CSUM, "csum"),
)


class TunError(Exception):
    """Creating or configuring the TUN device failed; the message says what to do."""


class TunDevice:
    """The real TUN edge (actors.edges.Tun): `readv` and `write` are os.readv/os.write
    bound to the descriptor, C functions, no Python frame per packet."""

    def __init__(self, name: str, fd: int, offloads: str = "") -> None:
        self.name = name
        self.fd = fd
        #: What the kernel accepted ("csum tso uso", ...); "" for a device without the
        #: virtio-net header (plain packets).
        self.offloads = offloads
        self.vnet_hdr = bool(offloads)
        self.readv = functools.partial(os.readv, fd)
        self.write = functools.partial(os.write, fd)

    def fileno(self) -> int:
        return self.fd

    @classmethod
    def create(cls, name: str, *, offload: bool = True) -> TunDevice:
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TunError(
                f"{TUN_PATH} does not exist: load the tun module (modprobe tun), "
                "or give a container --device /dev/net/tun"
            ) from None
        except PermissionError:
            raise TunError(f"cannot open {TUN_PATH}: tunnelmesh needs root or CAP_NET_ADMIN") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)))
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EPERM:
                raise TunError(f"creating interface {name} was refused: tunnelmesh needs root or CAP_NET_ADMIN") from None
            if exc.errno == errno.EBUSY:
                raise TunError(f"interface {name} is in use (is another tunnelmesh running?); set `interface` in the config") from None
            raise TunError(f"creating interface {name} failed: {exc.strerror}") from None
        return cls(name, fd, _negotiate_offloads(fd) if offload else "")

    async def configure(
        self, address: ipaddress.IPv4Interface, mtu: int, routes: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
        *, address6: ipaddress.IPv6Interface | None = None,
    ) -> None:
        """MTU, IPv4 address and "up" by the interface ioctls (the kernel routes the
        address's own prefix); netlink (pyroute2) only for what they cannot do, an IPv6
        address without duplicate address detection and routes beyond the prefix. A static
        mesh needs neither: it starts without pyroute2's imports (~0.1 s, ~10 MiB)."""
        extra = [route for route in routes
                 if not (route.version == 4 and route.subnet_of(address.network))]  # type: ignore[arg-type]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
                name = self.name.encode()
                fcntl.ioctl(control, SIOCSIFMTU, struct.pack("16si20x", name, mtu))
                fcntl.ioctl(control, SIOCSIFADDR, _ifreq_address(name, address.ip))
                fcntl.ioctl(control, SIOCSIFNETMASK, _ifreq_address(name, address.netmask))
                _no_link_local(self.name)
                flags = struct.unpack_from("16xH", fcntl.ioctl(control, SIOCGIFFLAGS, struct.pack("16s24x", name)))[0]
                fcntl.ioctl(control, SIOCSIFFLAGS, struct.pack("16sH22x", name, flags | IFF_UP))
        except OSError as exc:
            raise TunError(f"configuring {self.name} failed: {exc.strerror}") from None
        if address6 is not None or extra:
            await self._configure_by_netlink(address6, extra)

    async def _configure_by_netlink(self, address6: ipaddress.IPv6Interface | None,
                                    routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            async with AsyncIPRoute() as ipr:
                index = (await ipr.link_lookup(ifname=self.name))[0]
                if address6 is not None:
                    # nodad: the address is ours by assignment; waiting for DAD would delay traffic.
                    await ipr.addr("add", index=index, address=str(address6.ip), prefixlen=address6.network.prefixlen,
                                   flags=0x02)
                for route in routes:
                    await ipr.route("replace", dst=str(route), oif=index)
        except NetlinkError as exc:
            raise TunError(f"configuring {self.name} failed: {os.strerror(exc.code)}") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _no_link_local(name: str) -> None:
    """No IPv6 link-local address on the interface (addr_gen_mode 1, "none"), set before it
    goes up: the kernel would send router solicitations and MLD reports from it into the
    tunnel, which no peer routes (drops counted as "no peer for destination", wake-ups of
    an idle daemon). A mesh IPv6 address is assigned, not generated."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/addr_gen_mode", "w") as mode:
            mode.write("1")
    except OSError:
        pass  # a kernel without IPv6: nothing to turn off


def _negotiate_offloads(fd: int) -> str:
    """Turn on the largest offload set the kernel accepts; its name ("none" when even the
    checksum offload is refused: the header is then always empty, packets plain)."""
    for flags, offloads in OFFLOADS:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
        except OSError:
            continue
        return offloads
    return "none"


def _ifreq_address(name: bytes, address: ipaddress.IPv4Address) -> bytes:
    """struct ifreq holding a struct sockaddr_in (family, port 0, the address)."""
    return struct.pack("16sH2x4s8x", name, socket.AF_INET, address.packed)
