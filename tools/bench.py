"""Benchmark TunnelMesh against wireguard-go and nebula in network namespaces.

    python -m tools.bench [--time T] [--runs N] [--only tunnelmesh,tunnelmesh+filter,wireguard-go,nebula,veth]
                          [--json] [--json-out FILE] [--chart FILE.png]
    python -m tools.bench --ladder [--rounds N] [--time T] [--json]   (tools.ladderbench: the transport ladder)

For every system, in turn and never two at once, a fresh lab: two namespaces `a` and
`b` joined by a switch (192.0.2.0/24), the tunnel between them (mesh IPs 100.100.0.1 and
.2). Then from `a`, against `iperf3 -s` in `b` (each iperf3 test for T seconds):
- `ping -c 200 -i 0.01` to b's mesh IP: RTT avg, and median and p99 of the replies;
- single-flow TCP `iperf3 -c <b> -t T -J` both ways (a->b, and b->a with -R);
- 4 parallel TCP flows a->b (`-P 4`), Mbit/s summed;
- UDP a->b in IP packets of 64 B and of 1400 B, unlimited rate (`-u -l SIZE-28 -b 0`):
  packets/s that b received and the loss %. 1400 B packets fit the 1420 MTU of
  tunnelmesh and wireguard-go; through nebula (MTU 1300) each crosses as two fragments;
- CPU seconds per GB: the two tunnel daemons' utime + stime (/proc/<pid>/stat, with any
  child processes) over the single-flow TCP a->b run, per 10^9 bytes iperf3 moved.
Also measured: connect time (from starting the second node, `tunnelmesh up --detach` of
`b` or its wireguard-go/nebula process and configuration, to b's first answered ping of
a, pinging every 50 ms; for tunnelmesh it includes the CLI's own start, recorded alone as
"up_s" in the JSON), the RSS of node a's tunnel daemon (/proc/<pid>/status), idle after
connecting and again after the TCP runs (peak VmHWM in the JSON), how often that daemon
wakes while idle with its one peer (voluntary context switches of all its threads per
minute, over T seconds from 12 s after connecting: timers, keepalives, ladder ticks), and RSS per peer: one
daemon alone with 1, 10, 100 and 1,000 made-up static peers, its idle RSS at each and the
slope in KiB per peer (tools/footprint.py says how each system is given its peers).

Checks that each tunnel really carried the traffic: after the workload, the tunnel
interfaces' byte counters on both nodes (`ip -s link`, each way) and the daemons' own
counters (tunnelmesh's `status`, wireguard-go's `wg show transfer`; nebula has none) must
have risen by at least the bytes iperf3 reported moving that way. A run that fails the
check is marked failed and its figures are kept only under "unverified" in the JSON,
never shown.
"veth" is the same iperf3/ping workload on the underlay without any tunnel, for context
(no CPU, check or footprint). "tunnelmesh+filter" is "tunnelmesh" with the packet filter
on (docs/filter.md): each node's `[filter]` table allows only what the workload needs,
ICMP echo and the iperf3 port (TCP and UDP), so every packet goes through the filter both
ways; "tunnelmesh" has no filter. The footprint is measured for tunnelmesh, wireguard-go
and nebula (the filter does not change what a peer costs).

Every figure is only meaningful as a ratio against a peer measured in the same run
(see PERF-NOTES.md): the table prints tunnelmesh / wireguard-go and tunnelmesh / nebula,
and the filter's cost as tunnelmesh+filter / tunnelmesh.
With --runs N > 1 each system is measured N times (runs interleave the systems) and the
table shows medians. --json prints, and --json-out FILE writes, every raw value, the
medians, the ratios and the machine (CPU model, cores, kernel, Python, tool versions,
date); --chart FILE.png draws the key figures per system (tools/benchchart.py, needs the
`bench` extra: matplotlib). Nothing here asserts a speed.

Exit status: 0 when every requested system was measured and passed its checks, 1 when
one failed, failed a check or was unavailable (the table still shows the rest), 2 for bad
usage, 130 when interrupted. Labs are torn down on failure, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tools import footprint
from tools.benchlab import (MESH_PREFIXLEN, NEBULA_PORT, WG_PORT, BenchError, cpu_seconds, fresh_lab,
                            idle_wakeups_per_minute, link_counters, log, nebula_ca, nebula_config, need_nebula,
                            process_alive, rss_mib, start_nebula, start_wireguard_go, wait_until, wg_key_pair)
from tools.benchreport import (FILTERED, METRIC_KEYS, MTU, SYSTEMS, TUNNELS, UDP_HEADERS, UDP_SIZES,
                               counter_shortfalls, cpu_per_gb, document, format_table, parse_cpu_model, parse_iperf3,
                               parse_iperf3_udp, parse_ping, parse_wg_transfer, ratio_note, summarize)
# median, ratio, format_value, format_ratio: tools.ladderbench uses them as bench.<name>.
from tools.benchreport import format_ratio, format_value, median, ratio  # noqa: F401
from tools.lab import Lab, Node, find_tool
from tools.mesh import build_static_mesh, wait_for_handshakes

MESH_A, MESH_B = "100.100.0.1", "100.100.0.2"
IPERF_PORT = 5201
PING_COUNT, PING_INTERVAL = 200, 0.01
CONNECT_TIMEOUT = 20  # seconds ping waits for the first answer
IDLE_SETTLE = 12.0  # seconds after connecting before idle wake-ups are counted (after a 10 s passive keepalive)
FOOTPRINT_SYSTEMS = ("tunnelmesh", "wireguard-go", "nebula")


class TrafficCheckFailed(BenchError):
    """The tunnel's counters did not rise by what iperf3 reported moving through it."""


