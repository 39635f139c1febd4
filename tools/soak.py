"""Soak: a five-node mesh under churn for a long time; lost pings, RSS and fds over time.

    python -m tools.soak [--minutes 10] [--json PATH] [--churn-gap 20] [--sample-every 10]

The network is built as a user would (tools.mesh.build_network) in network namespaces:
a standalone coordinator `coord` (`tunnelmesh coordinator`) and five members `a`..`e`
(`a` is the admin) on one switch, plus a sixth namespace `f` that joins and leaves.
Throughout the run an in-tunnel kernel ping (`ping -D -O -i 1`) runs between every pair
of `a`..`e` (ten pairs, one ping per second each), and every --sample-every seconds the
VmRSS and open fd count of every daemon and of the coordinator are read from /proc.

Churn, one action at a time, --churn-gap seconds apart, in this cycle:

daemon        `tunnelmesh down` then `up` on one of a..e (in turn); its pairs are disturbed
coordinator   the standalone coordinator stopped (SIGTERM) and started again on the same
              database; no pair is disturbed: tunnels must not need the coordinator
join          f joins with a fresh invite (after a revocation: its same key) and `up`s,
              or only `up`s again after a leave; it must ping a within 30 s
leave         `tunnelmesh down` on f
rung-udp      UDP cut between one pair (tools.mesh.block_path) until both sides are on
              SSH, then lifted until both are back on UDP; that pair is disturbed
revoke        the admin revokes f (joined first if it is not running); a..e must drop
              it and f's daemon stop by itself
rung-udp-tcp  the same with TCP cut too (down to the relay) before the lift

Daemon and coordinator restarts happen only in the first --restarts-until fraction of the
run (default half), so the rest of the run shows each process's curve from one pid.

Lost pings on a pair while an action disturbs it (plus --grace seconds either side) are
expected and counted apart from losses on undisturbed pairs. The verdict per process
compares the median of the first quarter of its samples with the median of the last
quarter, over the samples of its last pid (the whole run unless it was restarted): flat
when RSS grew at most --rss-bound MiB and fds at most --fd-bound, else growing.

Exit status: 0 when the verdict is flat and every action succeeded, 1 otherwise, 2 for
bad usage, 130 when interrupted (the report so far is still written). The lab is torn
down however the run ends (Ctrl-C, SIGTERM, SIGHUP included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tools import bench
from tools.lab import Lab, Node, find_tool
from tools.mesh import COORDINATOR_PORT, MeshNode, block_path, build_network, rung_of, wait_for_handshakes

# ---------------------------------------------------------------------------------------
# Pure part: ping logs, loss classification, growth and verdict, the table.
# (tests/unit/test_soak_report.py)

CORE = ("a", "b", "c", "d", "e")
COORDINATOR = "coord"
JOINER = "f"
CYCLE = ("daemon", "coordinator", "join", "leave", "rung-udp", "join", "revoke", "rung-udp-tcp")
RESTARTS = ("daemon", "coordinator")
KIB_PER_MIB = 1024


def pair_key(x: str, y: str) -> str:
    return "-".join(sorted((x, y)))


PAIRS = tuple(pair_key(x, y) for x, y in itertools.combinations(CORE, 2))

_STAMP = r"^\[(\d+(?:\.\d+)?)\] "
_REPLY = re.compile(_STAMP + r"\d+ bytes from .*?icmp_seq=(\d+) .*?time=([\d.]+) ms", re.MULTILINE)
_NO_ANSWER = re.compile(_STAMP + r"no answer yet for icmp_seq=(\d+)", re.MULTILINE)
_ERROR = re.compile(_STAMP + r"From .*?icmp_seq=(\d+)", re.MULTILINE)


@dataclass
class PingLog:
    """What one `ping -D -O -i <interval>` log says: which echo requests were answered,
    and when each was sent (wall clock)."""

    sent_at: dict[int, float] = field(default_factory=dict)  # seq -> send time (estimated for gaps)
    answered: set[int] = field(default_factory=set)

    def lost(self, until: float) -> list[float]:
        """Send times of the unanswered requests sent at or before `until` (later ones may
        still be in flight)."""
        return sorted(t for seq, t in self.sent_at.items() if seq not in self.answered and t <= until)

    def sent(self, until: float) -> int:
        return sum(1 for t in self.sent_at.values() if t <= until)


def parse_ping_log(text: str, interval: float) -> PingLog:
    """A `ping -D -O` log: replies give exact send times (arrival - RTT), "no answer yet"
    lines come one interval after the send; sequence numbers with no line at all (a send
    that failed) are placed by the nearest known one, `interval` apart."""
    log = PingLog()
    anchors: dict[int, float] = {}
    for m in _REPLY.finditer(text):
        seq = int(m.group(2))
        log.answered.add(seq)
        anchors[seq] = float(m.group(1)) - float(m.group(3)) / 1000
    for pattern, offset in ((_NO_ANSWER, interval), (_ERROR, 0.0)):
        for m in pattern.finditer(text):
            anchors.setdefault(int(m.group(2)), float(m.group(1)) - offset)
    if not anchors:
        return log
    known = sorted(anchors)
    for seq in range(1, known[-1] + 1):
        if seq in anchors:
            log.sent_at[seq] = anchors[seq]
        else:
            nearest = min(known, key=lambda k: abs(k - seq))
            log.sent_at[seq] = anchors[nearest] + (seq - nearest) * interval
    return log


def disturbed(pair: str, at: float, windows: list[dict[str, Any]], grace: float) -> bool:
    """Whether `pair` was being disturbed at `at`: some window names it and `at` lies
    within [start - grace, end + grace]."""
    return any(pair in w["pairs"] and w["start"] - grace <= at <= w["end"] + grace for w in windows)


def classify_losses(lost: dict[str, list[float]], windows: list[dict[str, Any]], grace: float,
                    until: float | None = None) -> dict[str, Any]:
    """Lost pings (pair -> send times, seconds from the start) split into disturbed and
    undisturbed, counting only those sent at or before `until` (all when None)."""
    out: dict[str, Any] = {"disturbed": 0, "undisturbed": 0, "undisturbed_by_pair": {}}
    for pair, times in lost.items():
        for at in times:
            if until is not None and at > until:
                continue
            if disturbed(pair, at, windows, grace):
                out["disturbed"] += 1
            else:
                out["undisturbed"] += 1
                out["undisturbed_by_pair"][pair] = out["undisturbed_by_pair"].get(pair, 0) + 1
    return out


def growth(samples: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """How process `name` grew: over the samples of its last pid, median of the last
    quarter minus median of the first quarter, for RSS (KiB) and fds; also its first and
    last values over the whole run. judged is False with fewer than 4 samples of that pid."""
    series = [(s["t"], s["procs"][name]) for s in samples
              if s["procs"].get(name) and s["procs"][name].get("rss_kib") is not None]
    out: dict[str, Any] = {"pids": len({p["pid"] for _, p in series}), "judged": False}
    if not series:
        return out
    out.update(first={"t": series[0][0], "rss_kib": series[0][1]["rss_kib"], "fds": series[0][1]["fds"]},
               last={"t": series[-1][0], "rss_kib": series[-1][1]["rss_kib"], "fds": series[-1][1]["fds"]})
    last_pid = series[-1][1]["pid"]
    segment = [(t, p) for t, p in series if p["pid"] == last_pid]
    out["segment_from_t"] = segment[0][0]
    quarter = len(segment) // 4
    if quarter < 1:
        return out
    head, tail = segment[:quarter], segment[-quarter:]
    for key in ("rss_kib", "fds"):
        out[f"{key}_growth"] = statistics.median(p[key] for _, p in tail) - statistics.median(p[key] for _, p in head)
    out["judged"] = True
    return out


def verdict(growths: dict[str, dict[str, Any]], rss_bound_mib: float, fd_bound: int) -> tuple[str, list[str]]:
    """("flat" | "growing" | "too short", the processes over a bound)."""
    judged = {name: g for name, g in growths.items() if g["judged"]}
    over = [name for name, g in judged.items()
            if g["rss_kib_growth"] > rss_bound_mib * KIB_PER_MIB or g["fds_growth"] > fd_bound]
    if over:
        return "growing", over
    return ("flat" if judged else "too short"), []


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The summary of a report: losses by class, growth and verdict per process, actions."""
    config = report["config"]
    lost = {pair: p["lost_at"] for pair, p in report["pairs"].items()}
    losses = classify_losses(lost, report["events"], config["grace_s"])
    losses["sent"] = sum(p["sent"] for p in report["pairs"].values())
    growths = {name: growth(report["samples"], name) for name in report["processes"]}
    word, over = verdict(growths, config["rss_bound_mib"], config["fd_bound"])
    kinds: dict[str, dict[str, int]] = {}
    for event in report["events"]:
        entry = kinds.setdefault(event["kind"], {"done": 0, "failed": 0})
        entry["done" if event["ok"] else "failed"] += 1
    return {"lost": losses, "processes": growths, "verdict": word, "growing": over, "actions": kinds,
            "failed_actions": [f"{e['kind']} at {e['start']:.0f} s: {e['error']}" for e in report["events"] if not e["ok"]]}


