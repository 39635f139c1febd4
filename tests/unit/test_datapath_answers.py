"""The kernel answers a packet written to the TUN before the write returns (an echo
request's reply, TCP's ACKs), and the data path sends such answers in the same batch
(actors/datapath.py). They must go where the batch's own events just pointed the path:
the session handles them first. In-memory network, virtual time, with a "kernel" that
answers inside the write."""

from __future__ import annotations

from tests.support.memnet import Node
from tests.unit.test_session_ladder import A2, ALL, Pair, _connected, in_virtual_time, up_on_udp


def answers_inside_the_write(node: Node) -> None:
    write = node.tun.write

    def write_and_answer(data: bytes) -> int:
        written = write(data)
        node._kernel()  # the echo reply is queued before the write returns, as Linux does
        return written

    node.tun.write = write_and_answer  # type: ignore[method-assign]


def test_the_first_ping_to_a_peer_without_an_endpoint_is_answered() -> None:
    """b learns where a is from the handshake that carries a's first ping: its reply is
    sealed after that handshake's event set b's endpoint, not dropped for want of one."""
    async def body(p: Pair) -> None:
        answers_inside_the_write(p.b)
        p.a.ping(p.b, 1)  # staged on a until the handshake, then a's confirming packet
        await p.net.run_until(lambda: bool(p.a.echo_replies), 3.0, "a's first ping answered")
        assert "peer has no endpoint" not in p.b.device.drops

    in_virtual_time(lambda net: _connected(net, ALL, ALL, (), body))


def test_the_first_answer_after_the_peer_moved_goes_to_its_new_address() -> None:
    async def body(p: Pair) -> None:
        await up_on_udp(p)
        await p.net.run_for(20.0)
        answers_inside_the_write(p.b)
        p.net.rebind(p.a, A2)  # a's NAT mapping changed
        p.a.ping(p.b, 1)
        await p.net.run_until(lambda: bool(p.a.echo_replies), 1.0, "a's ping from its new address answered")
        assert not [s for s in p.net.sent(src="b", kind=4) if not s.delivered]  # nothing went to the old one

    in_virtual_time(lambda net: _connected(net, ALL, ALL, (), body))
