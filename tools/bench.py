"""Benchmark TunnelMesh against wireguard-go and nebula in network namespaces.

    python -m tools.bench [--time T] [--runs N] [--only tunnelmesh,tunnelmesh+filter,wireguard-go,nebula,veth] [--json]
    python -m tools.bench --ladder [--rounds N] [--time T] [--json]   (tools.ladderbench: the transport ladder)

For every system, in turn and never two at once, a fresh lab: two namespaces `a` and
`b` joined by a switch (192.0.2.0/24), the tunnel between them (mesh IPs 100.100.0.1 and
.2). Then from `a`: `ping -c 20 -i 0.2` to b's mesh IP (RTT avg), and single-flow TCP
`iperf3 -c <b> -t T -J` both ways (a->b, and b->a with -R) against `iperf3 -s` in `b`.
Also measured: connect time (from starting the second node, `tunnelmesh up --detach` of
`b` or its wireguard-go/nebula process and configuration, to b's first answered ping of
a, pinging every 50 ms; for tunnelmesh it includes the CLI's own start, recorded alone as
"up_s" in --json) and the RSS of node a's tunnel daemon (/proc/<pid>/status), idle
after connecting and again after the TCP runs (peak VmHWM in --json).
"veth" is the same iperf3/ping workload on the underlay without any tunnel, for context.
"tunnelmesh+filter" is "tunnelmesh" with the packet filter on (docs/filter.md): each
node's `[filter]` table allows only what the workload needs, ICMP echo and the iperf3
port, so every packet goes through the filter both ways; "tunnelmesh" has no filter.

Every figure is only meaningful as a ratio against a peer measured in the same run
(see PERF-NOTES.md): the table prints tunnelmesh / wireguard-go and tunnelmesh / nebula,
and the filter's cost as tunnelmesh+filter / tunnelmesh.
With --runs N > 1 each system is measured N times (runs interleave the systems) and the
table shows medians; --json prints every raw value too. Nothing here asserts a speed.

Exit status: 0 when every requested system was measured, 1 when one failed or was
unavailable (the table still shows the rest), 2 for bad usage, 130 when interrupted.
Labs are torn down on failure, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from tools.lab import Lab, Node, clean_environment, find_tool
from tools.mesh import build_static_mesh, wait_for_handshakes

# ---------------------------------------------------------------------------------------
# Pure part: metrics, medians, ratios, the table. (tests/unit/test_bench_report.py)

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

# (key, row label, format, show a ratio)
METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("tcp_ab_mbps", "TCP a->b (Mbit/s)", "{:.0f}", True),
    ("tcp_ba_mbps", "TCP b->a (Mbit/s)", "{:.0f}", True),
    ("ping_avg_ms", "ping RTT avg (ms)", "{:.3f}", True),
    ("tcp_ab_retrans", "TCP a->b retransmits", "{:.0f}", False),
    ("tcp_ba_retrans", "TCP b->a retransmits", "{:.0f}", False),
    ("connect_s", "connect time (s)", "{:.2f}", True),
    ("rss_idle_mib", "daemon RSS idle (MiB)", "{:.1f}", True),
    ("rss_mib", "daemon RSS after TCP (MiB)", "{:.1f}", True),
)
METRIC_KEYS = tuple(m[0] for m in METRICS)


def median(values: list[float | None]) -> float | None:
    """Median of the values that are not None (None if there are none)."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(present) if present else None


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
    """For --json, the table's ratios: system -> metric -> RATIO_OF it (tunnelmesh / a
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
    return f"ratio {'; '.join(parts)} (Mbit/s: higher is better; ms, s, MiB: lower is better)"


def parse_ping(output: str) -> dict[str, float | None]:
    """Loss % and min/avg/max RTT (ms) from iputils ping's summary."""
    loss = re.search(r"([\d.]+)% packet loss", output)
    rtt = re.search(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", output)
    return {
        "loss_pct": float(loss.group(1)) if loss else None,
        "min_ms": float(rtt.group(1)) if rtt else None,
        "avg_ms": float(rtt.group(2)) if rtt else None,
        "max_ms": float(rtt.group(3)) if rtt else None,
    }


def parse_iperf3(output: str) -> dict[str, float | None]:
    """Received Mbit/s and sender retransmits from `iperf3 -J` output; ValueError when it
    reports an error or has no result."""
    try:
        data = json.loads(output)
    except json.JSONDecodeError as exc:
        raise ValueError(f"iperf3 printed no JSON: {output[-300:]!r}") from exc
    if data.get("error"):
        raise ValueError(f"iperf3: {data['error']}")
    end = data.get("end") or {}
    received = (end.get("sum_received") or {}).get("bits_per_second")
    if received is None:
        raise ValueError("iperf3 JSON has no end.sum_received.bits_per_second")
    retrans = (end.get("sum_sent") or {}).get("retransmits")
    return {"mbps": received / 1e6, "retransmits": float(retrans) if retrans is not None else None}


# ---------------------------------------------------------------------------------------
# The lab part.

MESH_A, MESH_B = "100.100.0.1", "100.100.0.2"
MESH_PREFIXLEN = 24
WG_PORT = 51820
NEBULA_PORT = 4242
IPERF_PORT = 5201
PING_COUNT = 20
READY_TIMEOUT = 20.0  # for each "wait until X is there" loop
CONNECT_TIMEOUT = 20  # seconds ping waits for the first answer


class BenchError(RuntimeError):
    pass


def log(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def wait_until(what: str, check: Callable[[], bool], timeout: float = READY_TIMEOUT, interval: float = 0.05,
               alive: Callable[[], str | None] | None = None) -> None:
    """Poll check() until true, bounded in time. alive() returns a reason to give up early."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if alive is not None:
            dead = alive()
            if dead:
                raise BenchError(f"{what}: {dead}")
        if time.monotonic() >= deadline:
            raise BenchError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def process_alive(proc: subprocess.Popen, node: Node, log_name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        if proc.poll() is None:
            return None
        tail = " | ".join(node.log(log_name).strip().splitlines()[-5:])
        return f"process exited with {proc.returncode}: {tail}"
    return check


def rss_mib(pid: int) -> tuple[float | None, float | None]:
    """(VmRSS, VmHWM) of a process in MiB, from /proc/<pid>/status."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None, None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB
    return values.get("VmRSS"), values.get("VmHWM")


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


def has_address(node: Node, ifname: str, address: str) -> bool:
    proc = node.run("ip", "-o", "-4", "addr", "show", "dev", ifname, check=False)
    return proc.returncode == 0 and f" {address}/" in proc.stdout


def workload(client: Node, server: Node, server_ip: str, seconds: int, rec: dict[str, Any]) -> None:
    """ping and iperf3 both ways from client to server_ip; results into rec as they come."""
    srv = server.popen("iperf3", "-s", "-p", str(IPERF_PORT), log_name="iperf3-server")
    wait_until("iperf3 server listening",
               lambda: f":{IPERF_PORT}" in server.run("ss", "-Hltn", check=False).stdout,
               alive=process_alive(srv, server, "iperf3-server"))

    proc = client.run("ping", "-n", "-q", "-c", str(PING_COUNT), "-i", "0.2", "-W", "2", server_ip,
                      check=False, timeout=PING_COUNT * 0.2 + 20)
    ping = parse_ping(proc.stdout)
    rec["ping_avg_ms"], rec["ping_min_ms"], rec["ping_max_ms"], rec["ping_loss_pct"] = (
        ping["avg_ms"], ping["min_ms"], ping["max_ms"], ping["loss_pct"])
    if ping["avg_ms"] is None:
        raise BenchError(f"ping {server_ip}: no RTT ({proc.stdout.strip()[-200:]} {proc.stderr.strip()[-200:]})")

    for key, extra in (("tcp_ab", []), ("tcp_ba", ["-R"])):
        proc = client.run("iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-J",
                          "--connect-timeout", "5000", *extra, check=False, timeout=seconds + 40)
        try:
            result = parse_iperf3(proc.stdout)
        except ValueError as exc:
            raise BenchError(f"iperf3 {' '.join(extra) or 'forward'} to {server_ip}: {exc}") from None
        rec[f"{key}_mbps"], rec[f"{key}_retrans"] = result["mbps"], result["retransmits"]


# --- the systems -------------------------------------------------------------------------


def bench_veth(lab: Lab, seconds: int, rec: dict[str, Any]) -> None:
    a, b, _, under_b = two_nodes(lab)
    workload(a, b, under_b, seconds, rec)


#: Each node's `[filter]` for tunnelmesh+filter: what the workload needs (ping both ways,
#: iperf3 from a to b's server); the answers pass as replies to the nodes' own flows.
FILTER_CONFIG = f"""
[filter]

[[filter.allow]]
from = "*"
proto = "icmp"

[[filter.allow]]
from = "*"
proto = "tcp"
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
        filtering = {m.name: m.status()["filter"]["enabled"] for m in mesh.values()}
        if set(filtering.values()) != {packet_filter}:
            raise BenchError(f"packet filter {'on' if packet_filter else 'off'} expected, in force: {filtering}")
        pid = int(a.status()["node"]["pid"])
        rec["rss_idle_mib"] = rss_mib(pid)[0]
        workload(a.node, b.node, b.mesh_ip, seconds, rec)
        rec["rss_mib"], rec["rss_peak_mib"] = rss_mib(pid)
        statuses = {m.name: m.status() for m in mesh.values()}
        rec["drops"] = {name: status.get("drops") for name, status in statuses.items()}
        if packet_filter:  # a denied packet would be a workload the rules do not fit
            rec["filter_drops"] = {name: status["filter"]["drops"] for name, status in statuses.items()}
    except BaseException:
        for m in mesh.values():  # the daemon's own log, for the error report
            try:
                tail = Path(m.node.state_dir, "tunnelmesh.log").read_text(errors="replace").splitlines()[-8:]
                if tail:
                    rec.setdefault("log_tail", {})[m.name] = tail
            except OSError:
                pass
        raise


def bench_wireguard_go(lab: Lab, seconds: int, rec: dict[str, Any], sockets: list[Path]) -> None:
    a, b, under_a, under_b = two_nodes(lab)
    tag = secrets.token_hex(2)
    nodes = {"a": (a, f"wgb{tag}a", MESH_A, under_a), "b": (b, f"wgb{tag}b", MESH_B, under_b)}
    keys = {}
    for name, (node, *_rest) in nodes.items():
        private = node.run("wg", "genkey").stdout.strip()
        public = node.run("wg", "pubkey", input=private + "\n").stdout.strip()
        key_file = Path(node.state_dir, "wg.key")
        key_file.touch(mode=0o600)
        key_file.write_text(private + "\n")
        keys[name] = (key_file, public)
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, other: str) -> None:
        node, ifname, mesh_ip, _ = nodes[name]
        _, _, other_ip, other_under = nodes[other]
        sockets.append(Path("/var/run/wireguard", f"{ifname}.sock"))
        env = dict(clean_environment(), WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
        proc = node.popen("wireguard-go", "-f", ifname, env=env, log_name="wireguard-go")
        procs[name] = proc
        wait_until(f"{name}: wireguard-go interface {ifname}",
                   lambda: node.run("wg", "show", ifname, check=False).returncode == 0,
                   alive=process_alive(proc, node, "wireguard-go"))
        node.run("wg", "set", ifname, "listen-port", str(WG_PORT), "private-key", str(keys[name][0]),
                 "peer", keys[other][1], "allowed-ips", f"{other_ip}/32", "endpoint", f"{other_under}:{WG_PORT}")
        node.run("ip", "addr", "add", f"{mesh_ip}/{MESH_PREFIXLEN}", "dev", ifname)
        node.run("ip", "link", "set", ifname, "mtu", str(MTU["wireguard-go"]), "up")

    start("a", "b")
    started = time.monotonic()
    start("b", "a")
    first_ping(b, MESH_A)
    rec["connect_s"] = time.monotonic() - started
    pid = procs["a"].pid  # `ip netns exec` execs the program: same pid
    rec["rss_idle_mib"] = rss_mib(pid)[0]
    workload(a, b, MESH_B, seconds, rec)
    rec["rss_mib"], rec["rss_peak_mib"] = rss_mib(pid)


NEBULA_CONFIG = """\
pki:
  ca: {ca}
  cert: {cert}
  key: {key}
static_host_map:
  "{other_ip}": ["{other_under}:{port}"]
lighthouse:
  am_lighthouse: false
  interval: 60
  hosts: []
listen:
  host: 0.0.0.0
  port: {port}
punchy:
  punch: false
cipher: aes
tun:
  disabled: false
  dev: {dev}
  drop_local_broadcast: false
  drop_multicast: false
  tx_queue: 500
  mtu: {mtu}
logging:
  level: info
  format: text
firewall:
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: any
      proto: any
      host: any
"""


def bench_nebula(lab: Lab, seconds: int, rec: dict[str, Any]) -> None:
    for tool in ("nebula", "nebula-cert"):
        if find_tool(tool) is None:
            raise BenchError(f"`{tool}` not installed (apt-get install --no-install-recommends nebula)")
    a, b, under_a, under_b = two_nodes(lab)
    tag = secrets.token_hex(2)
    nodes = {"a": (a, f"neb{tag}a", MESH_A, under_a), "b": (b, f"neb{tag}b", MESH_B, under_b)}
    pki = Path(lab.workdir, "nebula-pki")
    pki.mkdir(mode=0o700)
    a.run("nebula-cert", "ca", "-name", "tunnelmesh-bench", "-out-crt", str(pki / "ca.crt"), "-out-key", str(pki / "ca.key"))
    configs = {}
    for name, (node, dev, mesh_ip, _) in nodes.items():
        other = "b" if name == "a" else "a"
        a.run("nebula-cert", "sign", "-name", name, "-ip", f"{mesh_ip}/{MESH_PREFIXLEN}",
              "-ca-crt", str(pki / "ca.crt"), "-ca-key", str(pki / "ca.key"),
              "-out-crt", str(pki / f"{name}.crt"), "-out-key", str(pki / f"{name}.key"))
        config = Path(node.state_dir, "nebula.yml")
        config.write_text(NEBULA_CONFIG.format(
            ca=pki / "ca.crt", cert=pki / f"{name}.crt", key=pki / f"{name}.key", other_ip=nodes[other][2],
            other_under=nodes[other][3], port=NEBULA_PORT, dev=dev, mtu=MTU["nebula"]))
        configs[name] = config
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        node, dev, mesh_ip, _ = nodes[name]
        proc = node.popen("nebula", "-config", str(configs[name]), log_name="nebula")
        procs[name] = proc
        wait_until(f"{name}: nebula interface {dev} with {mesh_ip}", lambda: has_address(node, dev, mesh_ip),
                   alive=process_alive(proc, node, "nebula"))

    start("a")
    started = time.monotonic()
    start("b")
    first_ping(b, MESH_A)
    rec["connect_s"] = time.monotonic() - started
    pid = procs["a"].pid
    rec["rss_idle_mib"] = rss_mib(pid)[0]
    workload(a, b, MESH_B, seconds, rec)
    rec["rss_mib"], rec["rss_peak_mib"] = rss_mib(pid)


# --- running -----------------------------------------------------------------------------


@contextmanager
def fresh_lab(sockets: list[Path]) -> Iterator[Lab]:
    """A lab torn down however the block ends; a second Ctrl-C cannot cut the teardown short."""
    lab = Lab()
    try:
        yield lab
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            lab.cleanup()
            for sock in sockets:  # wireguard-go's UAPI socket, if it died without removing it
                sock.unlink(missing_ok=True)
        finally:
            signal.signal(signal.SIGINT, previous)


def run_one(system: str, seconds: int) -> dict[str, Any]:
    """One measurement of one system in a fresh lab: its record, with "error" on failure."""
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
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - one system failing must not stop the others
        reason = str(exc).strip().splitlines()
        kind = "" if isinstance(exc, BenchError) else f"{type(exc).__name__}: "
        rec["error"] = f"{kind}{reason[0] if reason else ''}"[:300]
        rec["error_detail"] = str(exc)[-3000:]
    rec["wall_s"] = time.monotonic() - started
    return rec


def tool_versions() -> dict[str, str]:
    def first_line(*argv: str) -> str:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable ({exc})"
        text = (proc.stdout + proc.stderr).strip()
        return text.splitlines()[0] if text else f"exit {proc.returncode}"

    versions = {"kernel": platform.release(), "python": platform.python_version(), "cpus": str(os.cpu_count())}
    for name, argv in (("iperf3", ["iperf3", "--version"]), ("wireguard-go", ["wireguard-go", "--version"]),
                       ("nebula", ["nebula", "-version"])):
        versions[name] = first_line(*argv) if find_tool(argv[0]) else "not installed"
    return versions


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


def report(args: argparse.Namespace, systems: list[str], records: dict[str, list[dict[str, Any]]],
           versions: dict[str, str]) -> str:
    results, unavailable = summarize(systems, records)
    note = ratio_note(list(results))
    lines = [
        f"single-flow TCP iperf3 -t {args.time}, ping -c {PING_COUNT} -i 0.2, "
        f"{args.runs} run(s){' (medians)' if args.runs > 1 else ''}; "
        f"{versions['cpus']} CPUs, Linux {versions['kernel']}, Python {versions['python']}",
        "MTU: " + ", ".join(f"{s} {MTU[s]}" for s in TUNNELS if s in systems) + (f"; {note}" if note else ""),
        "",
        format_table(results, systems) if results else "(no results)",
    ]
    notes = []
    for system in systems:
        if system in unavailable:
            notes.append(f"{system}: unavailable ({unavailable[system]})")
        else:
            for i, run in enumerate(records[system], 1):
                if run.get("error"):
                    notes.append(f"{system}: run {i} failed: {run['error']}")
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--time", type=int, default=10, metavar="T", help="iperf3 seconds per direction (default 10)")
    parser.add_argument("--runs", type=int, default=1, metavar="N", help="measurements per system; medians (default 1)")
    parser.add_argument("--only", default=",".join(SYSTEMS), metavar="LIST",
                        help=f"comma-separated systems to measure (default: {','.join(SYSTEMS)})")
    parser.add_argument("--json", action="store_true", help="print machine-readable results instead of the table")
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
    signal.signal(signal.SIGHUP, _hangup)
    versions = tool_versions()
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
    results, unavailable = summarize(args.systems, records)
    if args.json:
        print(json.dumps({
            "time_s": args.time,
            "runs": args.runs,
            "systems": args.systems,
            "mtu": MTU,
            "versions": versions,
            "medians": results,
            "ratios": ratios(results),
            "unavailable": unavailable,
            "raw": records,
        }, indent=2))
    else:
        print(report(args, args.systems, records, versions))
    failed = bool(unavailable) or any(r.get("error") for runs in records.values() for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
