"""The NAT grid (tools/natgrid.py) once: two nodes behind routers of every pair of NAT
types connect, and each pair ends on the rung issue 18 expects: direct UDP wherever one
side is neither symmetric nor without UDP (symmetric against full cone and against
port-restricted included), SSH or the relay where UDP cannot leave one side; symmetric
against symmetric either way (natgrid.expected_rungs says why). Every session must be up
on the rung it ends on."""

from __future__ import annotations

import pytest

from tools.natgrid import cells, expected_rungs, run_grid, table
from tools.natlab import NAT_TYPES

# 28 cells of two daemons and two routers each: about 200 s alone, twice that beside the
# rest of the suite on two cores.
pytestmark = [pytest.mark.e2e, pytest.mark.long, pytest.mark.timeout(900)]


def test_every_pair_of_nat_types_ends_on_the_expected_rung(make_lab) -> None:
    # All 28 cells in one batch: the rungs are what is checked here, not the times, which
    # the crowded start stretches. The window is generous: symmetric x port-restricted
    # waits for a punch that sweeps the port range (about 32 s), which took 61 s of 90 in
    # one grid run alone on two cores.
    results = run_grid(NAT_TYPES, runs=1, batch=len(cells(NAT_TYPES)), window=150, make_lab=make_lab)
    grid = table(results)
    print(grid)
    assert set(results) == set(cells(NAT_TYPES)) and all(len(runs) == 1 for runs in results.values()), grid
    wrong = []
    for (a, b), (run,) in results.items():
        down = {name: side.state for name, side in run.sides.items() if side.state != "up"}
        if run.rung not in expected_rungs(a, b) or down:
            why = "; ".join(f"{name}: {side.rung} {side.state} ({side.why_not_better})"
                            for name, side in run.sides.items())
            wrong.append(f"{a} x {b}: {run.rung}, expected {'/'.join(sorted(expected_rungs(a, b)))}: {why}")
    assert not wrong, "\n".join([grid, *wrong])
