"""Hostile input to the relay's parsing: a client's first message raises only a
Refusal (code 4000), a frame is forwarded or one counted drop, never an
exception; a relay's greeting to a node is a challenge or a LinkError."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnelmesh.coordinator.relay import MALFORMED, Refusal, Relay, frame_problem, hello, parse_auth
from tunnelmesh.links import LinkError
from tunnelmesh.links.relay import CHALLENGE_SIZE, KEY_SIZE, MAX_FRAME, parse_hello

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NETWORK = "SHA256:relay-fuzz"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
b64_texts = st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()))


@st.composite
def auth_like(draw: st.DrawFn) -> Any:
    """Near-valid first messages: the right keys with wrong values, extra keys, other types."""
    body: dict[str, Any] = {"wg_key": draw(b64_texts | json_values), "sig": draw(b64_texts | json_values)}
    if draw(st.booleans()):
        body[draw(st.text(max_size=8))] = draw(json_values)
    return json.dumps(body)


first_messages = st.one_of(st.text(max_size=300), st.binary(max_size=300), json_values.map(json.dumps), auth_like(),
                           st.none(), st.integers())


@FUZZ
@given(first_messages)
def test_a_first_message_is_an_auth_or_a_malformed_refusal(data: Any) -> None:
    try:
        wg_key, signature = parse_auth(data)
    except Refusal as exc:
        assert exc.code == MALFORMED and exc.reason
        return
    assert len(wg_key) == KEY_SIZE and signature


@FUZZ
@given(st.binary(min_size=KEY_SIZE, max_size=KEY_SIZE), st.binary(min_size=1, max_size=3000))
def test_a_well_formed_auth_parses_back(wg_key: bytes, signature: bytes) -> None:
    text = json.dumps({"wg_key": base64.b64encode(wg_key).decode(), "sig": base64.b64encode(signature).decode()})
    assert parse_auth(text) == (wg_key, signature)


# Small frames, and frames around the largest allowed (a drawn head, zero padding).
frames = st.one_of(st.binary(max_size=200), st.tuples(st.binary(max_size=40), st.integers(-1, 2)).map(
    lambda drawn: (drawn[0] + bytes(MAX_FRAME + 2))[:MAX_FRAME + drawn[1]]))


@FUZZ
@given(frames)
def test_a_frame_is_forwardable_exactly_when_its_size_fits(frame: bytes) -> None:
    assert (frame_problem(frame) is None) == (KEY_SIZE < len(frame) <= MAX_FRAME)


@FUZZ
@given(st.lists(frames, max_size=20))
def test_forwarding_anything_never_raises_and_counts_one_drop_per_undeliverable_frame(batch: list[bytes]) -> None:
    relay = Relay(NETWORK, lambda key: None)  # no one connected: every frame is a drop
    for frame in batch:
        relay._forward(bytes(KEY_SIZE), frame)
    assert sum(relay.drops.values()) == len(batch)
    assert set(relay.drops) <= {"short frame", "oversize frame", "destination not connected"}


@FUZZ
@given(st.one_of(first_messages, st.binary(min_size=CHALLENGE_SIZE, max_size=CHALLENGE_SIZE).map(
    lambda c: hello(NETWORK, c))))
def test_a_greeting_is_a_challenge_or_a_link_error(data: Any) -> None:
    try:
        challenge = parse_hello(data, NETWORK)
    except LinkError as exc:
        assert str(exc)
        return
    assert len(challenge) == CHALLENGE_SIZE


@FUZZ
@given(st.binary(min_size=CHALLENGE_SIZE, max_size=CHALLENGE_SIZE), st.text(max_size=40))
def test_a_greeting_for_another_network_is_refused(challenge: bytes, other: str) -> None:
    assert parse_hello(hello(NETWORK, challenge), NETWORK) == challenge
    if other != NETWORK:
        try:
            parse_hello(hello(other, challenge), NETWORK)
        except LinkError as exc:
            assert "another network" in str(exc)
        else:
            raise AssertionError("a greeting for another network was taken")
