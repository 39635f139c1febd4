"""tools.coordsimreport: the command line's lists, the metrics parser, the change
latencies and their summaries, memory per node, the table, the JSON document and the
chart drawn to a PNG. Pure functions; no coordinator."""

from __future__ import annotations

import pytest

from tools import coordsimreport as report


def test_node_counts_parse_and_refuse():
    assert report.parse_counts("100, 1000,1e4") == [100, 1000, 10000]
    for bad in ("", "ten", "0", "-5", "2.5"):
        with pytest.raises(ValueError):
            report.parse_counts(bad)


def test_choices_keep_order_drop_repeats_and_name_what_is_allowed():
    assert report.parse_choices("postgresql,sqlite,postgresql", report.BACKENDS) == ["postgresql", "sqlite"]
    assert report.parse_choices("2,1", report.COORDINATOR_COUNTS) == [2, 1]
    with pytest.raises(ValueError, match="sqlite, postgresql"):
        report.parse_choices("mysql", report.BACKENDS)
    with pytest.raises(ValueError):
        report.parse_choices("3", report.COORDINATOR_COUNTS)


def test_plan_runs_sqlite_with_one_coordinator_only_smallest_first():
    assert report.plan([1000, 100], ["sqlite", "postgresql"], [1, 2]) == [
        (100, "sqlite", 1), (100, "postgresql", 1), (100, "postgresql", 2),
        (1000, "sqlite", 1), (1000, "postgresql", 1), (1000, "postgresql", 2)]
    assert report.plan([100], ["sqlite"], [2]) == []


def test_metric_value_reads_an_unlabelled_sample():
    text = ("# HELP tunnelmesh_coordinator_nodes_connected Members that asked\n"
            "# TYPE tunnelmesh_coordinator_nodes_connected gauge\n"
            "tunnelmesh_coordinator_nodes_connected 9999.0\n"
            "tunnelmesh_coordinator_nodes_connected_other 1.0\n"
            "tunnelmesh_coordinator_members 10001.0\n")
    assert report.metric_value(text, "tunnelmesh_coordinator_nodes_connected") == 9999.0
    assert report.metric_value(text, "tunnelmesh_coordinator_members") == 10001.0
    assert report.metric_value(text, "tunnelmesh_coordinator_relay_connections") is None


def test_change_latency_is_the_first_newer_answer_after_the_change():
    started, old = 100.0, 7
    answers = [
        [(99.0, 7), (100.5, 8), (101.0, 9)],  # 0.5 s
        [(99.5, 8)],  # a newer version before the change started does not count
        [(100.2, 7), (102.0, 8)],  # an answer at the old version does not count: 2.0 s
        [],
    ]
    latencies, missing = report.change_latencies(answers, started, old)
    assert latencies == [0.5, 2.0]
    assert missing == 2


def test_change_summary_has_no_time_to_all_while_a_node_missed_it():
    whole = report.change_summary([0.1, 0.2, 0.4], 0)
    assert whole == {"reached": 3, "missing": 0, "p50_s": 0.2, "p99_s": 0.4, "max_s": 0.4, "time_to_all_s": 0.4}
    partial = report.change_summary([0.1], 2)
    assert partial["time_to_all_s"] is None and partial["max_s"] == 0.1
    assert report.change_summary([], 3)["p50_s"] is None


def test_changes_summary_pools_latencies_and_takes_the_median_time_to_all():
    changes = [report.change_summary(times, 0) for times in ([0.1, 0.3], [0.2, 0.5], [0.2, 0.9])]
    pooled = [0.1, 0.3, 0.2, 0.5, 0.2, 0.9]
    summary = report.changes_summary(changes, pooled)
    assert summary == {"change_p50_s": 0.2, "change_p99_s": 0.9, "time_to_all_s": 0.5, "time_to_all_worst_s": 0.9}
    changes.append(report.change_summary([0.1], 1))
    assert report.changes_summary(changes, pooled)["time_to_all_s"] is None


def test_memory_per_node():
    assert report.per_node_kib(1000.0, 3000.0, 100) == 20.0
    assert report.per_node_kib(None, 3000.0, 100) is None
    assert report.per_node_kib(1000.0, 3000.0, 0) is None


def run(nodes: int, backend: str = "sqlite", coordinators: int = 1, **figures: object) -> dict[str, object]:
    return {"nodes": nodes, "backend": backend, "coordinators": coordinators, "joined": nodes, "seeded": 0,
            "failed": None, **figures}


def test_table_aligns_columns_and_says_why_a_run_failed():
    runs = [run(100, joins_per_s=18.65, change_p50_s=0.0153, time_to_all_s=0.0205, coordinator_cpu_s=0.48,
                kib_per_node=4.16),
            {**run(10000, "postgresql", 2), "failed": "RuntimeError: only 9000 of 10000 nodes counted connected"}]
    lines = report.format_table(runs).splitlines()
    assert lines[0].split()[:3] == ["N", "backend", "coords"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["100", "sqlite", "1", "100/0", "18.6", "0.015", "-", "0.021", "-", "0.5", "-", "4.2"]
    assert lines[3].split()[:4] == ["10000", "postgresql", "2", "10000/0"]
    assert len({len(line) for line in lines[:4]}) == 1  # aligned
    assert lines[4] == "N=10000 postgresql x2: RuntimeError: only 9000 of 10000 nodes counted connected"


def test_cpu_per_change_divides_the_change_phase_by_the_changes():
    assert report.cpu_per_change(run(100, coordinator_cpu_by_phase_s={"join": 9.0, "changes": 1.5},
                                     changes=[{}, {}, {}])) == 0.5
    assert report.cpu_per_change(run(100, coordinator_cpu_by_phase_s={"join": 9.0}, changes=[{}])) is None
    assert report.cpu_per_change(run(100)) is None


def test_chart_draws_each_series_and_refuses_a_document_without_figures(tmp_path):
    runs = [run(n, backend, count, time_to_all_s=0.01 * n, change_p50_s=0.005 * n, joins_per_s=10.0,
                coordinator_cpu_by_phase_s={"join": 1.0, "changes": 0.003 * n}, changes=[{}, {}, {}],
                kib_per_node=5.0)
            for n in (100, 1000) for backend, count in (("sqlite", 1), ("postgresql", 2))]
    doc = report.document(runs, {"date": "2026-12-05 02:00 UTC", "cpus": 2}, "python -m tools.coordsim")
    assert doc["runs"] == runs and doc["command"] == "python -m tools.coordsim"
    path = tmp_path / "chart.png"
    assert report.draw(doc, path) == [key for key, _, _ in report.PANELS]
    assert path.read_bytes().startswith(b"\x89PNG")
    failed_only = report.document([{**run(100), "failed": "no"}], {}, "")
    with pytest.raises(ValueError, match="no figures"):
        report.draw(failed_only, tmp_path / "none.png")


def test_proc_stat_times_and_parent_survive_a_command_name_with_spaces_and_parentheses():
    # fields: pid (comm) state ppid ... utime(14) stime(15) cutime(16) cstime(17)
    line = "4242 (postgres: a (b) c) S 17 4242 4242 0 -1 4194560 10 0 0 0 150 50 300 100 20 0 1 0 5 0 0\n"
    assert report.proc_stat_times(line, 100) == (2.0, 4.0)
    assert report.parent_of(line) == 17
