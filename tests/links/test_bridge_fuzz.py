"""Fuzzing the daemon's end of the SSH bridge (tunnelmesh/links/bridge.py) on a real Unix
socket: whatever a local process sends, a link comes up only after exactly the header line
of a current member, the frames after it arrive as a plain reading of the framing says, and
anything else is closed (a header that is wrong, or too long, counted once); never an
exception, never a connection left open (issue 17, part 5)."""

from __future__ import annotations

import asyncio
import base64
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.links import Directory, new_identity
from tests.links.test_ssh import Sink, run
from tests.property.test_framing_fuzz import reference
from tunnelmesh.identity import NodeIdentity
from tunnelmesh.links.bridge import _MAX_HEADER
from tunnelmesh.links.framing import frame
from tunnelmesh.links.ssh import SshRung

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CLOSE_BOUND = 10.0  # generous: how long the server may take to close a connection it refuses
REFUSALS = ("ssh: refused bridge bad header", "ssh: refused bridge key of no current member")


@pytest.fixture(scope="module")
def identities() -> list[NodeIdentity]:
    return [new_identity() for _ in range(2)]  # the daemon's, and the member's that the bridge carries


def header(key: bytes, version: bytes = b"1") -> bytes:
    return b"tunnelmesh-bridge " + version + b" " + base64.b64encode(key) + b"\n"


def headers(member: bytes) -> st.SearchStrategy[bytes]:
    good = header(member)
    return st.one_of(
        st.just(good),
        st.binary(min_size=32, max_size=32).map(header),  # a key of no member (or a bad one)
        st.just(header(member, b"2")),
        st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255))
        .map(lambda c: good[: c[0]] + bytes([good[c[0]] ^ c[1]]) + good[c[0] + 1:]),  # one byte changed
        st.integers(0, len(good) - 1).map(lambda cut: good[:cut]),  # cut short
        st.binary(max_size=200),
        st.just(good[:-1] + b" " * 100 + b"\n"),  # too long
    )


tails = st.lists(st.one_of(st.binary(min_size=1, max_size=300).map(frame), st.binary(max_size=40)), max_size=6).map(b"".join)
cuts = st.lists(st.integers(min_value=0, max_value=2000), max_size=6)


async def exchange(rung: SshRung, path: Path, data: bytes, cut_at: list[int]) -> None:
    """Send `data` in pieces, end our side, and wait for the server to close its own."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        bounds = sorted({c % (len(data) + 1) for c in cut_at} | {0, len(data)})
        for start, end in zip(bounds, bounds[1:]):
            writer.write(data[start:end])
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        async with asyncio.timeout(CLOSE_BOUND):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        pass  # refused while we were still sending
    finally:
        writer.close()


@FUZZ
@given(st.data())
def test_only_a_members_exact_header_makes_a_link(identities: list[NodeIdentity], data: st.DataObject) -> None:
    own, member = identities
    member_key = member.public.wg_public_key
    first = data.draw(headers(member_key), label="header")
    tail = data.draw(tails, label="tail")
    cut_at = data.draw(cuts, label="cuts")
    directory = Directory(members={member.public.ssh_public_key: member_key})
    sink = Sink()

    async def main() -> SshRung:
        rung = SshRung(identity=own, host_key=None, port=None, directory=directory, sink=sink)
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "bridge.sock"
            await rung.start_bridge(path, {os.getuid()})
            try:
                await exchange(rung, path, first + tail, cut_at)
                async with asyncio.timeout(CLOSE_BOUND):  # a link that came up is down again
                    while len(sink.downs) < len(sink.ups):
                        await asyncio.sleep(0.01)
            finally:
                await rung.close()
        return rung

    rung = run(main())
    stream = first + tail
    good = header(member_key)
    refusals = sum(rung.drops[cause] for cause in REFUSALS)
    if stream.startswith(good):
        assert [link.peer_key for link in sink.ups] == [member_key] and refusals == 0
        messages, _ = reference(stream[len(good):])
        assert [m for _, m in sink.received] == messages
    else:
        assert sink.ups == [] and sink.received == []
        line_end = stream.find(b"\n")
        decided = 0 <= line_end < _MAX_HEADER or len(stream) > _MAX_HEADER  # else it ended before a whole line
        assert refusals == (1 if decided else 0), (stream[:_MAX_HEADER + 1], dict(rung.drops))
