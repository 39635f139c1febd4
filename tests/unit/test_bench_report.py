"""tools.bench's pure part (tools/benchreport.py): medians, ratios, the table, the
ping and TCP parsers, and the command line. No lab, no speed assertions.
The newer parsers and the arithmetic: test_bench_parsers.py."""

from __future__ import annotations

import json

import pytest

from tools import bench, benchreport


def full(**values: float | None) -> dict[str, float | None]:
    row = {key: None for key in benchreport.METRIC_KEYS}
    row.update(values)
    return row


def lines_by_label(table: str) -> dict[str, list[str]]:
    lines = table.splitlines()
    out = {"header": lines[0].split()}
    for line in lines[1:]:
        label = next(label for _, label, _, _ in benchreport.METRICS if line.startswith(label))
        out[label] = line[len(label):].split()
    return out


def test_median_ignores_missing_values():
    assert benchreport.median([3.0, None, 1.0, 2.0]) == 2.0
    assert benchreport.median([1.0, 2.0]) == 1.5
    assert benchreport.median([None, None]) is None
    assert benchreport.median([]) is None
    assert benchreport.median([float("nan"), 4.0]) == 4.0


def test_medians_per_metric_over_runs():
    runs = [{"tcp_ab_mbps": 100.0, "error": "x"}, {"tcp_ab_mbps": 300.0, "ping_avg_ms": 0.5}, {"tcp_ab_mbps": 200.0}]
    meds = benchreport.medians(runs)
    assert meds["tcp_ab_mbps"] == 200.0
    assert meds["ping_avg_ms"] == 0.5
    assert meds["connect_s"] is None
    assert set(meds) == set(benchreport.METRIC_KEYS)


def test_ratio_is_ours_over_theirs_and_none_when_undefined():
    assert benchreport.ratio(250.0, 500.0) == 0.5
    assert benchreport.ratio(None, 500.0) is None
    assert benchreport.ratio(250.0, None) is None
    assert benchreport.ratio(250.0, 0) is None
    assert benchreport.format_ratio(0.5) == "0.50"
    assert benchreport.format_ratio(1.234) == "1.23"
    assert benchreport.format_ratio(None) == "-"


def test_format_value():
    assert benchreport.format_value(None, "{:.0f}") == "-"
    assert benchreport.format_value(912.6, "{:.0f}") == "913"
    assert benchreport.format_value(0.4123, "{:.3f}") == "0.412"


def test_columns_order_and_ratio_columns():
    assert benchreport.table_columns(["veth", "nebula", "wireguard-go", "tunnelmesh+filter", "tunnelmesh"]) == [
        ("value", "tunnelmesh"),
        ("value", "tunnelmesh+filter"), ("ratio", "tunnelmesh+filter"),
        ("value", "wireguard-go"), ("ratio", "wireguard-go"),
        ("value", "nebula"), ("ratio", "nebula"),
        ("value", "veth"),
    ]
    # Without tunnelmesh there is nothing to take a ratio of.
    assert benchreport.table_columns(["wireguard-go", "veth"]) == [("value", "wireguard-go"), ("value", "veth")]
    assert benchreport.table_columns(["tunnelmesh"]) == [("value", "tunnelmesh")]
    assert benchreport.table_columns(["tunnelmesh+filter", "veth"]) == [("value", "tunnelmesh+filter"), ("value", "veth")]


