"""Hostile requests to a running coordinator: arbitrary bytes, arbitrary JSON and
near-valid bodies (one part of a valid request replaced or dropped) to every route,
with no, arbitrary, near-valid or valid-but-for-another-request Authorization
headers. None may give a 500 (a refusal is a JSON error) and none may change a
row of the database.

The coordinator runs in a thread of its own (one event loop, one SQLite file) for
the whole module; each example is one plain HTTP request from the test thread.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import AsyncExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.support.coordinator import (
    JSON,
    SECRET,
    World,
    invited,
    join,
    join_request,
    now,
    serving,
    snapshot,
)
from tunnelmesh.admission import sealed_secret
from tunnelmesh.membership import (
    JOIN_NAMESPACE,
    REQUEST_NAMESPACE,
    RequestAuth,
    Revocation,
    SecretRecord,
    b64,
    join_proof_message,
    request_message,
    sign_admin_request,
)

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

MEMBER_ROUTES = [("POST", "/v1/register"), ("GET", "/v1/map")]
ADMIN_ROUTES = [("POST", "/v1/admin/setup"), ("GET", "/v1/admin/pending"), ("POST", "/v1/admin/approve"),
                ("POST", "/v1/admin/refuse"), ("POST", "/v1/admin/revoke"), ("POST", "/v1/admin/secret"),
                ("GET", "/v1/admin/map")]
#: Parts of a valid admin body left as they are: they are the admin's word, opaque to the
#: coordinator (a sealed secret, a reason), so another well-formed value is rightly taken.
#: The other parts of those bodies are mutated.
ADMIN_WORD = {"/v1/admin/approve": "secret", "/v1/admin/refuse": "reason"}
OPEN_ROUTES = ["/v1/join/propose", "/v1/join/confirm", "/v1/join/request"]


@dataclass(frozen=True)
class Server:
    port: int
    db: Path
    world: World
    valid: dict[str, JSON]  # a body each POST route would accept (most would change the database)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    db = tmp_path_factory.mktemp("coordinator") / "coordinator.db"
    world = World.create()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stack = AsyncExitStack()

    async def start() -> Server:
        served = await stack.enter_async_context(serving(db, world, admit=False))
        url, admin_node = served.url, served.admin_node
        async with served.machine.admitting():  # only while "one" joins: nothing writes during the examples
            one = (await join(url, world, 1, world.invite(), "one"))["member"]
        await join_request(url, world, 2, "late")
        entry, proof = await invited(world, 3, world.body(3, "three", 4), world.invite())
        request = {"identity": world.nodes[4].public.to_line(), "name": "four", "t": now()}
        request_proof = await world.nodes[4].sign(join_proof_message({"request": request}), JOIN_NAMESPACE)
        members = [world.entry(admin_node), world.entry(one)]
        valid: dict[str, JSON] = {
            "/v1/join/propose": {"identity": world.nodes[3].public.to_line(), "name": "three",
                                 "grant": world.invite().grant},
            "/v1/join/confirm": {"entry": entry, "proof": b64(proof)},
            "/v1/join/request": {**request, "proof": b64(request_proof)},
            "/v1/register": {"listen_port": 51820, "addresses": ["192.0.2.1:51820"]},
            "/v1/admin/setup": {"network": world.network.to_wire(), "member": admin_node},
            "/v1/admin/approve": {"member": world.admin_member(2, "late", 3),
                                  "secret": sealed_secret(world.entry(world.admin_member(2, "late", 3)), SECRET, 0)},
            "/v1/admin/refuse": {"wg_key": b64(world.nodes[2].public.wg_public_key), "reason": "not today"},
            "/v1/admin/revoke": {"revocation": Revocation.create(world.admin, members[1], now()).to_wire()},
            "/v1/admin/secret": {"record": SecretRecord.create(world.admin, 1, SECRET, members, now()).to_wire()},
        }
        return Server(int(url.rsplit(":", 1)[1]), db, world, valid)

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def send_unchanged(server: Server, method: str, path: str, body: bytes, auth: str | None) -> int:
    """Send one request; it must be answered (JSON error if refused) and change no row."""
    before = snapshot(server.db)
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=40)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        status, raw = response.status, response.read()
    finally:
        conn.close()
    assert status < 500, raw
    if status >= 400:
        assert isinstance(json.loads(raw)["error"], str)
    assert snapshot(server.db) == before
    return status


# --- strategies ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside a JSON value (dict keys and list indexes), outermost first."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return found
    for k, v in items:
        found += paths(v, (*prefix, k))
    return found


@st.composite
def mutated(draw: st.DrawFn, base: JSON, keep: str | None = None) -> JSON:
    """`base` with one part (at any depth, but not its `keep` field nor inside it) replaced by
    arbitrary JSON, or dropped."""
    body = json.loads(json.dumps(base))
    where = draw(st.sampled_from([p for p in paths(body) if p[0] != keep]))
    parent = body
    for step in where[:-1]:
        parent = parent[step]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[where[-1]]
    else:
        parent[where[-1]] = draw(json_values)
    assume(body != base)
    return body


def bodies(base: JSON | None, keep: str | None = None) -> st.SearchStrategy[bytes]:
    choices = [st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())]
    if base is not None:
        choices.append(mutated(base, keep).map(lambda v: json.dumps(v).encode()))
    return st.one_of(choices)


def tm1(payload: Any) -> str:
    return "TM1 " + base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@st.composite
def near_valid_auth(draw: st.DrawFn, who: list[str]) -> str:
    payload = {
        "who": draw(st.sampled_from(who) | json_values),
        # An offset from the clock, added when drawn: bounds that moved with the clock
        # would make hypothesis's replay of an example draw differently.
        "t": draw(st.integers(-200, 200).map(lambda offset: now() + offset) | json_values),
        "n": draw(st.text("0123456789abcdef", min_size=32, max_size=32) | json_values),
        "sig": draw(st.binary(max_size=200).map(b64) | json_values),
    }
    for key in draw(st.sets(st.sampled_from(sorted(payload)), max_size=2)):
        del payload[key]
    return tm1(payload)


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200)


def hostile_auth(who: list[str]) -> st.SearchStrategy[str | None]:
    return st.one_of(st.none(), header_text, header_text.map(lambda t: "TM1 " + t),
                     json_values.map(tm1), near_valid_auth(who))


# --- properties ------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_open_routes_refuse_hostile_bodies_cleanly(server: Server, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(OPEN_ROUTES))
    send_unchanged(server, "POST", path, data.draw(bodies(server.valid[path])), None)


@FUZZ
@given(data=st.data())
def test_signed_routes_refuse_hostile_authorization(server: Server, data: st.DataObject) -> None:
    method, path = data.draw(st.sampled_from(MEMBER_ROUTES + ADMIN_ROUTES))
    body = data.draw(st.sampled_from([b"", json.dumps(server.valid.get(path, {})).encode()]))
    members = [b64(node.public.wg_public_key) for node in server.world.nodes[:3]]
    auth = data.draw(st.one_of(
        hostile_auth(["admin", *members]),
        # A genuine admin signature, made for another request.
        st.just(sign_admin_request(server.world.admin, method, path + "?x", body, now())),
    ))
    assert send_unchanged(server, method, path, body, auth) in (400, 401, 403)


@FUZZ
@given(data=st.data())
def test_admin_routes_refuse_hostile_bodies_signed_by_the_admin(server: Server, data: st.DataObject) -> None:
    method, path = data.draw(st.sampled_from([r for r in ADMIN_ROUTES if r[0] == "POST"]))
    body = data.draw(bodies(server.valid[path], ADMIN_WORD.get(path)))
    send_unchanged(server, method, path, body, sign_admin_request(server.world.admin, method, path, body, now()))


def holds(since: str, wait: str, version: int) -> bool:
    """Whether the coordinator would hold this long-poll (nothing newer, a wait above 0)."""
    try:
        return int(since) == version and float(wait) > 0
    except ValueError:
        return False


@FUZZ
@given(since=st.integers(-5, 2**64).map(str) | header_text,
       wait=st.sampled_from(["0", "-1", "nan", "inf", "1e999", "0.0"]) | header_text)
def test_map_refuses_hostile_queries_from_a_member(server: Server, since: str, wait: str) -> None:
    with closing(sqlite3.connect(server.db)) as conn:
        version = conn.execute("SELECT version FROM network").fetchone()[0]
    assume(not holds(since, wait, version))
    path = "/v1/map?" + urllib.parse.urlencode({"since": since, "wait": wait})
    identity = server.world.nodes[1]
    t, nonce = now(), os.urandom(16).hex()
    signature = asyncio.run(identity.sign(request_message("GET", path, t, nonce, b""), REQUEST_NAMESPACE))
    auth = RequestAuth(b64(identity.public.wg_public_key), t, nonce, signature).header()
    send_unchanged(server, "GET", path, b"", auth)
