"""tunnelmesh.coordinator.failover: which coordinator a node talks to, of several, in
hand-stepped time. Each rule of the module's header, and the walk through a list that
keeps failing."""

from __future__ import annotations

import pytest

from tunnelmesh.coordinator.failover import BACKOFF_MAX, PREFERRED_RETRY, SPREAD, CoordinatorUrls

A, B, C = "https://c1:7400", "https://c2:7400", "https://c3:7400"


def urls(*listed: str, retry: float = PREFERRED_RETRY, spread: float = 0.5) -> CoordinatorUrls:
    return CoordinatorUrls(listed, preferred_retry=retry, spread=lambda: spread)


def test_it_starts_on_the_preferred_url_and_needs_one() -> None:
    chooser = urls(A, B)
    assert (chooser.current, chooser.preferred, chooser.preferred_due()) == (A, A, None)
    with pytest.raises(ValueError):
        CoordinatorUrls(())


def test_a_failure_moves_to_the_next_at_once_and_a_whole_round_waits_doubling_up_to_the_cap() -> None:
    chooser = urls(A, B, C)
    walk = []
    for _ in range(21):  # seven rounds
        wait = chooser.unreachable()
        walk.append((chooser.current, wait))
    assert walk[:6] == [(B, 0.0), (C, 0.0), (A, 1.0), (B, 0.0), (C, 0.0), (A, 2.0)]
    assert [wait for _, wait in walk[2::3]] == [1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX, BACKOFF_MAX]


def test_one_url_waits_after_every_failure_as_a_lone_coordinator_always_did() -> None:
    chooser = urls(A)
    assert [chooser.unreachable() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert chooser.current == A and chooser.preferred_due() is None


def test_a_register_answered_ends_the_streak_and_the_next_round_waits_from_the_start() -> None:
    chooser = urls(A, B)
    for _ in range(6):
        chooser.unreachable()  # three rounds: the next would wait 8 s
    chooser.connected(now=100.0)
    assert chooser.failures == 0
    assert (chooser.unreachable(), chooser.unreachable()) == (0.0, 1.0)


def test_a_refusal_stays_on_the_url_in_use_and_backs_off() -> None:
    chooser = urls(A, B)
    chooser.unreachable()  # on B now
    assert [chooser.stay() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert chooser.current == B
    chooser.connected(now=0.0)
    assert chooser.stay() == 1.0


def test_a_refusal_starts_the_round_anew() -> None:
    """A coordinator that answered (with a refusal) is no failure of the round: the next
    failure moves on at once rather than ending the round."""
    chooser = urls(A, B)
    chooser.unreachable()
    chooser.stay()
    assert chooser.unreachable() == 0.0 and chooser.current == A


def test_on_a_later_url_the_preferred_one_is_asked_after_the_retry_interval_spread() -> None:
    chooser = urls(A, B, retry=60.0, spread=0.5)
    chooser.unreachable()
    assert chooser.preferred_due() is None  # not before it is connected to B
    chooser.connected(now=1000.0)
    assert chooser.preferred_due() == 1060.0
    chooser.connected(now=1030.0)  # connected again (a new session at B): the deadline holds
    assert chooser.preferred_due() == 1060.0
    chooser.preferred_silent(now=1060.0)
    assert chooser.preferred_due() == 1120.0 and chooser.current == B
    chooser.preferred_answered()
    assert (chooser.current, chooser.preferred_due()) == (A, None)


@pytest.mark.parametrize(("spread", "after"), [(0.0, 60.0 * (1 - SPREAD)), (0.999, 60.0 * (1 + SPREAD * 0.998))])
def test_the_asks_are_spread_within_bounds(spread: float, after: float) -> None:
    chooser = urls(A, B, retry=60.0, spread=spread)
    chooser.unreachable()
    chooser.connected(now=0.0)
    due = chooser.preferred_due()
    assert due is not None and due == pytest.approx(after)


def test_a_round_that_reaches_the_preferred_url_ends_the_asking() -> None:
    chooser = urls(A, B)
    chooser.unreachable()
    chooser.connected(now=0.0)
    assert chooser.preferred_due() is not None
    assert chooser.unreachable() == 0.0  # B failed: on to A, a new streak
    assert (chooser.current, chooser.preferred_due()) == (A, None)
    chooser.connected(now=5.0)
    assert chooser.preferred_due() is None


def test_back_on_the_preferred_url_a_later_failover_asks_afresh() -> None:
    chooser = urls(A, B, C, retry=10.0)
    chooser.unreachable()
    chooser.connected(now=0.0)
    chooser.preferred_answered()
    assert chooser.unreachable() == 0.0 and chooser.current == B  # the preferred one failed again
    chooser.connected(now=50.0)
    assert chooser.preferred_due() == 60.0