def test_table_full():
    results = {
        "tunnelmesh": full(tcp_ab_mbps=450.0, tcp_ba_mbps=300.0, ping_avg_ms=0.8, connect_s=0.64, rss_mib=53.2),
        "tunnelmesh+filter": full(tcp_ab_mbps=405.0, tcp_ba_mbps=None, ping_avg_ms=1.0, connect_s=0.64, rss_mib=53.2),
        "wireguard-go": full(tcp_ab_mbps=500.0, tcp_ba_mbps=600.0, ping_avg_ms=0.4, connect_s=0.04, rss_mib=22.7),
        "nebula": full(tcp_ab_mbps=450.0, tcp_ba_mbps=None, ping_avg_ms=0.2, connect_s=0.02, rss_mib=13.1),
        "veth": full(tcp_ab_mbps=21600.0, tcp_ba_mbps=19000.0, ping_avg_ms=0.05),
    }
    table = benchreport.format_table(results, ["tunnelmesh", "tunnelmesh+filter", "wireguard-go", "nebula", "veth"])
    rows = lines_by_label(table)
    assert rows["header"] == ["metric", "tunnelmesh", "tunnelmesh+filter", "ratio", "wireguard-go", "ratio", "nebula",
                              "ratio", "raw", "veth"]
    # The filter's ratio is it / tunnelmesh (its cost); the others' tunnelmesh / them.
    assert rows["TCP a->b (Mbit/s)"] == ["450", "405", "0.90", "500", "0.90", "450", "1.00", "21600"]
    assert rows["TCP b->a (Mbit/s)"] == ["300", "-", "-", "600", "0.50", "-", "-", "19000"]
    assert rows["ping RTT avg (ms)"] == ["0.800", "1.000", "1.25", "0.400", "2.00", "0.200", "4.00", "0.050"]
    assert rows["connect time (s)"] == ["0.64", "0.64", "1.00", "0.04", "16.00", "0.02", "32.00", "-"]
    assert rows["daemon RSS after TCP (MiB)"] == ["53.2", "53.2", "1.00", "22.7", "2.34", "13.1", "4.06", "-"]
    # Rows with no value anywhere are left out.
    assert "TCP a->b retransmits" not in rows
    assert "daemon RSS idle (MiB)" not in rows


def test_table_columns_line_up():
    results = {"tunnelmesh": full(tcp_ab_mbps=5.0, ping_avg_ms=0.7), "wireguard-go": full(tcp_ab_mbps=12345.0, ping_avg_ms=0.4)}
    lines = benchreport.format_table(results).splitlines()
    assert lines[0].startswith("metric ")
    ends = {len(line) for line in lines}
    assert len(ends) == 1, lines  # every cell right-aligned to the same column edges
    assert lines[0].index("wireguard-go") + len("wireguard-go") == lines[1].index("12345") + len("12345")


def test_retransmit_rows_have_no_ratio():
    results = {"tunnelmesh": full(tcp_ab_retrans=10.0), "wireguard-go": full(tcp_ab_retrans=20.0)}
    rows = lines_by_label(benchreport.format_table(results))
    assert rows["TCP a->b retransmits"] == ["10", "20", "-"]


def test_table_leaves_out_systems_without_results():
    results = {"tunnelmesh": full(tcp_ab_mbps=400.0), "wireguard-go": full(tcp_ab_mbps=500.0)}
    rows = lines_by_label(benchreport.format_table(results, ["tunnelmesh", "wireguard-go", "nebula"]))
    assert rows["header"] == ["metric", "tunnelmesh", "wireguard-go", "ratio"]


def test_ratios_for_json():
    results = {
        "tunnelmesh": full(tcp_ab_mbps=400.0, ping_avg_ms=0.6, tcp_ab_retrans=3.0),
        "tunnelmesh+filter": full(tcp_ab_mbps=300.0, ping_avg_ms=0.9),
        "wireguard-go": full(tcp_ab_mbps=500.0, ping_avg_ms=0.3, tcp_ab_retrans=6.0),
        "veth": full(tcp_ab_mbps=20000.0),
    }
    out = benchreport.ratios(results)
    assert set(out) == {"tunnelmesh+filter", "wireguard-go"}
    assert out["wireguard-go"]["tcp_ab_mbps"] == pytest.approx(0.8)
    assert out["wireguard-go"]["ping_avg_ms"] == pytest.approx(2.0)
    assert out["wireguard-go"]["tcp_ba_mbps"] is None
    assert "tcp_ab_retrans" not in out["wireguard-go"]
    assert out["tunnelmesh+filter"]["tcp_ab_mbps"] == pytest.approx(0.75)  # filter on / off
    assert out["tunnelmesh+filter"]["ping_avg_ms"] == pytest.approx(1.5)
    assert benchreport.ratios({"wireguard-go": full(tcp_ab_mbps=1.0)}) == {}
    assert benchreport.ratios({"tunnelmesh+filter": full(tcp_ab_mbps=1.0), "veth": full(tcp_ab_mbps=2.0)}) == {}


def test_ratio_note_says_which_way_each_ratio_goes():
    assert benchreport.ratio_note(["tunnelmesh", "tunnelmesh+filter", "wireguard-go"]).startswith(
        "ratio after tunnelmesh+filter: tunnelmesh+filter / tunnelmesh (the filter's cost); "
        "after the others: tunnelmesh / the column to its left (")
    assert benchreport.ratio_note(["tunnelmesh", "nebula"]).startswith("ratio tunnelmesh / the column to its left (")
    assert benchreport.ratio_note(["tunnelmesh", "tunnelmesh+filter"]).startswith(
        "ratio after tunnelmesh+filter: tunnelmesh+filter / tunnelmesh (the filter's cost) (")
    assert benchreport.ratio_note(["tunnelmesh", "veth"]) == ""
    assert benchreport.ratio_note(["tunnelmesh+filter", "wireguard-go"]) == ""


