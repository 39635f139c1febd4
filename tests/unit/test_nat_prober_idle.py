"""An idle NAT prober without a STUN server (a static node's, unless [nat] stun_servers)
does not read the machine's addresses at all (nor loads pyroute2 for it): only a check
that asks a server uses them. Once a server is known it watches them again."""

from __future__ import annotations

import asyncio

from actors.nat_prober import ADDRESS_POLL, NatProber
from tests.support.memnet import Net, VirtualClock, VirtualLoop


def test_without_a_server_the_addresses_are_never_read() -> None:
    clock = VirtualClock()
    servers: list[str] = []
    reads: list[float] = []

    async def local_addresses() -> list[str]:
        reads.append(clock.now)
        return ["192.0.2.1"]

    async def body(net: Net) -> None:
        nat = NatProber(send=lambda data, address: 0, register=lambda handler: None, port=51820,
                        servers=lambda: servers, local_addresses=local_addresses, clock=clock)
        await nat.setup()
        await net.run_for(ADDRESS_POLL * 6 + 1)
        assert reads == []  # the check at start says no server is known without them
        assert nat.report.error is not None and "no STUN server known" in nat.report.error
        servers.append("192.0.2.9:3478")  # e.g. the coordinator's, from its register reply
        read_before = len(reads)
        await net.run_for(ADDRESS_POLL * 2 + 1)
        assert len(reads) > read_before  # the new server is checked, and the addresses watched again
        await nat.stop_tasks()

    with asyncio.Runner(loop_factory=lambda: VirtualLoop(clock)) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, VirtualLoop)
        runner.run(body(Net(clock, loop)))
