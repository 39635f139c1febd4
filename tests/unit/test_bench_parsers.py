"""tools.benchreport's newer parsers and arithmetic (ping per-reply times, iperf3 UDP and
-P 4 JSON, /proc/<pid>/stat, `ip -j -s link`, `wg show transfer`, CPU per GB, RSS per
peer, the traffic check, the JSON document) and tools.benchchart drawing a document to a
PNG. No lab, no speed assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import benchchart, benchreport


def ping_output(times: list[float]) -> str:
    lines = ["PING 100.100.0.2 (100.100.0.2) 56(84) bytes of data."]
    lines += [f"64 bytes from 100.100.0.2: icmp_seq={i} ttl=64 time={t} ms" for i, t in enumerate(times, 1)]
    lines += ["", "--- 100.100.0.2 ping statistics ---",
              f"{len(times)} packets transmitted, {len(times)} received, 0% packet loss, time 2010ms",
              "rtt min/avg/max/mdev = 0.100/0.500/9.000/0.300 ms"]
    return "\n".join(lines) + "\n"


def test_ping_median_and_p99_from_each_reply():
    times = [0.1 * i for i in range(1, 101)]  # 0.1 .. 10.0 ms
    out = benchreport.parse_ping(ping_output(times))
    assert out["replies"] == 100.0
    assert out["median_ms"] == pytest.approx(5.05)
    assert out["p99_ms"] == pytest.approx(9.9)  # nearest rank: the 99th of 100
    assert out["avg_ms"] == 0.5  # the summary's own average is kept too
    # iputils prints "time<1 ms" style lines on some systems, and whole numbers.
    assert benchreport.parse_ping("64 bytes from x: icmp_seq=1 ttl=64 time=12 ms\n")["median_ms"] == 12.0


def test_percentile_nearest_rank():
    assert benchreport.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert benchreport.percentile([5.0], 99) == 5.0
    assert benchreport.percentile(list(map(float, range(1, 201))), 99) == 198.0
    assert benchreport.percentile([], 99) is None
    with pytest.raises(ValueError):
        benchreport.percentile([1.0], 0)


UDP_JSON = {"end": {
    "sum": {"seconds": 2.0, "bytes": 6400, "packets": 100, "lost_packets": 10, "lost_percent": 10.0},
    "sum_sent": {"seconds": 2.0, "bytes": 6400, "packets": 100, "lost_packets": 0},
    "sum_received": {"seconds": 2.0, "bytes": 5760, "packets": 100, "lost_packets": 10, "lost_percent": 10.0},
}}


def test_iperf3_udp_received_packets_per_second_and_loss():
    out = benchreport.parse_iperf3_udp(json.dumps(UDP_JSON))
    assert out == {"pps": 45.0, "loss_pct": 10.0, "sent_packets": 100.0, "received_packets": 90.0, "bytes": 5760.0}
    older = {"end": {"sum": UDP_JSON["end"]["sum"]}}  # iperf3 before sum_received
    assert benchreport.parse_iperf3_udp(json.dumps(older))["pps"] == 45.0


def test_iperf3_udp_bad_results_are_errors():
    with pytest.raises(ValueError, match="no end.sum_received"):
        benchreport.parse_iperf3_udp(json.dumps({"end": {}}))
    nonsense = {"end": {"sum_received": {"seconds": 2.0, "packets": 5, "lost_packets": 9}}}
    with pytest.raises(ValueError, match="makes no sense"):
        benchreport.parse_iperf3_udp(json.dumps(nonsense))
    with pytest.raises(ValueError, match="unable to send"):
        benchreport.parse_iperf3_udp(json.dumps({"error": "unable to send control message"}))


def test_iperf3_parallel_flows_are_summed_by_iperf3():
    out = json.dumps({"end": {"streams": [{}] * 4, "sum_sent": {"bits_per_second": 9e8, "retransmits": 40},
                              "sum_received": {"bits_per_second": 8e8, "bytes": 1e9}}})
    assert benchreport.parse_iperf3(out) == {"mbps": 800.0, "bytes": 1e9, "retransmits": 40.0}


def test_proc_stat_cpu_seconds():
    # Field 2 may hold spaces and ")"; utime and stime are fields 14 and 15.
    line = "4242 (python3 -m x) y) S 1 4242 4242 0 -1 4194560 1 0 0 0 150 50 0 0 20 0 3 0 100 0 0\n"
    assert benchreport.parse_proc_stat_cpu(line, 100) == 2.0


def test_voluntary_switches_from_a_threads_status():
    status = ("Name:\tpython3\nState:\tS (sleeping)\nvoluntary_ctxt_switches:\t1200\n"
              "nonvoluntary_ctxt_switches:\t34\n")
    assert benchreport.parse_voluntary_switches(status) == 1200
    with pytest.raises(ValueError):
        benchreport.parse_voluntary_switches("Name:\tpython3\nnonvoluntary_ctxt_switches:\t34\n")


def test_link_stats_and_wg_transfer():
    link = [{"ifname": "tm0", "stats64": {"rx": {"bytes": 10, "packets": 1}, "tx": {"bytes": 20, "packets": 2}}}]
    assert benchreport.parse_link_stats(json.dumps(link)) == {"rx_bytes": 10, "tx_bytes": 20}
    with pytest.raises(ValueError):
        benchreport.parse_link_stats("[]")
    transfer = "keyA=\t100\t200\nkeyB=\t1\t2\n"
    assert benchreport.parse_wg_transfer(transfer) == {"rx_bytes": 101, "tx_bytes": 202}


def test_cpu_per_gb():
    assert benchreport.cpu_per_gb(3.0, 1.5e9) == pytest.approx(2.0)
    assert benchreport.cpu_per_gb(3.0, 0) is None
    assert benchreport.cpu_per_gb(None, 1e9) is None


def test_per_peer_slope_is_least_squares_in_kib():
    # 40 MiB + 64 KiB per peer, exactly.
    points = {n: 40 + n * 64 / 1024 for n in (1, 10, 100, 1000)}
    assert benchreport.per_peer_slope_kib(points) == pytest.approx(64.0)
    assert benchreport.per_peer_slope_kib({1: 10.0, 10: None, 100: 10.0}) == pytest.approx(0.0)
    assert benchreport.per_peer_slope_kib({1: 10.0, 10: None}) is None


def test_counter_shortfalls_name_what_did_not_rise():
    before, after = {"rx_bytes": 100, "tx_bytes": 100}, {"rx_bytes": 1100, "tx_bytes": 150}
    assert benchreport.counter_shortfalls("a tm0", before, after, {"rx_bytes": 1000}) == []
    problems = benchreport.counter_shortfalls("a tm0", before, after, {"rx_bytes": 1000, "tx_bytes": 1000})
    assert problems == ["a tm0 tx_bytes rose by 50, less than the 1000 bytes iperf3 moved"]


def record(**values: float) -> dict[str, float]:
    return dict(values)


def test_document_marks_failed_checks_and_never_shows_their_figures():
    records = {
        "tunnelmesh": [record(tcp_ab_mbps=400.0, udp64_pps=90000.0, rss_per_peer_kib=30.0)],
        "wireguard-go": [{"error": "traffic check failed: ...", "unverified": {"tcp_ab_mbps": 500.0}}],
    }
    machine = {"date": "2026-12-05 00:00 UTC", "cpu_model": "Test CPU", "cpus": 2}
    doc = benchreport.document({"time_s": 3, "runs": 1}, machine, ["tunnelmesh", "wireguard-go"], records)
    assert doc["failed"] == {"wireguard-go": ["traffic check failed: ..."]}
    assert doc["unavailable"] == {"wireguard-go": "traffic check failed: ..."}
    assert "wireguard-go" not in doc["medians"]
    assert doc["medians"]["tunnelmesh"]["udp64_pps"] == 90000.0
    assert set(doc["medians"]["tunnelmesh"]) == set(benchreport.METRIC_KEYS)
    assert doc["machine"] == machine and doc["time_s"] == 3
    assert json.loads(json.dumps(doc)) == doc  # all of it serialisable


def test_table_has_the_new_rows_with_ratios():
    def full(**values: float) -> dict[str, float | None]:
        return {**{key: None for key in benchreport.METRIC_KEYS}, **values}
    results = {"tunnelmesh": full(udp64_pps=100000.0, ping_p99_ms=2.0, cpu_s_per_gb=10.0, rss_per_peer_kib=8.0),
               "nebula": full(udp64_pps=200000.0, ping_p99_ms=1.0, cpu_s_per_gb=4.0, rss_per_peer_kib=2.0)}
    lines = {line.split("  ")[0]: line.split() for line in benchreport.format_table(results).splitlines()}
    assert lines["UDP 64 B packets a->b (received/s)"][-3:] == ["100000", "200000", "0.50"]
    assert lines["ping RTT p99 (ms)"][-3:] == ["2.000", "1.000", "2.00"]
    assert lines["CPU s per GB, TCP a->b (2 daemons)"][-3:] == ["10.00", "4.00", "2.50"]
    assert lines["RSS per static peer (KiB)"][-3:] == ["8.00", "2.00", "4.00"]


def test_chart_draws_a_png_with_the_figures_there(tmp_path: Path):
    medians = {"tunnelmesh": {"tcp_ab_mbps": 400.0, "udp64_pps": 90000.0},
               "wireguard-go": {"tcp_ab_mbps": 500.0, "udp64_pps": None},
               "veth": {"tcp_ab_mbps": 20000.0}}
    doc = {"medians": medians, "time_s": 3, "runs": 1,
           "machine": {"date": "2026-12-05 00:00 UTC", "cpu_model": "Test CPU", "cpus": 2, "kernel": "6.1",
                       "python": "3.11"}}
    path = tmp_path / "chart.png"
    assert benchchart.draw(doc, path) == ["tcp_ab_mbps", "udp64_pps"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2026-12-05 00:00 UTC: Test CPU, 2 cores, Linux 6.1" in benchchart.caption(doc)
    with pytest.raises(ValueError, match="no figures"):
        benchchart.draw({"medians": {"veth": {"tcp_ab_mbps": 1.0}}}, tmp_path / "none.png")


def test_tunnel_check_wants_each_side_to_carry_its_direction():
    from types import SimpleNamespace

    from tools import bench
    a, b = SimpleNamespace(name="a"), SimpleNamespace(name="b")
    tunnel = bench.Tunnel(a, b, "tm0", "tm0", [])  # type: ignore[arg-type]
    zero = {"rx_bytes": 0, "tx_bytes": 0}
    before = {"a tm0": zero, "b tm0": zero, "a daemon": zero}
    carried = {"a tm0": {"rx_bytes": 200, "tx_bytes": 1000}, "b tm0": {"rx_bytes": 1000, "tx_bytes": 200},
               "a daemon": {"rx_bytes": 300, "tx_bytes": 1100}}
    assert tunnel.check(before, carried, 1000, 200) == []
    # b's interface did not see a's traffic arrive: the bytes went some other way.
    bypassed = {**carried, "b tm0": {"rx_bytes": 10, "tx_bytes": 200}}
    assert tunnel.check(before, bypassed, 1000, 200) == [
        "b tm0 rx_bytes rose by 10, less than the 1000 bytes iperf3 moved"]
    assert len(tunnel.check(before, before, 1000, 200)) == 6  # nothing rose anywhere


def test_a_run_failing_the_traffic_check_shows_no_figure(monkeypatch: pytest.MonkeyPatch):
    from contextlib import nullcontext

    from tools import bench

    def unverified_run(lab: object, seconds: int, rec: dict, sockets: list) -> None:
        rec.update(tcp_ab_mbps=900.0, ping_avg_ms=0.2, cpu_s_per_gb=1.0)
        raise bench.TrafficCheckFailed("traffic check failed: b wgb0 rx_bytes rose by 0")

    monkeypatch.setattr(bench, "fresh_lab", lambda sockets: nullcontext(None))
    monkeypatch.setattr(bench, "bench_wireguard_go", unverified_run)
    rec = bench.run_one("wireguard-go", 1)
    assert rec["error"].startswith("traffic check failed")
    assert rec["unverified"] == {"tcp_ab_mbps": 900.0, "ping_avg_ms": 0.2, "cpu_s_per_gb": 1.0}
    assert not set(rec) & set(benchreport.METRIC_KEYS)
    results, unavailable = benchreport.summarize(["wireguard-go"], {"wireguard-go": [rec]})
    assert results == {} and unavailable["wireguard-go"].startswith("traffic check failed")