@dataclass
class Tunnel:
    """What the workload reads of a tunnel under test: its interface on each node, the
    two daemons' pids, and the daemons' own byte counters (node name -> rx_bytes/tx_bytes;
    None: the system has none)."""
    a: Node
    b: Node
    a_if: str
    b_if: str
    pids: list[int]
    own_counters: Callable[[], dict[str, dict[str, int]]] | None = None

    def counters(self) -> dict[str, dict[str, int]]:
        found = {f"{self.a.name} {self.a_if}": link_counters(self.a, self.a_if),
                 f"{self.b.name} {self.b_if}": link_counters(self.b, self.b_if)}
        if self.own_counters is not None:
            found.update({f"{name} daemon": values for name, values in self.own_counters().items()})
        return found

    def check(self, before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], a_to_b: float,
              b_to_a: float) -> list[str]:
        """Shortfalls: a's side must have sent a_to_b and received b_to_a, b's side the reverse."""
        problems = []
        for where in after:
            sends = a_to_b if where.startswith(f"{self.a.name} ") else b_to_a
            receives = b_to_a if where.startswith(f"{self.a.name} ") else a_to_b
            problems += counter_shortfalls(where, before[where], after[where],
                                           {"tx_bytes": sends, "rx_bytes": receives})
        return problems


def two_nodes(lab: Lab) -> tuple[Node, Node, str, str]:
    switch = lab.add_switch("sw")
    a, b = lab.add_node("a"), lab.add_node("b")
    return a, b, lab.connect(a, switch), lab.connect(b, switch)


def first_ping(node: Node, address: str) -> None:
    """Ping every 50 ms until the first answer (at most CONNECT_TIMEOUT s)."""
    proc = node.run("ping", "-n", "-c", "1", "-i", "0.05", "-w", str(CONNECT_TIMEOUT), address,
                    check=False, timeout=CONNECT_TIMEOUT + 10)
    if proc.returncode != 0:
        raise BenchError(f"{node.name}: no answer from {address} within {CONNECT_TIMEOUT} s")


#: iperf3's errors about its control connection (a reset or refused TCP connection to the
#: server, on a host that is loaded): nothing measured, so the test is run once more.
IPERF3_CONTROL_ERRORS = ("unable to receive control message", "unable to send control message",
                         "unable to connect to server")


def iperf3(client: Node, server_ip: str, seconds: int, *extra: str) -> str:
    for attempt in (1, 2):
        proc = client.run("iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
                          "--connect-timeout", "5000", *extra, check=False, timeout=seconds + 40)
        failed = next((e for e in IPERF3_CONTROL_ERRORS if e in proc.stdout), None)
        if failed is None or attempt == 2:
            break
        log(f"iperf3 {' '.join(extra)}: {failed}; once more")
    return proc.stdout


def measured(what: str, parse: Callable[[str], dict[str, Any]], output: str) -> dict[str, Any]:
    try:
        return parse(output)
    except ValueError as exc:
        raise BenchError(f"iperf3 {what}: {exc}") from None