def _cell(proc: dict[str, Any] | None) -> str:
    if not proc or proc.get("rss_kib") is None:
        return "-"
    return f"{proc['rss_kib'] / KIB_PER_MIB:.1f}/{proc['fds']}"


def render(report: dict[str, Any], summary: dict[str, Any]) -> str:
    """The human report: one row per sample (time, lost pings so far, RSS MiB/fds per
    process), the actions and the verdict."""
    config = report["config"]
    lost = {pair: p["lost_at"] for pair, p in report["pairs"].items()}
    names = report["processes"]
    rows = [["t (s)", "lost undist.", "lost dist.", *(f"{n} MiB/fds" for n in names)]]
    for sample in report["samples"]:
        so_far = classify_losses(lost, report["events"], config["grace_s"], until=sample["t"])
        rows.append([f"{sample['t']:.0f}", str(so_far["undisturbed"]), str(so_far["disturbed"]),
                     *(_cell(sample["procs"].get(n)) for n in names)])
    widths = [max(map(len, column)) for column in zip(*rows)]
    lines = [f"soak: {report['duration_s'] / 60:.1f} min{' (interrupted)' if report.get('interrupted') else ''}, "
             f"{len(CORE)} nodes + coordinator, {len(PAIRS)} pairs pinging every {config['ping_interval_s']:g} s", ""]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    losses = summary["lost"]
    lines += ["", "actions: " + ", ".join(f"{kind} {n['done']}" + (f" ({n['failed']} FAILED)" if n["failed"] else "")
                                          for kind, n in summary["actions"].items())]
    lines += [f"  {failure}" for failure in summary["failed_actions"]]
    lines += [f"pings: {losses['sent']} sent, {losses['disturbed']} lost on disturbed pairs (expected), "
              f"{losses['undisturbed']} lost on undisturbed pairs"
              + (f" {losses['undisturbed_by_pair']}" if losses["undisturbed_by_pair"] else "")]
    lines.append(f"growth, first quarter -> last quarter (bounds {config['rss_bound_mib']:g} MiB, {config['fd_bound']} fds):")
    for name, g in summary["processes"].items():
        if not g.get("first"):
            lines.append(f"  {name:6} no samples")
            continue
        span = (f"RSS {g['first']['rss_kib'] / KIB_PER_MIB:.1f} -> {g['last']['rss_kib'] / KIB_PER_MIB:.1f} MiB, "
                f"fds {g['first']['fds']} -> {g['last']['fds']}")
        judged = (f"growth {g['rss_kib_growth'] / KIB_PER_MIB:+.2f} MiB, {g['fds_growth']:+g} fds"
                  if g["judged"] else "too few samples to judge")
        restarted = f" (last of {g['pids']} pids, from {g['segment_from_t']:.0f} s)" if g["pids"] > 1 else ""
        lines.append(f"  {name:6} {span}; {judged}{restarted}")
    lines.append(f"verdict: {summary['verdict']}" + (f" ({', '.join(summary['growing'])})" if summary["growing"] else ""))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The lab part.

