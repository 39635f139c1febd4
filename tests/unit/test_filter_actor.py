"""The filter actor's compiling: a map change that leaves what the compiler reads
alone (members' names, keys, addresses, routes; the network policy; the node rules)
neither recompiles nor makes every flow be rechecked."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import pytest

import actors.filter as actor_module
from actors.filter import FilterActor, FilterInputs
from tests.support.ippackets import ALICE, BOB, HOME
from tunnelmesh.clock import SystemClock
from tunnelmesh.filter import Member


@dataclass(frozen=True)
class Record:
    version: int
    text: str


SSH = '[[allow]]\nfrom = "alice"\nproto = "tcp"\nports = [22]\n'


def make(inputs: list[FilterInputs], monkeypatch: pytest.MonkeyPatch) -> tuple[FilterActor, list[int]]:
    calls: list[int] = []
    real = actor_module.compile_rules

    def counting(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(actor_module, "compile_rules", counting)
    actor = FilterActor(SimpleNamespace(filter=None), local=HOME, node_rules=None,  # type: ignore[arg-type]
                        inputs=lambda: inputs[-1], network=True, clock=SystemClock())
    return actor, calls


def test_unchanged_inputs_do_not_recompile_nor_bump_the_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    members: tuple[Member, ...] = (HOME, ALICE, BOB)
    inputs = [FilterInputs(members, Record(1, SSH))]
    actor, calls = make(inputs, monkeypatch)
    actor.compile()
    f = actor.filter
    assert f is not None and len(calls) == 1
    generation = f._generation
    inputs.append(FilterInputs(tuple(replace(m) for m in members), Record(1, SSH)))  # equal, not the same
    actor.compile()
    assert actor.filter is f and len(calls) == 1 and f._generation == generation

    moved = replace(BOB, ipv4=ipaddress.IPv4Address("100.64.0.33"))
    inputs.append(FilterInputs((HOME, ALICE, moved), Record(1, SSH)))  # an address changed
    actor.compile()
    assert len(calls) == 2 and f._generation == generation + 1
    inputs.append(FilterInputs((HOME, ALICE, moved), Record(2, SSH)))  # a new policy version
    actor.compile()
    assert len(calls) == 3