def workload(client: Node, server: Node, server_ip: str, seconds: int, rec: dict[str, Any],
             tunnel: Tunnel | None) -> None:
    """ping and iperf3 from client to server_ip; results into rec as they come. With a
    tunnel: CPU per GB of the TCP a->b run, and the traffic check (TrafficCheckFailed)."""
    srv = server.popen("iperf3", "-s", "-p", str(IPERF_PORT), log_name="iperf3-server")
    wait_until("iperf3 server listening",
               lambda: f":{IPERF_PORT}" in server.run("ss", "-Hltn", check=False).stdout,
               alive=process_alive(srv, server, "iperf3-server"))

    proc = client.run("ping", "-n", "-c", str(PING_COUNT), "-i", str(PING_INTERVAL), "-W", "2", server_ip,
                      check=False, timeout=PING_COUNT * PING_INTERVAL + 20)
    ping = parse_ping(proc.stdout)
    for key in ("avg", "min", "max", "median", "p99"):
        rec[f"ping_{key}_ms"] = ping[f"{key}_ms"]
    rec["ping_loss_pct"], rec["ping_replies"] = ping["loss_pct"], ping["replies"]
    if ping["avg_ms"] is None:
        raise BenchError(f"ping {server_ip}: no RTT ({proc.stdout.strip()[-200:]} {proc.stderr.strip()[-200:]})")

    before = tunnel.counters() if tunnel else {}
    cpu_before = cpu_seconds(tunnel.pids) if tunnel else 0.0
    tcp_ab = measured("a->b", parse_iperf3, iperf3(client, server_ip, seconds))
    if tunnel:
        rec["cpu_s_tcp_ab"] = cpu_seconds(tunnel.pids) - cpu_before
        rec["cpu_s_per_gb"] = cpu_per_gb(rec["cpu_s_tcp_ab"], tcp_ab["bytes"])
    tcp_ba = measured("b->a (-R)", parse_iperf3, iperf3(client, server_ip, seconds, "-R"))
    tcp_p4 = measured("a->b -P 4", parse_iperf3, iperf3(client, server_ip, seconds, "-P", "4"))
    for key, result in (("tcp_ab", tcp_ab), ("tcp_ba", tcp_ba), ("tcp_p4", tcp_p4)):
        rec[f"{key}_mbps"], rec[f"{key}_retrans"], rec[f"{key}_bytes"] = (
            result["mbps"], result["retransmits"], result["bytes"])
    a_to_b = tcp_ab["bytes"] + tcp_p4["bytes"]
    for size in UDP_SIZES:
        udp = measured(f"UDP {size} B", parse_iperf3_udp,
                       iperf3(client, server_ip, seconds, "-u", "-l", str(size - UDP_HEADERS), "-b", "0"))
        for key, value in udp.items():
            rec[f"udp{size}_{key}"] = value
        a_to_b += udp["bytes"]
    if tunnel:
        after = tunnel.counters()
        rec["counters_before"], rec["counters_after"] = before, after
        problems = tunnel.check(before, after, a_to_b, tcp_ba["bytes"])
        if problems:
            raise TrafficCheckFailed("traffic check failed: " + "; ".join(problems))


# --- the systems -------------------------------------------------------------------------


def bench_veth(lab: Lab, seconds: int, rec: dict[str, Any]) -> None:
    a, b, _, under_b = two_nodes(lab)
    workload(a, b, under_b, seconds, rec, None)


#: Each node's `[filter]` for tunnelmesh+filter: what the workload needs (ping both ways,
#: iperf3 from a to b's server over TCP and UDP); the answers pass as replies to the
#: nodes' own flows.
FILTER_CONFIG = f"""
[filter]

[[filter.allow]]
from = "*"
proto = "icmp"

[[filter.allow]]
from = "*"
proto = "tcp"
ports = [{IPERF_PORT}]

[[filter.allow]]
from = "*"
proto = "udp"
ports = [{IPERF_PORT}]
"""


