"""tunnelmesh.nat.classify: RFC 5780's mapping and filtering tests, decided from observations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnelmesh.nat.classify import (
    Binding, Observations, can_change_address, can_change_port, classify, classify_filtering, classify_mapping,
    mapping_destinations, reflexive_addresses,
)
from tunnelmesh.nat.report import (
    ADDRESS_AND_PORT_DEPENDENT, ADDRESS_DEPENDENT, BEHAVIOURS, ENDPOINT_INDEPENDENT, NONE, UNKNOWN,
)

# The coordinator's reflection service (one IP, two ports), a second server, coturn's two IPs.
COORD, COORD_ALT = ("198.51.100.1", 3478), ("198.51.100.1", 3479)
OTHER = ("198.51.100.9", 3478)
TURN, TURN_IP2_P1, TURN_IP2_P2 = ("203.0.113.5", 3478), ("203.0.113.6", 3478), ("203.0.113.6", 3479)
OUT = ("192.0.2.1", 40000)
LOCAL = frozenset({("10.0.0.2", 51820)})


def bind(destination: tuple[str, int], mapped: tuple[str, int] | None) -> Binding:
    return Binding(destination, mapped)


# --- mapping ---------------------------------------------------------------------------

def test_no_answer_is_unknown() -> None:
    assert classify_mapping([bind(COORD, None), bind(COORD_ALT, None)], LOCAL) == UNKNOWN
    assert classify_mapping([], LOCAL) == UNKNOWN


def test_one_answer_alone_cannot_classify() -> None:
    assert classify_mapping([bind(COORD, OUT), bind(COORD_ALT, None)], LOCAL) == UNKNOWN


def test_own_address_seen_is_no_nat() -> None:
    assert classify_mapping([bind(COORD, ("10.0.0.2", 51820))], LOCAL) == NONE
    assert classify_mapping([bind(COORD, ("10.0.0.2", 51820)), bind(OTHER, ("10.0.0.2", 51820))], LOCAL) == NONE


def test_own_address_with_another_port_is_a_nat() -> None:
    """The address is ours but the port was rewritten: something translates."""
    found = classify_mapping([bind(COORD, ("10.0.0.2", 1)), bind(COORD_ALT, ("10.0.0.2", 2))], LOCAL)
    assert found == ADDRESS_AND_PORT_DEPENDENT


def test_servers_reached_without_nat_are_left_out_of_the_comparison() -> None:
    """One server on the LAN (sees our own address), two beyond a NAT: the NAT is judged."""
    bindings = [bind(("10.0.0.1", 3478), ("10.0.0.2", 51820)), bind(COORD, OUT), bind(COORD_ALT, ("192.0.2.1", 40001))]
    assert classify_mapping(bindings, LOCAL) == ADDRESS_AND_PORT_DEPENDENT
    assert classify_mapping(bindings[:2], LOCAL) == UNKNOWN


def test_two_ports_of_one_ip_agreeing_is_endpoint_independent() -> None:
    assert classify_mapping([bind(COORD, OUT), bind(COORD_ALT, OUT)], LOCAL) == ENDPOINT_INDEPENDENT


def test_two_ports_of_one_ip_differing_is_address_and_port_dependent() -> None:
    assert classify_mapping([bind(COORD, OUT), bind(COORD_ALT, ("192.0.2.1", 40001))], LOCAL) \
        == ADDRESS_AND_PORT_DEPENDENT


def test_two_ips_agreeing_is_endpoint_independent() -> None:
    assert classify_mapping([bind(COORD, OUT), bind(OTHER, OUT)], LOCAL) == ENDPOINT_INDEPENDENT


def test_two_ips_differing_without_a_port_test_assumes_the_worst() -> None:
    assert classify_mapping([bind(COORD, OUT), bind(OTHER, ("192.0.2.1", 40001))], LOCAL) \
        == ADDRESS_AND_PORT_DEPENDENT


def test_rfc5780_tests_one_to_three() -> None:
    """Test I (primary), II (other IP, same port), III (other IP, other port)."""
    other = ("192.0.2.1", 40001)
    eim = [bind(TURN, OUT), bind(TURN_IP2_P1, OUT), bind(TURN_IP2_P2, OUT)]
    adm = [bind(TURN, OUT), bind(TURN_IP2_P1, other), bind(TURN_IP2_P2, other)]
    apdm = [bind(TURN, OUT), bind(TURN_IP2_P1, other), bind(TURN_IP2_P2, ("192.0.2.1", 40002))]
    assert classify_mapping(eim, LOCAL) == ENDPOINT_INDEPENDENT
    assert classify_mapping(adm, LOCAL) == ADDRESS_DEPENDENT
    assert classify_mapping(apdm, LOCAL) == ADDRESS_AND_PORT_DEPENDENT


def test_a_second_address_of_a_nat_pool_is_a_different_mapping() -> None:
    assert classify_mapping([bind(COORD, OUT), bind(OTHER, ("192.0.2.2", 40000))], LOCAL) \
        == ADDRESS_AND_PORT_DEPENDENT


def test_repeated_answers_from_one_destination_take_the_first() -> None:
    bindings = [bind(COORD, OUT), bind(COORD, ("192.0.2.1", 9)), bind(COORD_ALT, OUT)]
    assert classify_mapping(bindings, LOCAL) == ENDPOINT_INDEPENDENT


# --- filtering -------------------------------------------------------------------------

@pytest.mark.parametrize(("change_port", "change_address", "expected"), [
    (None, None, UNKNOWN),
    (True, True, ENDPOINT_INDEPENDENT),
    (False, True, ENDPOINT_INDEPENDENT),  # an answer is proof; a missing one may be loss
    (None, True, ENDPOINT_INDEPENDENT),
    (True, False, ADDRESS_DEPENDENT),
    (True, None, ADDRESS_DEPENDENT),  # one server IP: a full cone looks address-dependent
    (False, False, ADDRESS_AND_PORT_DEPENDENT),
    (False, None, ADDRESS_AND_PORT_DEPENDENT),
    (None, False, UNKNOWN),
])
def test_filtering(change_port: bool | None, change_address: bool | None, expected: str) -> None:
    assert classify_filtering(change_port, change_address) == expected


def test_classify_gives_both() -> None:
    found = classify(Observations((bind(COORD, OUT), bind(COORD_ALT, OUT)), LOCAL, change_port=False))
    assert found == (ENDPOINT_INDEPENDENT, ADDRESS_AND_PORT_DEPENDENT)


# --- the plan ----------------------------------------------------------------------------

def test_destinations_for_a_server_on_one_ip() -> None:
    assert mapping_destinations(COORD, COORD_ALT) == (COORD_ALT,)
    assert can_change_port(COORD, COORD_ALT)
    assert not can_change_address(COORD, COORD_ALT)


def test_destinations_for_a_server_with_two_ips() -> None:
    assert mapping_destinations(TURN, TURN_IP2_P2) == (TURN_IP2_P1, TURN_IP2_P2)
    assert can_change_port(TURN, TURN_IP2_P2)
    assert can_change_address(TURN, TURN_IP2_P2)


def test_destinations_without_an_other_address() -> None:
    assert mapping_destinations(TURN, None) == ()
    assert mapping_destinations(TURN, TURN) == ()
    assert not can_change_port(TURN, None) and not can_change_address(TURN, None)


def test_other_ip_same_port_is_one_destination_and_cannot_change_port() -> None:
    assert mapping_destinations(TURN, TURN_IP2_P1) == (TURN_IP2_P1,)
    assert not can_change_port(TURN, TURN_IP2_P1)
    assert not can_change_address(TURN, TURN_IP2_P1)


def test_reflexive_addresses_distinct_in_order() -> None:
    other = ("192.0.2.1", 40001)
    assert reflexive_addresses([bind(COORD, other), bind(OTHER, None), bind(COORD_ALT, OUT), bind(TURN, other)]) \
        == (other, OUT)


# --- every input has an answer -------------------------------------------------------------

addresses = st.tuples(st.sampled_from(["192.0.2.1", "192.0.2.2", "10.0.0.2", "198.51.100.1"]),
                      st.sampled_from([3478, 3479, 40000, 51820]))


@given(st.lists(st.builds(Binding, addresses, st.none() | addresses), max_size=8),
       st.frozensets(addresses, max_size=3), st.sampled_from([None, True, False]),
       st.sampled_from([None, True, False]))
def test_any_observations_classify_to_known_names(bindings: list[Binding], local: frozenset[tuple[str, int]],
                                                  change_port: bool | None, change_address: bool | None) -> None:
    mapping, filtering = classify(Observations(tuple(bindings), local, change_port, change_address))
    assert mapping in BEHAVIOURS and filtering in BEHAVIOURS
    answered = [b for b in bindings if b.mapped is not None]
    assert (mapping == UNKNOWN) == (not answered or (
        any(b.mapped not in local for b in answered)
        and len({b.destination for b in answered if b.mapped not in local}) < 2))


@given(st.lists(st.builds(Binding, addresses, addresses), min_size=2, max_size=6))
def test_one_outside_address_everywhere_is_never_hard(bindings: list[Binding]) -> None:
    same = [Binding(b.destination, OUT) for b in bindings]
    assert classify_mapping(same, LOCAL) in (ENDPOINT_INDEPENDENT, UNKNOWN)