ACTION_TIMEOUT = 30.0  # each wait inside an action
BACK_TO_UDP_TIMEOUT = 60.0  # a lifted cut: a probe of the better rung every 20 s, then the hold
PING_MARGIN_S = 600  # `ping -w`: no pinger outlives the run by more than this even if teardown were missed
POLL = 0.5


@dataclass
class Options:
    minutes: float = 10.0
    churn_gap_s: float = 20.0
    sample_every_s: float = 10.0
    restarts_until: float = 0.5
    grace_s: float = 5.0
    rss_bound_mib: float = 5.0
    fd_bound: int = 10
    ping_interval_s: float = 1.0


class ActionFailed(RuntimeError):
    pass


def action_error(exc: Exception) -> str:
    """One line for a failed action: what failed and, for a command, the end of what it
    printed to stderr (the daemon's own reason: `up` quotes its log), so a failure seen
    once in a long run can be understood from the report alone."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    stderr = (getattr(exc, "stderr", None) or "").strip()
    lines = [line.strip() for line in stderr.splitlines()[-6:]]
    return f"{first}; stderr: {' | '.join(lines)[-900:]}" if stderr else first


def wait_for(what: str, check: Callable[[], bool], timeout: float = ACTION_TIMEOUT) -> float:
    """Poll check() until true (bounded); the seconds it took. ActionFailed on timeout."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started >= timeout:
            raise ActionFailed(f"{what}: not within {timeout:g} s")
        time.sleep(POLL)
    return time.monotonic() - started