def bench_tunnelmesh(lab: Lab, seconds: int, rec: dict[str, Any], *, packet_filter: bool = False) -> None:
    """A static mesh of two; `packet_filter`: with FILTER_CONFIG on both nodes (checked in force)."""
    mesh = build_static_mesh(lab, ["a", "b"], start=False)
    a, b = mesh["a"], mesh["b"]
    if packet_filter:
        for m in mesh.values():
            m.append_config(FILTER_CONFIG)
    try:
        a.up()
        started = time.monotonic()
        b.up()
        rec["up_s"] = time.monotonic() - started
        first_ping(b.node, a.mesh_ip)
        rec["connect_s"] = time.monotonic() - started
        wait_for_handshakes(mesh)
        statuses = {m.name: m.status() for m in mesh.values()}
        filtering = {name: status["filter"]["enabled"] for name, status in statuses.items()}
        if set(filtering.values()) != {packet_filter}:
            raise BenchError(f"packet filter {'on' if packet_filter else 'off'} expected, in force: {filtering}")
        pids = {name: int(status["node"]["pid"]) for name, status in statuses.items()}
        rec["rss_idle_mib"] = rss_mib(pids["a"])[0]
        rec["wakeups_idle_per_min"] = idle_wakeups_per_minute([pids["a"]], IDLE_SETTLE, seconds)

        def own_counters() -> dict[str, dict[str, int]]:
            totals = {}
            for m in mesh.values():
                peers = m.status()["peers"]
                totals[m.name] = {k: sum(int(p[k]) for p in peers) for k in ("rx_bytes", "tx_bytes")}
            return totals

        tunnel = Tunnel(a.node, b.node, statuses["a"]["node"]["interface"], statuses["b"]["node"]["interface"],
                        [pids["a"], pids["b"]], own_counters)
        workload(a.node, b.node, b.mesh_ip, seconds, rec, tunnel)
        rec["rss_mib"], rec["rss_peak_mib"] = rss_mib(pids["a"])
        statuses = {m.name: m.status() for m in mesh.values()}
        rec["drops"] = {name: status.get("drops") for name, status in statuses.items()}
        if packet_filter:  # a denied packet would be a workload the rules do not fit
            rec["filter_drops"] = {name: status["filter"]["drops"] for name, status in statuses.items()}
    except BaseException:
        for m in mesh.values():  # the daemon's own log, for the error report
            try:
                tail = Path(m.log_path).read_text(errors="replace").splitlines()[-8:]
                if tail:
                    rec.setdefault("log_tail", {})[m.name] = tail
            except OSError:
                pass
        raise


def bench_wireguard_go(lab: Lab, seconds: int, rec: dict[str, Any], sockets: list[Path]) -> None:
    a, b, under_a, under_b = two_nodes(lab)
    tag = secrets.token_hex(2)
    nodes = {"a": (a, f"wgb{tag}a", MESH_A, under_a), "b": (b, f"wgb{tag}b", MESH_B, under_b)}
    keys = {name: wg_key_pair(node) for name, (node, *_rest) in nodes.items()}
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, other: str) -> None:
        node, ifname, mesh_ip, _ = nodes[name]
        _, _, other_ip, other_under = nodes[other]
        procs[name] = start_wireguard_go(node, ifname, sockets)
        node.run("wg", "set", ifname, "listen-port", str(WG_PORT), "private-key", str(keys[name][0]),
                 "peer", keys[other][1], "allowed-ips", f"{other_ip}/32", "endpoint", f"{other_under}:{WG_PORT}")
        node.run("ip", "addr", "add", f"{mesh_ip}/{MESH_PREFIXLEN}", "dev", ifname)
        node.run("ip", "link", "set", ifname, "mtu", str(MTU["wireguard-go"]), "up")

    start("a", "b")
    started = time.monotonic()
    start("b", "a")
    first_ping(b, MESH_A)
    rec["connect_s"] = time.monotonic() - started
    pid = procs["a"].pid
    rec["rss_idle_mib"] = rss_mib(pid)[0]
    rec["wakeups_idle_per_min"] = idle_wakeups_per_minute([pid], IDLE_SETTLE, seconds)

    def own_counters() -> dict[str, dict[str, int]]:
        return {name: parse_wg_transfer(node.run("wg", "show", ifname, "transfer").stdout)
                for name, (node, ifname, _, _) in nodes.items()}

    tunnel = Tunnel(a, b, nodes["a"][1], nodes["b"][1], [procs["a"].pid, procs["b"].pid], own_counters)
    workload(a, b, MESH_B, seconds, rec, tunnel)
    rec["rss_mib"], rec["rss_peak_mib"] = rss_mib(pid)


