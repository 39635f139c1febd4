"""The control socket under hostile or awkward use: the daemon answers with an
error and keeps running; a ping to a silent peer neither blocks `status` nor
outlives its own timeout. Its replies and events fit the schema (docs/control.md)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time

import pytest

from actors.messages import CONTROL_VERSION, Event, HandshakeDone, PeerAdded, PingResult, from_json
from tests.support.wait import wait_for
from tools.lab import clean_environment
from tools.mesh import build_static_mesh, wait_for_handshakes

pytestmark = pytest.mark.e2e

CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])
s.sendall(sys.stdin.buffer.read())
data = b""
while not data.endswith(b"\\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(data.decode().strip())
"""


STREAM = """
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b'{"cmd":"events"}\\n')
for line in s.makefile("rb"):
    sys.stdout.write(line.decode()); sys.stdout.flush()
"""


def _raw(member, payload: bytes) -> dict:
    result = member.node.run(sys.executable, "-c", CLIENT, f"{member.node.state_dir}/control.sock",
                             input=payload.decode(), timeout=20)
    return json.loads(result.stdout)


def test_hostile_requests_get_errors_and_the_daemon_lives_on(lab):
    mesh = build_static_mesh(lab, ["a", "b"])
    a = mesh["a"]
    deep = _raw(a, b"[" * 30000 + b"\n")
    assert deep["ok"] is False and "bad request" in deep["error"]
    nan = _raw(a, b'{"cmd":"ping","peer":"b","wait":NaN}\n')
    assert nan["ok"] is False and "wait" in nan["error"]
    unknown = _raw(a, b'{"cmd":"rm -rf"}\n')
    assert unknown["ok"] is False and "unknown command" in unknown["error"]
    not_object = _raw(a, b'"status"\n')
    assert not_object["ok"] is False
    assert a.status()["node"]["name"] == "a"  # still serving


def test_ping_to_a_silent_peer_times_out_and_does_not_block_status(lab):
    mesh = build_static_mesh(lab, ["a", "b"])
    wait_for_handshakes(mesh)
    a, b = mesh["a"], mesh["b"]
    pinged = a.tm("ping", "b", "-c", "2", "-i", "0.1", "--json").stdout
    answered = [from_json(PingResult, json.loads(line)) for line in pinged.splitlines()]
    assert [r.ok for r in answered] == [True, True] and all(r.rtt_ms is not None and r.path for r in answered), answered
    b.down()

    def sent_to_b() -> int:
        return next(p["tx_bytes"] for p in a.status()["peers"] if p["name"] == "b")

    before = sent_to_b()
    cmd = ["ip", "netns", "exec", a.node.netns, sys.executable, "-m", "tunnelmesh",
           "--state-dir", str(a.node.state_dir), "ping", "b", "-c", "1", "--timeout", "8"]
    started = time.monotonic()
    ping = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_environment())
    try:
        wait_for("the ping's echo request leaves for b", lambda: sent_to_b() > before, 6)
        status_started = time.monotonic()
        status = a.status()  # must answer while the ping is waiting
        status_took = time.monotonic() - status_started
        assert ping.poll() is None, "the ping ended before status was asked: nothing was waiting"
        out, err = ping.communicate(timeout=30)
    finally:
        if ping.poll() is None:
            ping.kill()
    took = time.monotonic() - started
    assert status["peers"][0]["name"] == "b"
    assert status_took < 5, f"status took {status_took:.1f} s behind a pending ping"
    assert ping.returncode == 1, (out, err)
    assert "no reply" in out, (out, err)
    assert 7 <= took < 20, f"ping with --timeout 8 took {took:.1f} s"


def test_status_and_the_event_stream_carry_the_version_and_typed_events(lab):
    mesh = build_static_mesh(lab, ["a", "b"])
    wait_for_handshakes(mesh)
    a, b = mesh["a"], mesh["b"]
    status = a.status()  # checked against the schema by MeshNode.status
    assert status["control_version"] == CONTROL_VERSION and status["node"]["events_dropped"] == 0, status
    peers = json.loads(a.tm("peers", "--json").stdout)
    assert [(p["name"], p["path"]["rung"]) for p in peers] == [("b", "udp")], peers
    stream = subprocess.Popen(["ip", "netns", "exec", a.node.netns, sys.executable, "-c", STREAM,
                               f"{a.node.state_dir}/control.sock"], stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream.stdout], daemon=True).start()
    try:
        assert json.loads(lines.get(timeout=10)) == {"ok": True, "result": {"control_version": CONTROL_VERSION}}
        b.down()
        b.up()  # b starts afresh: a hears its handshake
        seen: list[Event] = []
        deadline = time.monotonic() + 30
        while not any(isinstance(e, HandshakeDone) and e.peer == "b" for e in seen):
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue.Empty:
                raise AssertionError(f"no handshake event from b within 30 s; events: {seen}") from None
            seen.append(from_json(Event, json.loads(line)))  # every event fits the schema
        assert not [e for e in seen if isinstance(e, PeerAdded)], seen  # a's peers did not change
    finally:
        stream.kill()
        stream.wait()
