"""`python -m tools.bench` end to end, as short as it goes: tunnelmesh and wireguard-go,
1 s per iperf3 test, one run. It must pass its own traffic checks (exit 0), write a JSON
with every metric for both systems, the ratios and the machine, and a PNG chart. No
figure is judged: only that each was measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import lab_problem, unavailable
from tools.benchreport import METRIC_KEYS, PEER_COUNTS, UDP_SIZES
from tools.lab import PROJECT_ROOT, find_tool

pytestmark = [pytest.mark.long, pytest.mark.timeout(900)]

SYSTEMS = ("tunnelmesh", "wireguard-go")
#: Metrics each of SYSTEMS must have a value for (the rest may be None: retransmits can be 0
#: or absent, and so on).
MEASURED = ("tcp_ab_mbps", "tcp_ba_mbps", "tcp_p4_mbps", *(f"udp{size}_pps" for size in UDP_SIZES),
            "ping_avg_ms", "ping_median_ms", "ping_p99_ms", "cpu_s_per_gb", "connect_s", "rss_idle_mib",
            "wakeups_idle_per_min",
            *(f"rss_peers{count}_mib" for count in PEER_COUNTS), "rss_per_peer_kib")


def test_bench_measures_checks_and_draws(tmp_path: Path):
    problem = lab_problem()
    if problem:
        unavailable(problem)
    missing = [tool for tool in ("iperf3", "wireguard-go", "wg", "ping", "ss") if find_tool(tool) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} (run tools/setup.sh)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        unavailable("no matplotlib (run tools/setup.sh: the bench extra)")
    results, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--time", "1", "--runs", "1", "--only", ",".join(SYSTEMS),
         "--json-out", str(results), "--chart", str(chart)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=800, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    doc = json.loads(results.read_text())
    assert doc["failed"] == {} and doc["unavailable"] == {}
    assert doc["systems"] == list(SYSTEMS)
    for system in SYSTEMS:
        assert set(doc["medians"][system]) == set(METRIC_KEYS)
        unmeasured = [key for key in MEASURED if doc["medians"][system][key] is None]
        assert not unmeasured, f"{system}: no {unmeasured}"
        assert doc["medians"][system]["tcp_ab_mbps"] > 0
        run = doc["raw"][system][0]
        # Checked: both nodes' tunnel interfaces and both daemons' own counters.
        assert len(run["counters_after"]) == 4 and sum(1 for where in run["counters_after"] if "daemon" in where) == 2
    assert set(doc["ratios"]["wireguard-go"]) >= {"tcp_ab_mbps", "udp64_pps", "ping_p99_ms", "rss_per_peer_kib"}
    assert {"cpu_model", "cpus", "kernel", "python", "iperf3", "wireguard-go", "nebula", "date"} <= set(doc["machine"])
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The table went to stdout with the new rows.
    assert "UDP 64 B packets a->b (received/s)" in proc.stdout and "RSS per static peer (KiB)" in proc.stdout