def bench_nebula(lab: Lab, seconds: int, rec: dict[str, Any]) -> None:
    need_nebula()
    a, b, under_a, under_b = two_nodes(lab)
    tag = secrets.token_hex(2)
    nodes = {"a": (a, f"neb{tag}a", MESH_A, under_a), "b": (b, f"neb{tag}b", MESH_B, under_b)}
    pki = nebula_ca(lab, a)
    configs = {}
    for name, (node, dev, mesh_ip, _) in nodes.items():
        _, _, other_ip, other_under = nodes["b" if name == "a" else "a"]
        configs[name] = nebula_config(node, pki, name, f"{mesh_ip}/{MESH_PREFIXLEN}", dev,
                                      {other_ip: f"{other_under}:{NEBULA_PORT}"})
    procs = {"a": start_nebula(a, configs["a"], nodes["a"][1], MESH_A)}
    started = time.monotonic()
    procs["b"] = start_nebula(b, configs["b"], nodes["b"][1], MESH_B)
    first_ping(b, MESH_A)
    rec["connect_s"] = time.monotonic() - started
    pid = procs["a"].pid
    rec["rss_idle_mib"] = rss_mib(pid)[0]
    rec["wakeups_idle_per_min"] = idle_wakeups_per_minute([pid], IDLE_SETTLE, seconds)
    tunnel = Tunnel(a, b, nodes["a"][1], nodes["b"][1], [procs["a"].pid, procs["b"].pid])
    workload(a, b, MESH_B, seconds, rec, tunnel)
    rec["rss_mib"], rec["rss_peak_mib"] = rss_mib(pid)


# --- running -----------------------------------------------------------------------------


def run_one(system: str, seconds: int) -> dict[str, Any]:
    """One measurement of one system in fresh labs (the workload's, then the footprint's):
    its record, with "error" on failure. A run that fails the traffic check keeps its
    figures only under "unverified", so that they are never shown."""
    rec: dict[str, Any] = {}
    sockets: list[Path] = []
    started = time.monotonic()
    try:
        with fresh_lab(sockets) as lab:
            if system == "veth":
                bench_veth(lab, seconds, rec)
            elif system in ("tunnelmesh", FILTERED):
                bench_tunnelmesh(lab, seconds, rec, packet_filter=system == FILTERED)
            elif system == "wireguard-go":
                bench_wireguard_go(lab, seconds, rec, sockets)
            elif system == "nebula":
                bench_nebula(lab, seconds, rec)
            else:
                raise ValueError(system)
        if system in FOOTPRINT_SYSTEMS:
            footprint.measure(system, rec)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - one system failing must not stop the others
        reason = str(exc).strip().splitlines()
        kind = "" if isinstance(exc, BenchError) else f"{type(exc).__name__}: "
        rec["error"] = f"{kind}{reason[0] if reason else ''}"[:600]
        rec["error_detail"] = str(exc)[-3000:]
        if isinstance(exc, TrafficCheckFailed):
            rec["unverified"] = {key: rec.pop(key) for key in METRIC_KEYS if key in rec}
    rec["wall_s"] = time.monotonic() - started
    return rec


def first_line(*argv: str) -> str:
    """The first line a tool prints (its version), or why there is none."""
    if find_tool(argv[0]) is None:
        return "not installed"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (proc.stdout + proc.stderr).strip()
    return text.splitlines()[0] if text else f"exit {proc.returncode}"


def machine() -> dict[str, Any]:
    """What the figures were measured on, and when."""
    try:
        cpu_model = parse_cpu_model(Path("/proc/cpuinfo").read_text())
    except OSError:
        cpu_model = "unknown"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iperf3": first_line("iperf3", "--version"),
        "wireguard-go": first_line("wireguard-go", "--version"),
        "nebula": first_line("nebula", "-version"),
    }


