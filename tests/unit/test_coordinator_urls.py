"""tunnelmesh.coordinator.failover: which coordinator a node talks to, of several, in
hand-stepped time. Each rule of the module's header, the walk through a list that
keeps failing, and a later URL that keeps refusing."""

from __future__ import annotations

import pytest

from tunnelmesh.coordinator.failover import BACKOFF_MAX, PREFERRED_RETRY, REFUSALS_TO_MOVE, SPREAD, CoordinatorUrls

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
        wait = chooser.unreachable(now=0.0)
        walk.append((chooser.current, wait))
    assert walk[:6] == [(B, 0.0), (C, 0.0), (A, 1.0), (B, 0.0), (C, 0.0), (A, 2.0)]
    assert [wait for _, wait in walk[2::3]] == [1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX, BACKOFF_MAX]


def test_one_url_waits_after_every_failure_as_a_lone_coordinator_always_did() -> None:
    chooser = urls(A)
    assert [chooser.unreachable(now=0.0) for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert chooser.current == A and chooser.preferred_due() is None


def test_a_register_answered_ends_the_streak_and_the_next_round_waits_from_the_start() -> None:
    chooser = urls(A, B)
    for _ in range(6):
        chooser.unreachable(now=0.0)  # three rounds: the next would wait 8 s
    chooser.connected()
    assert chooser.failures == 0
    assert (chooser.unreachable(now=0.0), chooser.unreachable(now=0.0)) == (0.0, 1.0)


def test_a_refusal_from_the_preferred_url_stays_on_it_and_backs_off_for_ever() -> None:
    chooser = urls(A, B)
    assert [chooser.refused(now=0.0) for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert (chooser.current, chooser.refusals, chooser.preferred_due()) == (A, 0, None)
    chooser.connected()
    assert chooser.refused(now=0.0) == 1.0


def test_the_nodes_own_failure_stays_on_any_url_and_backs_off() -> None:
    chooser = urls(A, B)
    chooser.unreachable(now=0.0)  # on B now
    assert [chooser.stay() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert chooser.current == B
    chooser.connected()
    assert chooser.stay() == 1.0


def test_a_later_url_refusing_again_and_again_counts_as_failing_and_the_next_is_tried_at_once() -> None:
    chooser = urls(A, B, C)
    chooser.unreachable(now=0.0)  # on B now
    waits = [chooser.refused(now=1.0) for _ in range(REFUSALS_TO_MOVE)]
    assert waits == [1.0, 2.0, 0.0] and (chooser.current, chooser.refusals) == (C, 0)
    assert [chooser.refused(now=1.0) for _ in range(REFUSALS_TO_MOVE)] == [4.0, 8.0, 0.0]
    assert chooser.current == A  # on round the list, as after any failure


def test_refusals_count_in_a_row_only() -> None:
    """A register answered, or a move, starts the count of a later URL's refusals anew."""
    chooser = urls(A, B)
    chooser.unreachable(now=0.0)
    chooser.refused(now=0.0)
    chooser.refused(now=0.0)
    chooser.connected()
    assert [chooser.refused(now=0.0) for _ in range(REFUSALS_TO_MOVE - 1)] == [1.0, 2.0]
    assert chooser.current == B
    chooser.preferred_answered()
    chooser.unreachable(now=0.0)  # on B again: a new count
    assert chooser.refused(now=0.0) == 4.0 and chooser.current == B


def test_a_refusal_starts_the_round_anew() -> None:
    """A coordinator that answered (with a refusal) is no failure of the round: the next
    failure moves on at once rather than ending the round."""
    chooser = urls(A, B)
    chooser.unreachable(now=0.0)
    chooser.refused(now=0.0)
    assert chooser.unreachable(now=0.0) == 0.0 and chooser.current == A


def test_on_a_later_url_the_preferred_one_is_asked_after_the_retry_interval_spread() -> None:
    chooser = urls(A, B, retry=60.0, spread=0.5)
    chooser.unreachable(now=1000.0)
    assert chooser.preferred_due() == 1060.0  # from leaving the preferred one on
    chooser.connected()  # connected to B: the deadline holds, as with every session at B
    chooser.connected()
    assert chooser.preferred_due() == 1060.0
    chooser.preferred_silent(now=1060.0)
    assert chooser.preferred_due() == 1120.0 and chooser.current == B
    chooser.preferred_answered()
    assert (chooser.current, chooser.preferred_due()) == (A, None)


def test_the_preferred_one_is_asked_whatever_the_later_url_answers() -> None:
    """Not connected to B, only refused or backing off there: the asks go on, so a node is
    never stuck on a later coordinator that refuses it."""
    chooser = urls(A, B, C, retry=60.0, spread=0.5)
    chooser.unreachable(now=0.0)
    assert chooser.preferred_due() == 60.0
    chooser.refused(now=10.0)
    chooser.stay()  # the node's own failure between: no refusal, but no answer either
    chooser.refused(now=20.0)
    chooser.preferred_silent(now=60.0)
    assert chooser.preferred_due() == 120.0
    chooser.refused(now=70.0)  # the third refusal: on to C, still asking on the same schedule
    assert chooser.current == C and chooser.preferred_due() == 120.0
    chooser.unreachable(now=80.0)  # C failed too: the round reaches A, which ends the asking
    assert (chooser.current, chooser.preferred_due()) == (A, None)


@pytest.mark.parametrize(("spread", "after"), [(0.0, 60.0 * (1 - SPREAD)), (0.999, 60.0 * (1 + SPREAD * 0.998))])
def test_the_asks_are_spread_within_bounds(spread: float, after: float) -> None:
    chooser = urls(A, B, retry=60.0, spread=spread)
    chooser.unreachable(now=0.0)
    due = chooser.preferred_due()
    assert due is not None and due == pytest.approx(after)


def test_a_round_that_reaches_the_preferred_url_ends_the_asking() -> None:
    chooser = urls(A, B)
    chooser.unreachable(now=0.0)
    chooser.connected()
    assert chooser.preferred_due() is not None
    assert chooser.unreachable(now=0.0) == 0.0  # B failed: on to A, a new streak
    assert (chooser.current, chooser.preferred_due()) == (A, None)
    chooser.connected()
    assert chooser.preferred_due() is None


def test_back_on_the_preferred_url_a_later_failover_asks_afresh() -> None:
    chooser = urls(A, B, C, retry=10.0)
    chooser.unreachable(now=0.0)
    chooser.preferred_answered()
    assert chooser.unreachable(now=50.0) == 0.0 and chooser.current == B  # the preferred one failed again
    assert chooser.preferred_due() == 60.0
    chooser.unreachable(now=55.0)  # B failed too: on C, the same ask
    assert chooser.preferred_due() == 60.0
