"""tools/natgrid.py's bookkeeping: which cells, what each expects, how runs are summed up
and shown (the lab run itself: tests/e2e/test_nat_grid.py)."""

from __future__ import annotations

from tools.natgrid import CellRun, cells, expected_rungs, summary, table
from tools.natlab import NAT_TYPES


def run(a: str, b: str, rung: str, seconds: float | None = None) -> CellRun:
    return CellRun(a, b, rung, seconds, {})


def test_every_type_meets_every_other_and_itself_once() -> None:
    pairs = cells(NAT_TYPES)
    assert len(pairs) == len(NAT_TYPES) * (len(NAT_TYPES) + 1) // 2
    assert len({frozenset(p) for p in pairs}) == len(pairs)
    assert ("symmetric", "symmetric") in pairs and ("full-cone", "symmetric") in pairs


def test_expected_rungs_follow_the_issue() -> None:
    assert expected_rungs("symmetric", "full-cone") == {"udp"}
    assert expected_rungs("port-restricted", "symmetric") == {"udp"}
    assert expected_rungs("none", "udp-blocked") == {"ssh", "relay"}
    assert expected_rungs("tcp-web-only", "full-cone") == {"ssh", "relay"}
    assert "relay" in expected_rungs("symmetric", "symmetric")


def test_summary_is_the_majority_rung_and_the_median_time_of_direct_runs() -> None:
    assert summary([run("a", "b", "udp", 3.0), run("a", "b", "udp", 9.0), run("a", "b", "udp", 4.0)]) == ("udp", 4.0)
    assert summary([run("a", "b", "udp", 3.0), run("a", "b", "relay"), run("a", "b", "udp", 5.0)]) == ("udp (2/3)", 4.0)
    assert summary([run("a", "b", "relay")]) == ("relay", None)


def test_the_table_is_symmetric_and_markdown_has_a_row_per_type() -> None:
    results = {("none", "none"): [run("none", "none", "udp", 1.0)],
               ("none", "symmetric"): [run("none", "symmetric", "udp", 2.5)],
               ("symmetric", "symmetric"): [run("symmetric", "symmetric", "relay")]}
    rows = table(results, markdown=True).splitlines()
    assert rows[0] == "|  | none | symmetric |" and rows[1] == "|---|---|---|"
    assert rows[2] == "| none | udp 1.0 s | udp 2.5 s |"
    assert rows[3] == "| symmetric | udp 2.5 s | relay |"
    assert "udp 2.5 s" in table(results).splitlines()[2]