def report(args: argparse.Namespace, records: dict[str, list[dict[str, Any]]], host: dict[str, Any]) -> str:
    results, unavailable = summarize(args.systems, records)
    note = ratio_note(list(results))
    lines = [
        f"iperf3 -t {args.time} (TCP 1 and 4 flows, UDP {' and '.join(map(str, UDP_SIZES))} B), "
        f"ping -c {PING_COUNT} -i {PING_INTERVAL}, {args.runs} run(s){' (medians)' if args.runs > 1 else ''}; "
        f"{host['date']}, {host['cpu_model']}, {host['cpus']} CPUs, Linux {host['kernel']}, Python {host['python']}",
        "MTU: " + ", ".join(f"{s} {MTU[s]}" for s in TUNNELS if s in args.systems) + (f"; {note}" if note else ""),
        "",
        format_table(results, args.systems) if results else "(no results)",
    ]
    notes = []
    for system in args.systems:
        if system in unavailable:
            notes.append(f"{system}: unavailable ({unavailable[system]})")
        else:
            notes += [f"{system}: run {i} failed: {run['error']}"
                      for i, run in enumerate(records[system], 1) if run.get("error")]
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=int, default=10, metavar="T",
                        help="iperf3 seconds per TCP and UDP test (default 10)")
    parser.add_argument("--runs", type=int, default=1, metavar="N", help="measurements per system; medians (default 1)")
    parser.add_argument("--only", default=",".join(SYSTEMS), metavar="LIST",
                        help=f"comma-separated systems to measure (default: {','.join(SYSTEMS)})")
    parser.add_argument("--json", action="store_true", help="print machine-readable results instead of the table")
    parser.add_argument("--json-out", metavar="FILE", help="also write the machine-readable results to FILE")
    parser.add_argument("--chart", metavar="FILE.png", help="also draw the key figures per system to FILE.png")
    parser.add_argument("--ladder", action="store_true",
                        help="run tools.ladderbench instead (switch times and throughput per rung of the transport "
                             "ladder); the other options are then its own: see python -m tools.ladderbench --help")
    args = parser.parse_args(argv)
    if not 1 <= args.time <= 600:
        parser.error("--time must be 1..600")
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be 1..50")
    args.systems = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.systems if s not in SYSTEMS]
    if bad or not args.systems:
        parser.error(f"--only takes a comma-separated list of {', '.join(SYSTEMS)}; not {', '.join(bad) or 'empty'}")
    args.systems = [s for s in SYSTEMS if s in args.systems]  # canonical order, no duplicates
    return args


def _hangup(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--ladder" in argv:
        from tools import ladderbench
        return ladderbench.main([arg for arg in argv if arg != "--ladder"])
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("tools.bench creates network namespaces and TUN devices: run it as root", file=sys.stderr)
        return 2
    missing = [t for t in ("iperf3", "ping", "ss") if find_tool(t) is None]
    if "wireguard-go" in args.systems:
        missing += [t for t in ("wireguard-go", "wg") if find_tool(t) is None]
    if missing:
        print(f"missing {', '.join(missing)}: run tools/setup.sh", file=sys.stderr)
        return 2
    if args.chart:
        try:
            import matplotlib  # noqa: F401 - only whether it is there, before minutes of measuring
        except ImportError:
            print("--chart needs matplotlib: run tools/setup.sh (the `bench` extra)", file=sys.stderr)
            return 2
    signal.signal(signal.SIGHUP, _hangup)
    host = machine()
    records: dict[str, list[dict[str, Any]]] = {s: [] for s in args.systems}
    try:
        for run in range(1, args.runs + 1):
            for system in args.systems:
                log(f"run {run}/{args.runs}: {system} ...")
                rec = run_one(system, args.time)
                records[system].append(rec)
                if rec.get("error"):
                    log(f"run {run}/{args.runs}: {system} failed: {rec['error']}")
                    for name, tail in (rec.get("log_tail") or {}).items():
                        log(f"  {name} log: " + " | ".join(tail)[-600:])
                else:
                    summary = ", ".join(f"{k} {v:.3g}" for k, v in rec.items() if k in METRIC_KEYS and v is not None)
                    log(f"run {run}/{args.runs}: {system}: {summary} ({rec['wall_s']:.0f} s)")
    except KeyboardInterrupt:
        print("\nbench: interrupted; labs torn down", file=sys.stderr)
        return 130
    doc = document({"time_s": args.time, "runs": args.runs, "ping": {"count": PING_COUNT, "interval_s": PING_INTERVAL},
                    "udp_sizes": list(UDP_SIZES)}, host, args.systems, records)
    text = json.dumps(doc, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    if args.chart:
        from tools import benchchart
        try:
            benchchart.draw(doc, args.chart)
        except ValueError as exc:
            log(f"no chart: {exc}")
    print(text if args.json else report(args, records, host))
    return 1 if doc["unavailable"] or doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
