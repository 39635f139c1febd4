"""Benchmark TunnelMesh's transport ladder (UDP -> SSH -> relay -> UDP) in network namespaces.

    python -m tools.ladderbench [--rounds N] [--time T] [--json] [--only switch,new,tcp]
    python -m tools.bench --ladder [the same options]

Every lab is a network of three built as a user would (tools.mesh.build_network): `hub`
(admin, embedded coordinator and its WebSocket relay) and the pair under test, `a` and
`b`, on one switch; a<->b paths are cut with nftables rules inside a's namespace
(tools.mesh.block_path), so the hub and its relay stay reachable. Each round measures,
each part in a fresh lab, never two labs at once:

switch  An in-tunnel `ping -D -O -i 0.1` from a to b runs throughout. (a) UDP a<->b is
        cut: the time from the cut to the first answered ping sent after it (traffic now
        on SSH), and to `status` on both a and b showing rung "ssh" (polled, both nodes at
        once, about every 0.5 s). (b) 11 s after (a) was seen (the ladder makes at most one
        change per 10 s), TCP a<->b is cut too: the same two times for the relay.
        (c) 11 s later the rules go: the time until `status` on both sides shows "udp".
new     b not started yet, UDP a<->b cut, then `tunnelmesh up --detach` on b; when it
        returns, a pings b every 0.1 s: the time from `up` returning, and from starting
        it, to the first answer (a brand-new session that has to find the SSH rung).
tcp     Single-flow TCP `iperf3 -t T` a->b to b's mesh IP, once per rung, each rung in a
        fresh lab: UDP (the ladder's own choice on a clean link), SSH and relay (forced on
        both a and b by `[transports.peers.<other>] force = ...` before `up`); then in the
        same lab again with 1 % random loss on a's link (tools.lab Node.set_loss).

Figures are medians over the rounds (--json prints every raw value too) and stand
beside the targets of the ladder's issue; nothing asserts a speed or a time.
Exit status: 0 when every part was measured in every round, 1 when one failed (the
table still shows the rest), 2 for bad usage, 130 when interrupted. Labs are torn down
on failure, Ctrl-C, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from tools import bench
from tools.lab import Lab, find_tool
from tools.mesh import MeshNode, block_path, build_network, rung_of, wait_for_handshakes

# ---------------------------------------------------------------------------------------
# Pure part: ping output, medians against targets, the tables. (tests/unit/test_ladderbench_report.py)

PARTS = ("switch", "new", "tcp")
RUNGS = ("udp", "ssh", "relay")
RUNG_TITLES = {"udp": "UDP", "ssh": "SSH", "relay": "relay"}
LOSS_PCT = 1

# (record key, row label, target in seconds: the figure should be at most this)
TIMINGS: tuple[tuple[str, str, float | None], ...] = (
    ("ssh_ping_s", "UDP cut -> first ping answered (on SSH)", 10.0),
    ("ssh_status_s", "UDP cut -> status: ssh on a and b", 10.0),
    ("relay_ping_s", "TCP cut too -> first ping answered (on relay)", 15.0),
    ("relay_status_s", "TCP cut too -> status: relay on a and b", 15.0),
    ("udp_back_s", "rules removed -> status: udp on a and b", 30.0),
    ("new_from_up_s", "new session, UDP cut: `up` returned -> first ping", 5.0),
    ("new_from_start_s", "new session, UDP cut: `up` started -> first ping", 5.0),
)
MIN_RATIO = 0.5  # SSH and relay throughput: at least half of UDP's (clean link)


def tcp_key(rung: str, loss: bool) -> str:
    return f"tcp_{rung}{'_loss' if loss else ''}_mbps"


REPLY = re.compile(r"^\[(\d+(?:\.\d+)?)\] \d+ bytes from .*?icmp_seq=(\d+) .*?time=([\d.]+) ms", re.MULTILINE)


def ping_replies(output: str) -> list[tuple[float, float]]:
    """(received, sent) wall-clock times of the answered echo requests in `ping -D`
    output; sent = received - RTT."""
    return [(float(m.group(1)), float(m.group(1)) - float(m.group(3)) / 1000) for m in REPLY.finditer(output)]


def first_answer_after(output: str, since: float) -> float | None:
    """Seconds from `since` to the first answer to a ping sent at or after it (None: none yet)."""
    received = [got for got, sent in ping_replies(output) if sent >= since]
    return min(received) - since if received else None


def verdict(value: float | None, target: float | None, at_most: bool = True) -> str:
    """"met" / "MISSED" against a target (at most, or at least), "" when either is missing."""
    if value is None or target is None:
        return ""
    return "met" if (value <= target if at_most else value >= target) else "MISSED"


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """key -> {"median", "min", "max"} over the rounds' records, for every number key."""
    keys = sorted({k for rec in records for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    out = {}
    for key in keys:
        values = [v for v in (rec.get(key) for rec in records) if isinstance(v, (int, float))]
        out[key] = {"median": bench.median(values), "min": min(values, default=None), "max": max(values, default=None)}
    return out


def align(rows: list[list[str]]) -> list[str]:
    """Text rows as lines: the first column flush left, the others flush right."""
    widths = [max(map(len, column)) for column in zip(*rows)]
    return ["  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]).rstrip()
            for row in rows]


def _num(value: float | None, fmt: str) -> str:
    return bench.format_value(value, fmt)


def timing_table(stats: dict[str, dict[str, float | None]]) -> list[str]:
    rows = [["time (s)", "median", "min", "max", "target", ""]]
    for key, label, target in TIMINGS:
        s = stats.get(key, {})
        rows.append([label, _num(s.get("median"), "{:.2f}"), _num(s.get("min"), "{:.2f}"),
                     _num(s.get("max"), "{:.2f}"), f"<= {target:g}" if target is not None else "",
                     verdict(s.get("median"), target)])
    return align(rows)


def throughput_table(stats: dict[str, dict[str, float | None]], seconds: int) -> list[str]:
    header = [f"TCP a->b, iperf3 -t {seconds} (Mbit/s)"]
    for rung in RUNGS:
        header.append(RUNG_TITLES[rung])
        if rung != "udp":
            header.append(f"{RUNG_TITLES[rung]}/UDP")
    rows = [header]
    ratios: dict[str, float | None] = {}
    for loss, label in ((False, "clean link"), (True, f"{LOSS_PCT} % random loss on a")):
        udp = stats.get(tcp_key("udp", loss), {}).get("median")
        row = [label]
        for rung in RUNGS:
            value = stats.get(tcp_key(rung, loss), {}).get("median")
            row.append(_num(value, "{:.0f}"))
            if rung != "udp":
                r = bench.ratio(value, udp)
                row.append(bench.format_ratio(r))
                if not loss:
                    ratios[rung] = r
        rows.append(row)
    rows.append(["target (clean link)", "", "", f">= {MIN_RATIO:.2f}", "", f">= {MIN_RATIO:.2f}"])
    rows.append(["", "", "", verdict(ratios.get("ssh"), MIN_RATIO, at_most=False), "",
                 verdict(ratios.get("relay"), MIN_RATIO, at_most=False)])
    return align(rows)


def report(records: list[dict[str, Any]], seconds: int) -> str:
    stats = summarize(records)
    rounds = len(records)
    lines = [f"transport ladder, {rounds} round(s){' (medians)' if rounds > 1 else ''}, "
             f"{os.cpu_count()} CPUs; pings every 0.1 s, status polled every ~0.5 s", ""]
    lines += timing_table(stats) + [""] + throughput_table(stats, seconds)
    notes = [f"round {i}: {part} failed: {error}" for i, rec in enumerate(records, 1)
             for part, error in rec.get("errors", {}).items()]
    notes += [f"round {i}: {note}" for i, rec in enumerate(records, 1) for note in rec.get("notes", [])]
    return "\n".join(lines + ([""] + notes if notes else []))


# ---------------------------------------------------------------------------------------
# The lab part.

SWITCH_TIMEOUT = 45.0  # for the cut -> SSH and cut -> relay waits
BACK_TIMEOUT = 90.0  # back to UDP: a probe of the better rung every 20 s, then the hold
CONNECT_TIMEOUT = 30.0
HOLD_WAIT = 11.0  # the ladder's 10 s between rung changes, and a second
PING_DEADLINE = 600  # `ping -w`: no pinger outlives this even if teardown were missed
POLL = 0.2


def pinger(member: MeshNode, address: str, name: str) -> None:
    member.node.popen("ping", "-n", "-D", "-O", "-i", "0.1", "-W", "1", "-w", str(PING_DEADLINE), address,
                      log_name=name)


def rungs_now(pair: tuple[tuple[MeshNode, str], ...], pool: ThreadPoolExecutor) -> list[str | None]:
    """rung_of for each (member, peer), the status calls run at once."""
    return list(pool.map(lambda mp: rung_of(*mp), pair))


def watch(what: str, since: float, timeout: float, checks: dict[str, Callable[[], bool]]) -> dict[str, float]:
    """Poll every check until each has been true once (bounded): name -> seconds from
    `since` (wall clock) to when it was first seen true."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(checks):
        for name, check in checks.items():
            if name not in seen and check():
                seen[name] = time.time() - since
        if len(seen) == len(checks):
            break
        if time.monotonic() >= deadline:
            missing = ", ".join(n for n in checks if n not in seen)
            raise bench.BenchError(f"{what}: {missing} not within {timeout:g} s")
        time.sleep(POLL)
    return seen


def last_switch(member: MeshNode, peer: str, rung: str) -> float | None:
    """Wall time of `member`'s last change to `rung` for `peer` (the daemon's own record)."""
    for p in member.status()["peers"]:
        if p["name"] == peer:
            times = [t["at"] for t in p["transitions"] if t["path"]["rung"] == rung]
            return times[-1] if times else None
    return None


def measure_switches(lab: Lab, rec: dict[str, Any]) -> None:
    mesh = build_network(lab, ["hub", "a", "b"])
    a, b = mesh["a"], mesh["b"]
    pair = ((a, "b"), (b, "a"))
    with ThreadPoolExecutor(2) as pool:
        def on(rung: str) -> Callable[[], bool]:
            return lambda: rungs_now(pair, pool) == [rung, rung]

        def answered(since: float) -> Callable[[], bool]:
            return lambda: first_answer_after(a.node.log("ping"), since) is not None

        wait_for_handshakes(mesh, timeout=40)
        watch("sessions on UDP", time.time(), 20, {"udp": on("udp")})
        pinger(a, b.mesh_ip, "ping")
        watch("first in-tunnel ping", time.time(), 20, {"ping": answered(time.time())})
        time.sleep(2.0)
        for step, rules, rung in (("ssh", {"udp": True}, "ssh"), ("relay", {"udp": True, "tcp": True}, "relay")):
            cut = time.time()
            block_path(a, b, **rules)
            seen = watch(f"cut to {rung}", cut, SWITCH_TIMEOUT, {"ping": answered(cut), "status": on(rung)})
            rec[f"{step}_ping_s"] = first_answer_after(a.node.log("ping"), cut)
            rec[f"{step}_status_s"] = seen["status"]
            switched = last_switch(a, "b", rung)
            rec[f"{step}_logged_s"] = None if switched is None else switched - cut  # a's own record, --json only
            time.sleep(max(0.0, cut + seen["status"] + HOLD_WAIT - time.time()))
        cut = time.time()
        block_path(a, b)
        rec["udp_back_s"] = watch("back to UDP", cut, BACK_TIMEOUT, {"status": on("udp")})["status"]
    for member in mesh.values():
        member.down(check=False)


def measure_new_session(lab: Lab, rec: dict[str, Any]) -> None:
    mesh = build_network(lab, ["hub", "a", "b"], start=False)
    a, b = mesh["a"], mesh["b"]
    a.up()
    block_path(a, b, udp=True)
    started = time.time()
    b.up()
    returned = time.time()
    pinger(a, b.mesh_ip, "ping")
    watch("first ping over a new session", returned, CONNECT_TIMEOUT,
          {"ping": lambda: first_answer_after(a.node.log("ping"), returned) is not None})
    rec["new_up_s"] = returned - started
    rec["new_from_up_s"] = first_answer_after(a.node.log("ping"), returned)
    rec["new_from_start_s"] = rec["new_from_up_s"] + rec["new_up_s"]
    rec["new_rung"] = rung_of(a, "b")
    if rec["new_rung"] != "ssh":
        rec.setdefault("notes", []).append(f"new session: a->b on {rec['new_rung']} after the first ping, not ssh")
    for member in mesh.values():
        member.down(check=False)


def iperf(a: MeshNode, b: MeshNode, seconds: int) -> dict[str, float | None]:
    proc = a.node.run("iperf3", "-c", b.mesh_ip, "-p", str(bench.IPERF_PORT), "-t", str(seconds), "-J",
                      "--connect-timeout", "5000", check=False, timeout=seconds + 60)
    try:
        return bench.parse_iperf3(proc.stdout)
    except ValueError as exc:
        raise bench.BenchError(f"iperf3 to {b.mesh_ip}: {exc}") from None


def measure_throughput(lab: Lab, rung: str, seconds: int, rec: dict[str, Any]) -> None:
    mesh = build_network(lab, ["hub", "a", "b"], start=False)
    a, b = mesh["a"], mesh["b"]
    if rung != "udp":
        a.append_config(f'\n[transports.peers.b]\nforce = "{rung}"\n')
        b.append_config(f'\n[transports.peers.a]\nforce = "{rung}"\n')
    a.up()
    b.up()
    started = time.time()
    wait_for_handshakes(mesh, timeout=40)
    with ThreadPoolExecutor(2) as pool:
        pair = ((a, "b"), (b, "a"))
        rec[f"tcp_{rung}_settle_s"] = watch(f"a<->b on {rung}", started, 40,
                                            {rung: lambda: rungs_now(pair, pool) == [rung, rung]})[rung]
        bench.first_ping(a.node, b.mesh_ip)
        server = b.node.popen("iperf3", "-s", "-p", str(bench.IPERF_PORT), log_name="iperf3-server")
        bench.wait_until("iperf3 server listening",
                         lambda: f":{bench.IPERF_PORT}" in b.node.run("ss", "-Hltn", check=False).stdout,
                         alive=bench.process_alive(server, b.node, "iperf3-server"))
        for loss in (False, True):
            a.node.set_loss(LOSS_PCT if loss else 0)
            result = iperf(a, b, seconds)
            rec[tcp_key(rung, loss)] = result["mbps"]
            rec[tcp_key(rung, loss).replace("_mbps", "_retrans")] = result["retransmits"]
            after = rungs_now(pair, pool)
            if after != [rung, rung]:
                rec.setdefault("notes", []).append(
                    f"{tcp_key(rung, loss)}: a->b, b->a on {after[0]}, {after[1]} after iperf3, not {rung}")
        a.node.set_loss(0)
    for member in mesh.values():
        member.down(check=False)


def run_part(part: str, measure: Callable[[Lab], None], rec: dict[str, Any]) -> None:
    """One part in a fresh lab; a failure is recorded (with the daemons' state) and the
    round goes on. The lab is torn down however the part ends."""
    started = time.monotonic()
    try:
        with bench.fresh_lab([]) as lab:
            try:
                measure(lab)
            except Exception:
                rec.setdefault("log_tails", {})[part] = lab_tails(lab)
                raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - one part failing must not stop the others
        first = (str(exc).strip().splitlines() or [""])[0]
        rec.setdefault("errors", {})[part] = (first if isinstance(exc, bench.BenchError)
                                              else f"{type(exc).__name__}: {first}")[:300]
    rec.setdefault("wall_s", {})[part] = round(time.monotonic() - started, 1)


def lab_tails(lab: Lab) -> dict[str, str]:
    """The last lines of each node's daemon log, for a failed part's --json record."""
    tails = {}
    for name, node in lab.nodes.items():
        try:
            with open(f"{node.state_dir}/tunnelmesh.log", errors="replace") as f:
                tails[name] = "".join(f.readlines()[-15:])
        except OSError:
            pass
    return tails


def one_round(parts: list[str], seconds: int, n: int, rounds: int) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    jobs: list[tuple[str, Callable[[Lab], None]]] = []
    if "switch" in parts:
        jobs.append(("switch", lambda lab: measure_switches(lab, rec)))
    if "new" in parts:
        jobs.append(("new", lambda lab: measure_new_session(lab, rec)))
    if "tcp" in parts:
        jobs += [(f"tcp-{rung}", lambda lab, rung=rung: measure_throughput(lab, rung, seconds, rec)) for rung in RUNGS]
    for part, measure in jobs:
        bench.log(f"ladder round {n}/{rounds}: {part} ...")
        run_part(part, measure, rec)
        error = rec.get("errors", {}).get(part)
        bench.log(f"ladder round {n}/{rounds}: {part} " + (f"failed: {error}" if error else
                  f"done in {rec['wall_s'][part]:.0f} s"))
    return rec


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.ladderbench", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, metavar="N", help="rounds; medians (default 3)")
    parser.add_argument("--time", type=int, default=10, metavar="T", help="iperf3 seconds per run (default 10)")
    parser.add_argument("--only", default=",".join(PARTS), metavar="LIST",
                        help=f"comma-separated parts to measure (default: {','.join(PARTS)})")
    parser.add_argument("--json", action="store_true", help="print machine-readable results instead of the tables")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1..20")
    if not 1 <= args.time <= 600:
        parser.error("--time must be 1..600")
    chosen = {p.strip() for p in args.only.split(",") if p.strip()}
    if not chosen or chosen - set(PARTS):
        parser.error(f"--only takes a comma-separated list of {', '.join(PARTS)}")
    args.parts = [p for p in PARTS if p in chosen]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("tools.ladderbench creates network namespaces and TUN devices: run it as root", file=sys.stderr)
        return 2
    missing = [t for t in ("iperf3", "ping", "ss", "nft") if find_tool(t) is None]
    if missing:
        print(f"missing {', '.join(missing)}: run tools/setup.sh", file=sys.stderr)
        return 2
    signal.signal(signal.SIGHUP, bench._hangup)
    records: list[dict[str, Any]] = []
    try:
        for n in range(1, args.rounds + 1):
            records.append(one_round(args.parts, args.time, n, args.rounds))
    except KeyboardInterrupt:
        print("\nladderbench: interrupted; labs torn down", file=sys.stderr)
        return 130
    if args.json:
        stats = summarize(records)
        print(json.dumps({
            "rounds": args.rounds, "time_s": args.time, "parts": args.parts, "loss_pct": LOSS_PCT,
            "targets_s": {key: target for key, _, target in TIMINGS}, "min_ratio": MIN_RATIO,
            "medians": {key: s["median"] for key, s in stats.items()},
            "ratios": {rung: {"clean": bench.ratio(stats.get(tcp_key(rung, False), {}).get("median"),
                                                   stats.get(tcp_key("udp", False), {}).get("median")),
                              "loss": bench.ratio(stats.get(tcp_key(rung, True), {}).get("median"),
                                                  stats.get(tcp_key("udp", True), {}).get("median"))}
                       for rung in RUNGS[1:]},
            "raw": records,
        }, indent=2))
    else:
        print(report(records, args.time))
    return 1 if any(rec.get("errors") for rec in records) else 0


if __name__ == "__main__":
    sys.exit(main())
