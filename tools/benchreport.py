"""tools.bench's pure part: the tool-output parsers, the arithmetic (medians, ratios,
percentiles, CPU per GB, RSS per peer), the traffic checks, the table and the JSON
document. No lab, no processes: tests/unit/test_bench_report.py and
tests/unit/test_bench_parsers.py."""

from __future__ import annotations

import json
import math
import re
import statistics
from typing import Any

FILTERED = "tunnelmesh+filter"  # tunnelmesh with the packet filter on
SYSTEMS = ("tunnelmesh", FILTERED, "wireguard-go", "nebula", "veth")
TUNNELS = ("tunnelmesh", FILTERED, "wireguard-go", "nebula")
BASELINE = "veth"
COMPARED = ("wireguard-go", "nebula")  # each gets a ratio column: tunnelmesh / it
#: The system whose column a ratio column follows -> (numerator, denominator).
RATIO_OF = {FILTERED: (FILTERED, "tunnelmesh"), **{system: ("tunnelmesh", system) for system in COMPARED}}
COLUMN_TITLES = {"tunnelmesh": "tunnelmesh", FILTERED: FILTERED, "wireguard-go": "wireguard-go", "nebula": "nebula",
                 "veth": "raw veth"}
MTU = {"tunnelmesh": 1420, FILTERED: 1420, "wireguard-go": 1420, "nebula": 1300}
UDP_SIZES = (64, 1400)  # IP packet bytes of the UDP tests (iperf3 -u -l takes the payload: less UDP_HEADERS)
UDP_HEADERS = 28  # IPv4 and UDP
PEER_COUNTS = (1, 10, 100, 1000)  # static peers configured for the RSS-per-peer footprint
GB = 1e9  # bytes: CPU seconds per GB are per 10^9 bytes iperf3 moved

# (key, row label, format, show a ratio)
METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("tcp_ab_mbps", "TCP a->b (Mbit/s)", "{:.0f}", True),
    ("tcp_ba_mbps", "TCP b->a (Mbit/s)", "{:.0f}", True),
    ("tcp_p4_mbps", "TCP a->b 4 flows (Mbit/s)", "{:.0f}", True),
    *((f"udp{size}_pps", f"UDP {size} B packets a->b (received/s)", "{:.0f}", True) for size in UDP_SIZES),
    *((f"udp{size}_loss_pct", f"UDP {size} B loss (%)", "{:.1f}", False) for size in UDP_SIZES),
    ("ping_avg_ms", "ping RTT avg (ms)", "{:.3f}", True),
    ("ping_median_ms", "ping RTT median (ms)", "{:.3f}", True),
    ("ping_p99_ms", "ping RTT p99 (ms)", "{:.3f}", True),
    ("tcp_ab_retrans", "TCP a->b retransmits", "{:.0f}", False),
    ("tcp_ba_retrans", "TCP b->a retransmits", "{:.0f}", False),
    ("cpu_s_per_gb", "CPU s per GB, TCP a->b (2 daemons)", "{:.2f}", True),
    ("connect_s", "connect time (s)", "{:.2f}", True),
    ("rss_idle_mib", "daemon RSS idle (MiB)", "{:.1f}", True),
    ("wakeups_idle_per_min", "idle daemon wake-ups per minute (1 peer)", "{:.0f}", True),
    ("rss_mib", "daemon RSS after TCP (MiB)", "{:.1f}", True),
    *((f"rss_peers{n}_mib", f"RSS with {n:,} static peer{'s' if n != 1 else ''} (MiB)", "{:.1f}", True)
      for n in PEER_COUNTS),
    ("rss_per_peer_kib", "RSS per static peer (KiB)", "{:.2f}", True),
)
METRIC_KEYS = tuple(m[0] for m in METRICS)


def median(values: list[float | None]) -> float | None:
    """Median of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(present) if present else None


def percentile(values: list[float], pct: float) -> float | None:
    """The nearest-rank percentile (a value that occurred), None for no values."""
    if not values:
        return None
    if not 0 < pct <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {pct}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """ours / theirs, or None when either is missing or theirs is zero."""
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def format_value(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per metric, the median over the runs' records."""
    return {key: median([run.get(key) for run in runs]) for key in METRIC_KEYS}


# --- parsers ------------------------------------------------------------------------------


