"""The path selector alone (tunnelmesh/path_selector.py): sans-IO, time passed in.

Its ladder is tested in test_ladder.py; here, what it adds around it: roaming within a
rung only, the coordinator's candidates, the rungs the config allows, evidence per rung,
and the path history. The session driving it with real cores is test_session_ladder.py."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from tunnelmesh.config import RungChoice
from tunnelmesh.ladder import RELAY, SSH, UDP, Probe, Switch
from tunnelmesh.path_selector import TRANSITIONS_KEPT, PathSelector, Transition, describe, rung_of

A1, A2, A3 = ("192.0.2.1", 51820), ("198.51.100.1", 40000), ("203.0.113.1", 51820)


@dataclass(frozen=True)
class Link:
    """A stand-in link: an endpoint that is not a UDP address."""

    rung: str
    description: str = "a link"
    closed: bool = False


def test_rung_of_and_describe() -> None:
    assert (rung_of(A1), describe(A1)) == (UDP, "udp 192.0.2.1:51820")
    assert describe(("2001:db8::1", 51820)) == "udp [2001:db8::1]:51820"
    assert (rung_of(Link(SSH, "ssh 192.0.2.2:2222")), describe(Link(SSH, "ssh 192.0.2.2:2222"))) == (SSH, "ssh 192.0.2.2:2222")


def test_roaming_follows_within_a_rung_and_never_across() -> None:
    selector = PathSelector(RungChoice())
    assert selector.roam(A2, A1) and selector.udp_address == A2  # a new NAT mapping
    assert selector.roam(Link(SSH), Link(SSH, "older connection"))  # a reconnected link
    assert not selector.roam(Link(RELAY), A1)  # another rung: only the ladder moves there
    assert not selector.roam(A3, Link(SSH)) and selector.udp_address == A2
    assert selector.roam(A3, None) and selector.udp_address == A3  # nowhere yet: anywhere allowed


def test_roaming_never_goes_to_a_rung_the_config_leaves_out() -> None:
    selector = PathSelector(RungChoice(force=SSH))
    assert selector.restricted and not selector.udp_allowed
    assert not selector.roam(A1, None)
    assert selector.allows(Link(SSH)) and not selector.allows(Link(RELAY)) and not selector.allows(A1)
    assert not PathSelector(RungChoice()).restricted


def test_candidates_are_sent_to_only_while_the_session_is_not_up() -> None:
    selector = PathSelector(RungChoice(), candidates=(A1,))
    assert selector.udp_address == A1
    assert selector.set_candidates((A2, A3), up=False, current=A1) == A2
    assert selector.udp_address == A2 and selector.udp_targets() == [A2, A3]
    # Up: an endpoint learnt from authenticated packets is never overridden.
    assert selector.set_candidates((A3,), up=True, current=A2) is None
    assert selector.udp_address == A2 and selector.udp_targets() == [A2, A3]
    # Not up, but on a link: the candidates wait for a UDP probe.
    assert selector.set_candidates((A1,), up=False, current=Link(SSH)) is None
    assert selector.set_candidates((), up=False, current=None) is None


def test_candidates_are_never_sent_to_when_udp_is_left_out() -> None:
    selector = PathSelector(RungChoice(rungs=(SSH, RELAY)))
    assert selector.set_candidates((A1,), up=False, current=None) is None


def test_a_handshake_is_evidence_for_its_rung_while_its_path_is_open() -> None:
    selector = PathSelector(RungChoice())
    actions = selector.handshake(A2, 10.0)
    assert actions == [Switch(UDP, None, "first handshake")]
    assert selector.evidence(UDP) == A2 and selector.udp_address == A2
    selector.handshake(Link(SSH, closed=True), 11.0)
    assert selector.evidence(SSH) is None  # closed since: not a path to switch to
    assert selector.evidence(RELAY) is None


def test_a_stray_is_evidence_only_when_newer_than_the_last_taken() -> None:
    selector = PathSelector(RungChoice())
    selector.handshake(A1, 0.0)
    link = Link(SSH)
    selector.tick(1.0, current=A1, unanswered_since=None, received_on_current=1.0, other=link, other_at=1.0,
                  handshaking=False)
    assert selector.evidence(SSH) is link
    later = Link(SSH, "later")
    selector.tick(2.0, current=A1, unanswered_since=None, received_on_current=2.0, other=later, other_at=0.5,
                  handshaking=False)
    assert selector.evidence(SSH) is link  # an older report never replaces newer evidence
    # The same rung's other source is roaming, not a stray.
    selector.tick(3.0, current=A1, unanswered_since=None, received_on_current=3.0, other=A2, other_at=3.0,
                  handshaking=False)
    assert selector.evidence(UDP) == A1


def test_a_search_that_gives_up_says_so_once() -> None:
    selector = PathSelector(RungChoice(rungs=(UDP,)))
    assert selector.start(None, 0.0) == [Probe((UDP,))]
    gave_up = [selector.tick(t, current=None, unanswered_since=None, received_on_current=float("-inf"), other=None,
                             other_at=float("-inf"), handshaking=False)[1] for t in range(1, 100)]
    assert gave_up.count(True) == 1
    # Traffic asks for the peer again (the core is handshaking): the search restarts.
    actions, _ = selector.tick(100.0, current=None, unanswered_since=None, received_on_current=float("-inf"),
                               other=None, other_at=float("-inf"), handshaking=True)
    assert Probe((UDP,)) in actions


@given(st.lists(st.sampled_from([UDP, SSH, RELAY]), min_size=1, max_size=30))
def test_the_history_keeps_the_last_changes_in_order(rungs: list[str]) -> None:
    selector = PathSelector(RungChoice())
    previous = UDP
    made: list[Transition] = []
    for i, rung in enumerate(rungs):
        endpoint = A1 if rung == UDP else Link(rung, f"{rung} link")
        change = selector.switched(Switch(rung, previous, "why"), endpoint, 1000.0 + i)
        assert change == Transition(rung, previous, describe(endpoint), "why", 1000.0 + i)
        made.append(change)
        previous = rung
    assert selector.transitions == tuple(made[-TRANSITIONS_KEPT:])
    assert selector.switched(Switch(UDP, None, "first handshake"), A1, 0.0) is None  # the first choice is no change