def proc_sample(pid: int | None) -> dict[str, Any] | None:
    """{pid, rss_kib, fds} of a live process from /proc; None when it is not running."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return {"pid": pid, "rss_kib": rss, "fds": fds}


def daemon_pid(member: MeshNode) -> int | None:
    try:
        return int(Path(member.node.state_dir, "tunnelmesh.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def pings(member: MeshNode, address: str) -> bool:
    return member.node.run("ping", "-n", "-c", "1", "-W", "1", address, check=False, timeout=10).returncode == 0


class Soak:
    """One run: the mesh, the pingers, the sampler thread and the churn actions."""

    def __init__(self, lab: Lab, options: Options):
        self.lab = lab
        self.options = options
        self.started = 0.0  # wall clock; times in the report are seconds from it
        self.samples: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.pingers: dict[str, list[tuple[Node, str, subprocess.Popen]]] = {}
        self.stop = threading.Event()
        self.cycle = itertools.cycle(CYCLE)
        self.turn = {"daemon": itertools.cycle(CORE), "rung": itertools.cycle(PAIRS)}
        self.joiner_state = "new"  # new | up | down (a member, not running) | revoked
        self.coordinator_proc: subprocess.Popen | None = None
        self.actions: dict[str, Callable[[str, dict[str, Any]], None]] = {
            "daemon": self.do_daemon, "coordinator": self.do_coordinator, "join": self.do_join,
            "revoke": self.do_revoke, "rung-udp": self.do_rung, "rung-udp-tcp": self.do_rung, "leave": self.do_leave}

    # -- setup

    def build(self) -> None:
        switch = self.lab.add_switch("sw")
        self.coordinator = self.lab.add_node(COORDINATOR)
        self.lab.connect(self.coordinator, switch)
        self.start_coordinator()
        self.mesh = build_network(self.lab, list(CORE), switch=switch, coordinator=self.coordinator)
        wait_for_handshakes(self.mesh, timeout=60)
        node = self.lab.add_node(JOINER)
        self.joiner = MeshNode(node, self.lab.connect(node, switch), "")

    def start_coordinator(self) -> None:
        node = self.coordinator
        self.coordinator_proc = node.popen(sys.executable, "-m", "tunnelmesh", "coordinator", "--listen",
                                           f"{node.addresses[0]}:{COORDINATOR_PORT}",
                                           "--db", f"{node.state_dir}/coordinator.db", log_name="coordinator")
        probe = f"import socket; socket.create_connection(('{node.addresses[0]}', {COORDINATOR_PORT}), timeout=1)"
        proc = self.coordinator_proc
        wait_for("the coordinator listens", lambda: proc.poll() is not None
                 or node.run("python3", "-c", probe, check=False).returncode == 0, 20)
        if proc.poll() is not None:
            raise ActionFailed(f"the coordinator exited: {node.log('coordinator')[-2000:]}")

    def start_pinger(self, pair: str) -> None:
        x, y = pair.split("-")
        runs = self.pingers.setdefault(pair, [])
        deadline = int(self.options.minutes * 60 + PING_MARGIN_S)
        name = f"ping-{pair}-{len(runs) + 1}"
        node = self.mesh[x].node
        proc = node.popen("ping", "-n", "-D", "-O", "-i", f"{self.options.ping_interval_s:g}", "-W", "1",
                          "-w", str(deadline), self.mesh[y].mesh_ip, log_name=name)
        runs.append((node, name, proc))

    # -- the sampler thread

    def sample(self) -> None:
        procs = {name: proc_sample(daemon_pid(member)) for name, member in self.mesh.items()}
        coordinator = self.coordinator_proc
        procs[COORDINATOR] = proc_sample(coordinator.pid if coordinator and coordinator.poll() is None else None)
        self.samples.append({"t": round(time.time() - self.started, 1), "procs": procs})
        for pair, runs in self.pingers.items():
            if runs[-1][2].poll() is not None:  # a pinger that gave up is started again
                self.start_pinger(pair)

    def sampler(self) -> None:
        while not self.stop.wait(self.options.sample_every_s):
            self.sample()

    # -- churn

    def act(self, kind: str) -> None:
        """Run one action and record it as an event with the pairs it disturbs."""
        event: dict[str, Any] = {"kind": kind, "start": time.time() - self.started, "pairs": [], "ok": True,
                                 "error": None, "detail": {}}
        bench.log(f"soak {event['start']:6.0f} s: {kind} ...")
        try:
            self.actions[kind](kind, event)
        except Exception as exc:  # noqa: BLE001 - a failed action is recorded and the soak goes on
            event["ok"] = False
            event["error"] = action_error(exc)
            bench.log(f"soak: {kind} failed: {event['error']}")
        except KeyboardInterrupt:
            event["ok"], event["error"] = False, "interrupted"
            raise
        finally:  # an interrupted action still marks the pairs it was disturbing
            event["end"] = time.time() - self.started
            self.events.append(event)

    def do_daemon(self, kind: str, event: dict[str, Any]) -> None:
        victim = self.mesh[next(self.turn["daemon"])]
        event["detail"]["node"] = victim.name
        event["pairs"] = [p for p in PAIRS if victim.name in p.split("-")]
        victim.down()
        victim.up()
        others = [m for m in self.mesh.values() if m is not victim]
        event["detail"]["all_pairs_ping_s"] = round(wait_for(
            f"{victim.name} pings every other node after `up`",
            lambda: all(pings(victim, m.mesh_ip) for m in others)), 1)

    def do_coordinator(self, kind: str, event: dict[str, Any]) -> None:
        assert self.coordinator_proc is not None
        self.coordinator_proc.terminate()
        try:
            self.coordinator_proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.coordinator_proc.kill()
            self.coordinator_proc.wait(timeout=10)
        self.start_coordinator()
        event["detail"]["reconnected_s"] = round(wait_for(
            "every node reconnects to the coordinator",
            lambda: all(m.status()["node"]["coordinator"]["state"] == "connected" for m in self.mesh.values()), 60), 1)

    def do_join(self, kind: str, event: dict[str, Any]) -> None:
        f, admin = self.joiner, self.mesh[CORE[0]]
        event["detail"]["from"] = self.joiner_state
        if self.joiner_state in ("new", "revoked"):
            key = (["--new-key"] if self.joiner_state == "new"
                   else ["--key", f"{f.node.state_dir}/identity_ed25519"])
            f.tm("join", admin.tm("invite").stdout.strip(), "--name", JOINER, *key)
            with open(f"{f.node.state_dir}/network.json") as fh:
                f.mesh_ip = json.load(fh)["member"]["body"]["ipv4"]
        if self.joiner_state != "up":
            f.up()
            self.joiner_state = "up"
        event["detail"]["pings_a_s"] = round(wait_for("f pings a", lambda: pings(f, admin.mesh_ip)), 1)

    def do_leave(self, kind: str, event: dict[str, Any]) -> None:
        if self.joiner_state != "up":
            self.do_join(kind, event)
        self.joiner.down()
        self.joiner_state = "down"

    def do_revoke(self, kind: str, event: dict[str, Any]) -> None:
        if self.joiner_state != "up":
            self.do_join(kind, event)
        f = self.joiner
        self.mesh[CORE[0]].tm("revoke", JOINER)
        self.joiner_state = "revoked"
        event["detail"]["dropped_s"] = round(wait_for(
            "a..e drop f", lambda: all(JOINER not in {p["name"] for p in m.status()["peers"]}
                                       for m in self.mesh.values())), 1)
        event["detail"]["f_stopped_s"] = round(wait_for(
            "f's daemon stops by itself", lambda: f.tm("status", check=False).returncode != 0), 1)

    def do_rung(self, kind: str, event: dict[str, Any]) -> None:
        pair = next(self.turn["rung"])
        x, y = (self.mesh[n] for n in pair.split("-"))
        event["pairs"] = [pair]
        event["detail"]["pair"] = pair

        def both_on(rung: str) -> Callable[[], bool]:
            return lambda: rung_of(x, y.name) == rung and rung_of(y, x.name) == rung

        try:
            block_path(x, y, udp=True)
            event["detail"]["ssh_s"] = round(wait_for(f"{pair} on ssh", both_on("ssh")), 1)
            if kind == "rung-udp-tcp":
                block_path(x, y, udp=True, tcp=True)
                event["detail"]["relay_s"] = round(wait_for(f"{pair} on relay", both_on("relay")), 1)
        finally:
            block_path(x, y)
        event["detail"]["udp_back_s"] = round(wait_for(f"{pair} back on udp", both_on("udp"), BACK_TO_UDP_TIMEOUT), 1)

    def next_kind(self, elapsed: float, total: float) -> str:
        """The next action of the cycle; restarts are skipped late in the run."""
        for _ in range(len(CYCLE)):
            kind = next(self.cycle)
            if kind not in RESTARTS or elapsed < total * self.options.restarts_until:
                return kind
        raise AssertionError("CYCLE has an action that is not a restart")

    # -- the run

    def run(self) -> dict[str, Any]:
        """Build, soak for the configured time (an action started before the end
        completes), stop the pingers and return the report. Ctrl-C ends the soak early:
        the report says interrupted."""
        total = self.options.minutes * 60
        self.build()
        self.started = time.time()
        for pair in PAIRS:
            self.start_pinger(pair)
        self.sample()
        sampler = threading.Thread(target=self.sampler, name="soak-sampler", daemon=True)
        sampler.start()
        interrupted = False
        try:
            while (elapsed := time.time() - self.started) < total:
                self.act(self.next_kind(elapsed, total))
                time.sleep(max(0.0, min(self.options.churn_gap_s, total - (time.time() - self.started))))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.stop.set()
            sampler.join(timeout=30)
        ended = time.time()
        self.sample()
        for runs in self.pingers.values():
            for _, _, proc in runs:
                proc.terminate()
        return self.report(ended, interrupted)

    def report(self, ended: float, interrupted: bool) -> dict[str, Any]:
        until = ended - self.started - 2 * self.options.ping_interval_s  # the last pings may be in flight
        pairs = {}
        for pair, runs in self.pingers.items():
            lost: list[float] = []
            sent = 0
            for node, name, _ in runs:
                log = parse_ping_log(node.log(name), self.options.ping_interval_s)
                log.sent_at = {seq: t - self.started for seq, t in log.sent_at.items()}
                lost += [round(t, 1) for t in log.lost(until)]
                sent += log.sent(until)
            pairs[pair] = {"sent": sent, "lost_at": sorted(lost)}
        for event in self.events:
            event["start"], event["end"] = round(event["start"], 1), round(event["end"], 1)
        return {
            "config": {"minutes": self.options.minutes, "churn_gap_s": self.options.churn_gap_s,
                       "sample_every_s": self.options.sample_every_s, "restarts_until": self.options.restarts_until,
                       "grace_s": self.options.grace_s, "rss_bound_mib": self.options.rss_bound_mib,
                       "fd_bound": self.options.fd_bound, "ping_interval_s": self.options.ping_interval_s},
            "started_at": self.started, "duration_s": round(ended - self.started, 1), "interrupted": interrupted,
            "processes": [*CORE, COORDINATOR], "samples": self.samples, "events": self.events, "pairs": pairs,
        }


def soak(lab: Lab, options: Options) -> dict[str, Any]:
    """Run a soak in `lab`; the report with its summary under "summary"."""
    report = Soak(lab, options).run()
    report["summary"] = summarize(report)
    return report


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Options()
    parser.add_argument("--minutes", type=float, default=defaults.minutes, help="how long to soak (default 10)")
    parser.add_argument("--json", metavar="PATH", help="also write the whole report as JSON here")
    parser.add_argument("--churn-gap", type=float, default=defaults.churn_gap_s, metavar="S",
                        help="seconds between churn actions (default 20)")
    parser.add_argument("--sample-every", type=float, default=defaults.sample_every_s, metavar="S",
                        help="seconds between RSS/fd samples (default 10)")
    parser.add_argument("--restarts-until", type=float, default=defaults.restarts_until, metavar="FRACTION",
                        help="daemon and coordinator restarts only in this first part of the run (default 0.5)")
    parser.add_argument("--grace", type=float, default=defaults.grace_s, metavar="S",
                        help="a disturbance window extends this far either side (default 5)")
    parser.add_argument("--rss-bound", type=float, default=defaults.rss_bound_mib, metavar="MIB",
                        help="largest RSS growth still flat (default 5)")
    parser.add_argument("--fd-bound", type=int, default=defaults.fd_bound, metavar="N",
                        help="largest fd growth still flat (default 10)")
    args = parser.parse_args(argv)
    if not 0.5 <= args.minutes <= 24 * 60:
        parser.error("--minutes must be 0.5..1440")
    if not 0 <= args.churn_gap <= 3600 or not 1 <= args.sample_every <= 600:
        parser.error("--churn-gap must be 0..3600 and --sample-every 1..600")
    if not 0 <= args.restarts_until <= 1 or args.grace < 0 or args.rss_bound < 0 or args.fd_bound < 0:
        parser.error("--restarts-until must be 0..1; --grace, --rss-bound and --fd-bound at least 0")
    return args, Options(minutes=args.minutes, churn_gap_s=args.churn_gap, sample_every_s=args.sample_every,
                         restarts_until=args.restarts_until, grace_s=args.grace, rss_bound_mib=args.rss_bound,
                         fd_bound=args.fd_bound)


def main(argv: list[str] | None = None) -> int:
    args, options = parse_args(argv)
    if os.geteuid() != 0:
        print("tools.soak creates network namespaces and TUN devices: run it as root", file=sys.stderr)
        return 2
    missing = [t for t in ("ping", "nft") if find_tool(t) is None]
    if missing:
        print(f"missing {', '.join(missing)}: run tools/setup.sh", file=sys.stderr)
        return 2
    signal.signal(signal.SIGHUP, bench._hangup)
    try:
        with bench.fresh_lab([]) as lab:
            report = soak(lab, options)
    except KeyboardInterrupt:
        print("\nsoak: interrupted while building the mesh; lab torn down", file=sys.stderr)
        return 130
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    summary = report["summary"]
    print(render(report, summary))
    if report["interrupted"]:
        return 130
    return 0 if summary["verdict"] == "flat" and not summary["failed_actions"] else 1


if __name__ == "__main__":
    sys.exit(main())