def parse_ping(output: str) -> dict[str, float | None]:
    """Loss %, min/avg/max RTT (ms) from iputils ping's summary, and the median and p99
    of the replies' own `time=` values (ping without -q prints one line per reply)."""
    loss = re.search(r"([\d.]+)% packet loss", output)
    rtt = re.search(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", output)
    times = [float(t) for t in re.findall(r"\btime[=<]([\d.]+) ms", output)]
    return {
        "loss_pct": float(loss.group(1)) if loss else None,
        "min_ms": float(rtt.group(1)) if rtt else None,
        "avg_ms": float(rtt.group(2)) if rtt else None,
        "max_ms": float(rtt.group(3)) if rtt else None,
        "median_ms": statistics.median(times) if times else None,
        "p99_ms": percentile(times, 99),
        "replies": float(len(times)),
    }


def _iperf3_end(output: str) -> dict[str, Any]:
    """The `end` object of `iperf3 -J` output; ValueError when it reports an error."""
    try:
        data = json.loads(output)
    except json.JSONDecodeError as exc:
        raise ValueError(f"iperf3 printed no JSON: {output[-300:]!r}") from exc
    if data.get("error"):
        raise ValueError(f"iperf3: {data['error']}")
    return data.get("end") or {}


def parse_iperf3(output: str) -> dict[str, float | None]:
    """TCP (one flow or -P N, summed): received Mbit/s and bytes, sender retransmits, from
    `iperf3 -J` output; ValueError when it reports an error or has no result."""
    end = _iperf3_end(output)
    received = end.get("sum_received") or {}
    if received.get("bits_per_second") is None:
        raise ValueError("iperf3 JSON has no end.sum_received.bits_per_second")
    retrans = (end.get("sum_sent") or {}).get("retransmits")
    return {"mbps": received["bits_per_second"] / 1e6, "bytes": float(received.get("bytes") or 0),
            "retransmits": float(retrans) if retrans is not None else None}


def parse_iperf3_udp(output: str) -> dict[str, float]:
    """UDP (`iperf3 -u -J`, client side): packets the server received per second, loss %,
    packets sent and received and payload bytes received; ValueError without a result."""
    end = _iperf3_end(output)
    received = end.get("sum_received") or end.get("sum") or {}  # iperf3 < 3.11 has only "sum"
    try:
        sent, lost, seconds = int(received["packets"]), int(received["lost_packets"]), float(received["seconds"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("iperf3 UDP JSON has no end.sum_received packets/lost_packets/seconds") from None
    if seconds <= 0 or sent < 0 or not 0 <= lost <= sent:
        raise ValueError(f"iperf3 UDP result makes no sense: {sent} packets, {lost} lost in {seconds} s")
    got = sent - lost
    return {"pps": got / seconds, "loss_pct": 100.0 * lost / sent if sent else 100.0, "sent_packets": float(sent),
            "received_packets": float(got), "bytes": float(received.get("bytes") or 0)}


def parse_proc_stat_cpu(text: str, ticks_per_s: int) -> float:
    """utime + stime in seconds from a /proc/<pid>/stat line (fields 14 and 15; the
    command name in parentheses may itself hold spaces and parentheses)."""
    rest = text[text.rindex(")") + 2:].split()  # from field 3, "state"
    return (int(rest[11]) + int(rest[12])) / ticks_per_s


def parse_voluntary_switches(text: str) -> int:
    """voluntary_ctxt_switches from a /proc/<pid>/task/<tid>/status text: how often the
    thread slept and was woken."""
    for line in text.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise ValueError("no voluntary_ctxt_switches line in the status text")


def parse_link_stats(output: str) -> dict[str, int]:
    """rx/tx bytes of one interface from `ip -j -s link show dev IF`."""
    links = json.loads(output)
    if not links:
        raise ValueError("ip printed no interface")
    stats = links[0].get("stats64") or links[0]["stats"]
    return {"rx_bytes": int(stats["rx"]["bytes"]), "tx_bytes": int(stats["tx"]["bytes"])}


def parse_wg_transfer(output: str) -> dict[str, int]:
    """wireguard-go's own counters, summed over peers, from `wg show IF transfer`."""
    totals = {"rx_bytes": 0, "tx_bytes": 0}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3:
            totals["rx_bytes"] += int(parts[1])
            totals["tx_bytes"] += int(parts[2])
    return totals


def parse_cpu_model(cpuinfo: str) -> str:
    """The first "model name" of /proc/cpuinfo ("unknown" without one)."""
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    return found.group(1).strip() if found else "unknown"


# --- arithmetic ---------------------------------------------------------------------------


def cpu_per_gb(cpu_seconds: float | None, moved_bytes: float | None) -> float | None:
    """CPU seconds per 10^9 bytes moved; None when nothing was moved."""
    if cpu_seconds is None or not moved_bytes:
        return None
    return cpu_seconds / (moved_bytes / GB)


def per_peer_slope_kib(rss_mib_by_peers: dict[int, float | None]) -> float | None:
    """Least-squares slope of RSS over the number of peers, in KiB per peer (None with
    fewer than two measured counts)."""
    points = [(n, mib * 1024) for n, mib in rss_mib_by_peers.items() if mib is not None]
    if len({n for n, _ in points}) < 2:
        return None
    mean_n = sum(n for n, _ in points) / len(points)
    mean_kib = sum(kib for _, kib in points) / len(points)
    spread = sum((n - mean_n) ** 2 for n, _ in points)
    return sum((n - mean_n) * (kib - mean_kib) for n, kib in points) / spread


def counter_shortfalls(where: str, before: dict[str, int], after: dict[str, int], need: dict[str, float]) -> list[str]:
    """The counters of `need` (counter name -> bytes iperf3 moved that way) that rose by
    less than that between `before` and `after`, in words; [] when all rose enough."""
    problems = []
    for counter, wanted in need.items():
        rose = after[counter] - before[counter]
        if rose < wanted:
            problems.append(f"{where} {counter} rose by {rose}, less than the {wanted:.0f} bytes iperf3 moved")
    return problems


# --- the table and the JSON ---------------------------------------------------------------


def table_columns(shown: list[str]) -> list[tuple[str, str]]:
    """The table's columns after "metric": (kind, system) with kind "value" or "ratio".

    shown: systems with a column, in any order. Order is tunnelmesh, then tunnelmesh+filter
    and each compared system, each followed by its ratio (RATIO_OF; only when tunnelmesh
    is shown too), then raw veth."""
    cols: list[tuple[str, str]] = []
    if "tunnelmesh" in shown:
        cols.append(("value", "tunnelmesh"))
    for system in (FILTERED, *COMPARED):
        if system in shown:
            cols.append(("value", system))
            if "tunnelmesh" in shown:
                cols.append(("ratio", system))
    if BASELINE in shown:
        cols.append(("value", BASELINE))
    return cols


def format_table(results: dict[str, dict[str, float | None]], shown: list[str] | None = None) -> str:
    """The comparison table.

    results: system -> metric key -> value (medians). shown: systems with a column
    (default: those in results). Rows without any value in any shown column are left
    out; a ratio column holds RATIO_OF the system to its left: tunnelmesh / it, or for
    tunnelmesh+filter, it / tunnelmesh."""
    shown = [s for s in (shown if shown is not None else list(results)) if s in results]
    cols = table_columns(shown)
    header = ["metric"] + [COLUMN_TITLES[s] if kind == "value" else "ratio" for kind, s in cols]
    rows = [header]
    for key, label, fmt, with_ratio in METRICS:
        cells = [label]
        any_value = False
        for kind, system in cols:
            if kind == "value":
                value = results[system].get(key)
                any_value = any_value or value is not None
                cells.append(format_value(value, fmt))
            else:
                numerator, denominator = RATIO_OF[system]
                r = ratio(results[numerator].get(key), results[denominator].get(key)) if with_ratio else None
                cells.append(format_ratio(r))
        if any_value:
            rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for row in rows:
        parts = [row[0].ljust(widths[0])] + [cell.rjust(widths[i]) for i, cell in enumerate(row[1:], 1)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def ratios(results: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """For the JSON, the table's ratios: system -> metric -> RATIO_OF it (tunnelmesh / a
    compared system; tunnelmesh+filter / tunnelmesh)."""
    return {
        system: {key: ratio(results[numerator].get(key), results[denominator].get(key))
                 for key, _, _, with_ratio in METRICS if with_ratio}
        for system, (numerator, denominator) in RATIO_OF.items()
        if numerator in results and denominator in results
    }


def ratio_note(shown: list[str]) -> str:
    """What the table's ratio columns hold, for the systems with results ("" for none)."""
    if "tunnelmesh" not in shown:
        return ""
    parts = []
    if FILTERED in shown:
        parts.append(f"after {FILTERED}: {FILTERED} / tunnelmesh (the filter's cost)")
    if any(system in shown for system in COMPARED):
        parts.append(("after the others: " if parts else "") + "tunnelmesh / the column to its left")
    if not parts:
        return ""
    return (f"ratio {'; '.join(parts)} (Mbit/s, packets/s: higher is better; "
            "ms, s, MiB, KiB, CPU s: lower is better)")


def summarize(systems: list[str], records: dict[str, list[dict[str, Any]]]) -> tuple[dict, dict]:
    """(medians of the systems with at least one value, system -> reason it has none)."""
    results, unavailable = {}, {}
    for system in systems:
        runs = records[system]
        meds = medians(runs)
        if any(v is not None for v in meds.values()):
            results[system] = meds
        else:
            errors = [r["error"] for r in runs if r.get("error")]
            unavailable[system] = errors[0] if errors else "no results"
    return results, unavailable


def failed(records: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
    """system -> the errors of its failed runs (a failed traffic check included), for the
    systems with any: the exit status is 1 when this is not empty."""
    out = {system: [r["error"] for r in runs if r.get("error")] for system, runs in records.items()}
    return {system: errors for system, errors in out.items() if errors}


def document(settings: dict[str, Any], machine: dict[str, Any], systems: list[str],
             records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Everything a run found, for --json and --json-out: the settings, the machine, the
    medians, the ratios, what failed and every raw record."""
    results, unavailable = summarize(systems, records)
    return {
        **settings,
        "systems": systems,
        "mtu": MTU,
        "machine": machine,
        "metrics": {key: label for key, label, _, _ in METRICS},
        "medians": results,
        "ratios": ratios(results),
        "unavailable": unavailable,
        "failed": failed(records),
        "raw": records,
    }
