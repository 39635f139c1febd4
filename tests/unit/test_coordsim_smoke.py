"""tools.coordsim end to end at a small N: 20 simulated nodes against a real `tunnelmesh
coordinator` subprocess on SQLite (127.0.0.1 only, no root): every node joins through the
approval flow (the tool checks each collected entry and sealed secret), registers,
long-polls, and hears of the one change."""

from __future__ import annotations

import asyncio

from tools.coordsim import simulate

NODES = 20


def test_twenty_nodes_join_long_poll_and_see_the_change(tmp_path):
    result = asyncio.run(simulate(str(tmp_path / "coordinator.db"), tmp_path, NODES, 1, joins=NODES, changes=1,
                                  progress=lambda text: None))
    assert result["failed"] is None, result.get("coordinator_logs")
    assert (result["joined"], result["seeded"]) == (NODES, 0)
    assert result["joins_per_s"] > 0
    assert result["nodes_answered"] == NODES
    (change,) = result["changes"]
    assert (change["reached"], change["missing"]) == (NODES, 0)
    assert change["time_to_all_s"] is not None
    assert result["poll_errors"] == 0
    assert result["coordinator_cpu_s"] > 0 and result["rss_connected_kib"] > 0