def test_parse_ping_summary():
    out = (
        "PING 100.100.0.2 (100.100.0.2) 56(84) bytes of data.\n\n"
        "--- 100.100.0.2 ping statistics ---\n"
        "20 packets transmitted, 20 received, 0% packet loss, time 3810ms\n"
        "rtt min/avg/max/mdev = 0.589/0.714/0.827/0.061 ms\n"
    )
    assert benchreport.parse_ping(out) == {"loss_pct": 0.0, "min_ms": 0.589, "avg_ms": 0.714, "max_ms": 0.827,
                                           "median_ms": None, "p99_ms": None, "replies": 0.0}
    lost = "5 packets transmitted, 0 received, 100% packet loss, time 4100ms\n"
    assert benchreport.parse_ping(lost) == {"loss_pct": 100.0, "min_ms": None, "avg_ms": None, "max_ms": None,
                                            "median_ms": None, "p99_ms": None, "replies": 0.0}


def test_parse_iperf3_json():
    out = json.dumps({"end": {"sum_sent": {"bits_per_second": 4.6e8, "retransmits": 12},
                              "sum_received": {"bits_per_second": 4.5e8, "bytes": 562500000}}})
    assert benchreport.parse_iperf3(out) == {"mbps": 450.0, "bytes": 562500000.0, "retransmits": 12.0}
    no_retrans = json.dumps({"end": {"sum_sent": {}, "sum_received": {"bits_per_second": 1e6}}})
    assert benchreport.parse_iperf3(no_retrans) == {"mbps": 1.0, "bytes": 0.0, "retransmits": None}
    with pytest.raises(ValueError, match="unable to connect"):
        benchreport.parse_iperf3(json.dumps({"start": {}, "error": "unable to connect to server: Connection refused"}))
    with pytest.raises(ValueError, match="no JSON"):
        benchreport.parse_iperf3("iperf3: error - something\n")
    with pytest.raises(ValueError, match="sum_received"):
        benchreport.parse_iperf3(json.dumps({"end": {}}))


def test_parse_args_only_and_defaults():
    args = bench.parse_args([])
    assert (args.time, args.runs, args.json, args.json_out, args.chart) == (10, 1, False, None, None)
    assert args.systems == list(benchreport.SYSTEMS)
    args = bench.parse_args(["--json-out", "r.json", "--chart", "c.png"])
    assert (args.json_out, args.chart) == ("r.json", "c.png")
    args = bench.parse_args(["--only", "nebula, tunnelmesh,nebula", "--time", "5", "--runs", "3", "--json"])
    assert args.systems == ["tunnelmesh", "nebula"]
    assert (args.time, args.runs, args.json) == (5, 3, True)
    args = bench.parse_args(["--only", "wireguard-go,tunnelmesh+filter,tunnelmesh"])
    assert args.systems == ["tunnelmesh", "tunnelmesh+filter", "wireguard-go"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "tailscale"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--time", "0"])


class _Client:
    """A node whose `iperf3` prints the outputs given, in turn."""

    def __init__(self, *outputs: str) -> None:
        self.outputs, self.calls = list(outputs), 0

    def run(self, *args: str, **kwargs: object) -> object:
        import subprocess

        self.calls += 1
        return subprocess.CompletedProcess(list(args), 1, self.outputs.pop(0), "")


def test_iperf3_runs_once_more_after_a_control_connection_error_only() -> None:
    reset = json.dumps({"error": "unable to receive control message: Connection reset by peer"})
    good = json.dumps({"end": {"sum_received": {"bits_per_second": 1e9, "bytes": 1}}})
    client = _Client(reset, good)
    assert bench.iperf3(client, "10.0.0.2", 1) == good and client.calls == 2  # type: ignore[arg-type]
    client = _Client(reset, reset)  # twice: the error stands (the bench reports the run failed)
    assert bench.iperf3(client, "10.0.0.2", 1) == reset and client.calls == 2  # type: ignore[arg-type]
    other = json.dumps({"error": "the server is busy running a test. try again later"})
    client = _Client(other, good)
    assert bench.iperf3(client, "10.0.0.2", 1) == other and client.calls == 1  # type: ignore[arg-type]
