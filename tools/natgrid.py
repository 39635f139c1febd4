"""The NAT grid: for each pair of NAT types, two nodes behind two routers connect; which
rung do they end on, and how long from `up` to a direct UDP path?

    sudo .venv/bin/python -m tools.natgrid [--types T ...] [--runs 3] [--json OUT]
                                           [--markdown [OUT]] [--window 60] [--batch 14]

Each cell (type A x type B, every type against every other and itself) is its own
network: a standalone coordinator (tools.mesh.build_nat_network, on TCP 443 with its STUN
service on two addresses) and two members behind a router each (tools.natlab). Cells run
`--batch` at a time in one lab: they share nothing but the outside switch and the
machine's cores (their daemons are not members of one another's networks). Once a batch
is built, both members of every cell come `up` together; from then on each pings the
other's mesh address once a second (sessions come up on traffic), and `tunnelmesh status
--json` is read on both sides every `--poll` seconds. A cell is direct when both sides
send over UDP with the session up; the time to direct is measured from the moment both
`up` commands are started together (daemon start-up included) to the later side's move
onto UDP (the path change's own timestamp, or the first handshake when UDP was the first
choice). A cell not direct within `--window` seconds
ends on whatever rung its sides are on then.

Times are medians over `--runs` runs of the runs that went direct; a cell whose runs
ended differently says how many went which way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from tools.lab import Lab
from tools.mesh import MeshNode, build_nat_network
from tools.natlab import NAT_TYPES, NatLab

NO_UDP = ("udp-blocked", "tcp-web-only")
WINDOW = 60.0  # s from both `up` a cell may take to go direct
POLL = 2.0  # s between two reads of a cell's status
# Cells at once. The whole grid (28: 84 daemons, about 5 GB) fits, but on 2 cores the
# start-up of so many daemons stretches the times to direct; half of it keeps them honest.
BATCH = 14
BUILD_WORKERS = 4  # cells built at once (mostly waiting on `tunnelmesh` commands)
STATUS_WORKERS = 4  # status reads at once


def cells(types: Iterable[str]) -> list[tuple[str, str]]:
    """Every unordered pair of the types, each type with itself too, in the given order."""
    ordered = list(dict.fromkeys(types))
    return [(a, b) for i, a in enumerate(ordered) for b in ordered[i:]]


def expected_rungs(a: str, b: str) -> frozenset[str]:
    """Issue 18's expectation: direct UDP for every pair with at least one side neither
    symmetric nor without UDP; SSH or relay where no UDP goes out on one side, and
    between two symmetric NATs (each maps a random port of the whole range per flow, and
    a hard side does not spray: neither can guess the other's mapping)."""
    if a in NO_UDP or b in NO_UDP or a == b == "symmetric":
        return frozenset({"ssh", "relay"})
    return frozenset({"udp"})


@dataclass
class Side:
    rung: str | None  # None: no path yet
    state: str
    endpoint: str | None
    why_not_better: str | None
    direct_at: float | None  # Unix time it went onto UDP (the path in use), if it is there


@dataclass
class CellRun:
    a: str
    b: str
    rung: str  # both sides' rung, "a-rung/b-rung" when they differ, "none" without a path
    seconds: float | None  # from both `up` to direct on both sides; None: not direct
    sides: dict[str, Side]


def _side(member: MeshNode, peer: str, polled_at: float) -> Side:
    proc = member.tm("status", "--json", check=False, timeout=20)
    try:
        status = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return Side(None, f"status failed: {proc.stderr.strip()[-200:]}", None, None, None)
    found = next((p for p in status.get("peers", []) if p["name"] == peer), None)
    if found is None or found["path"] is None:
        return Side(None, found["state"] if found else "unknown peer", None, None, None)
    rung, direct_at = found["path"]["rung"], None
    if rung == "udp" and found["state"] == "up":
        moves = [t["at"] for t in found["transitions"] if t["path"]["rung"] == "udp"]
        if moves:
            direct_at = moves[-1]
        elif found["handshakes"] <= 1 and found["last_handshake"]:
            direct_at = found["last_handshake"]  # UDP was the first choice: its first handshake
        else:
            direct_at = polled_at
    return Side(rung, found["state"], found["path"]["endpoint"], found["why_not_better"], direct_at)


class _Cell:
    def __init__(self, index: int, a: str, b: str, nat: NatLab):
        self.a, self.b = a, b
        self.names = (f"g{index}a", f"g{index}b")
        network = build_nat_network(nat, {self.names[0]: a, self.names[1]: b}, coordinator_name=f"g{index}c",
                                    start=False)
        self.members = [network.mesh[name] for name in self.names]
        self.started = 0.0
        self.sides: dict[str, Side] = {}
        self.result: CellRun | None = None

    def start(self, window: float) -> None:
        self.members[0].down()  # the admin ran to countersign the other's join: both start afresh
        self.started = time.time()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(MeshNode.up, self.members))
        for member, other in (self.members, self.members[::-1]):
            member.node.popen("ping", "-n", "-q", "-i", "1", "-W", "1", "-w", str(int(window) + 5), other.mesh_ip,
                              log_name="grid-ping")

    def poll(self, deadline_passed: bool) -> None:
        now = time.time()
        (a, b), names = self.members, self.names
        self.sides = {names[0]: _side(a, names[1], now), names[1]: _side(b, names[0], now)}
        direct = [s.direct_at for s in self.sides.values() if s.direct_at is not None]
        if len(direct) == 2:
            self.result = CellRun(self.a, self.b, "udp", round(max(direct) - self.started, 2), self.sides)
        elif deadline_passed:
            rungs = [s.rung or "none" for s in self.sides.values()]
            self.result = CellRun(self.a, self.b, rungs[0] if rungs[0] == rungs[1] else "/".join(rungs), None,
                                  self.sides)


def run_batch(pairs: list[tuple[str, str]], lab: Lab, window: float = WINDOW, poll: float = POLL) -> list[CellRun]:
    """Build every cell of `pairs` in `lab`, start them together, watch until each is
    direct or `window` has passed."""
    nat = NatLab(lab)
    with ThreadPoolExecutor(BUILD_WORKERS) as pool:
        grid = list(pool.map(lambda job: _Cell(job[0], *job[1], nat), enumerate(pairs)))
        list(pool.map(lambda cell: cell.start(window), grid))
    with ThreadPoolExecutor(STATUS_WORKERS) as pool:
        while pending := [cell for cell in grid if cell.result is None]:
            round_started = time.monotonic()
            list(pool.map(lambda cell: cell.poll(time.time() >= cell.started + window), pending))
            time.sleep(max(0.0, poll - (time.monotonic() - round_started)))
    return [cell.result for cell in grid if cell.result is not None]


def run_grid(types: Iterable[str] = NAT_TYPES, runs: int = 3, batch: int = BATCH, window: float = WINDOW,
             poll: float = POLL, make_lab: Callable[[], Lab] = Lab,
             progress: Callable[[str], None] = lambda line: None) -> dict[tuple[str, str], list[CellRun]]:
    """Every cell `runs` times, `batch` cells per lab; a fresh lab per batch (removed after)."""
    pairs = cells(types)
    results: dict[tuple[str, str], list[CellRun]] = {pair: [] for pair in pairs}
    for run in range(runs):
        for start in range(0, len(pairs), batch):
            chunk = pairs[start:start + batch]
            began = time.monotonic()
            lab = make_lab()
            try:
                for result in run_batch(chunk, lab, window, poll):
                    results[(result.a, result.b)].append(result)
            finally:
                lab.cleanup()
            progress(f"run {run + 1}/{runs}, cells {start + 1}-{start + len(chunk)} of {len(pairs)}: "
                     f"{time.monotonic() - began:.0f} s")
    return results


def summary(runs: list[CellRun]) -> tuple[str, float | None]:
    """The rung most runs ended on (with "k/n" when they differ) and the median time to
    direct of the runs that went direct."""
    counts = Counter(run.rung for run in runs)
    rung, count = counts.most_common(1)[0]
    times = [run.seconds for run in runs if run.seconds is not None]
    return (rung if count == len(runs) else f"{rung} ({count}/{len(runs)})",
            statistics.median(times) if times else None)


def _cell_text(runs: list[CellRun]) -> str:
    rung, seconds = summary(runs)
    return f"{rung} {seconds:.1f} s" if seconds is not None and rung.startswith("udp") else rung


def table(results: dict[tuple[str, str], list[CellRun]], markdown: bool = False) -> str:
    """The grid as text (or a Markdown table): rung and median seconds to direct."""
    types = list(dict.fromkeys(t for pair in results for t in pair))
    text = {(a, b): _cell_text(runs) for (a, b), runs in results.items() if runs}
    text |= {(b, a): value for (a, b), value in text.items()}
    rows = [["", *types], *[[a, *(text.get((a, b), "-") for b in types)] for a in types]]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join([lines[0], "|" + "---|" * len(rows[0]), *lines[1:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def to_json(results: dict[tuple[str, str], list[CellRun]], **meta: Any) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for (a, b), runs in results.items():
        rung, seconds = summary(runs) if runs else ("-", None)
        out.append({"a": a, "b": b, "rung": rung, "median_seconds": seconds,
                    "expected": sorted(expected_rungs(a, b)), "runs": [asdict(run) for run in runs]})
    return {**meta, "cells": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.natgrid", description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", choices=NAT_TYPES, default=list(NAT_TYPES), metavar="TYPE",
                        help=f"NAT types to pair (default: all of {', '.join(NAT_TYPES)})")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (default 3; times are medians)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"cells built and run at once (default {BATCH})")
    parser.add_argument("--window", type=float, default=WINDOW,
                        help=f"seconds from `up` a cell may take to go direct (default {WINDOW:g})")
    parser.add_argument("--poll", type=float, default=POLL, help=f"seconds between status reads (default {POLL:g})")
    parser.add_argument("--json", metavar="OUT", help="write every run of every cell as JSON")
    parser.add_argument("--markdown", nargs="?", const="-", metavar="OUT",
                        help="print (or write to OUT) the grid as the README's Markdown table")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.batch < 1 or args.window <= 0 or args.poll <= 0:
        parser.error("--runs and --batch must be at least 1, --window and --poll positive")
    began = time.monotonic()
    results = run_grid(args.types, args.runs, args.batch, args.window, args.poll,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(results))
    print(f"\n{len(results)} cells x {args.runs} runs in {time.monotonic() - began:.0f} s", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(results, runs=args.runs, window=args.window, batch=args.batch), f, indent=2)
    if args.markdown:
        caption = (f"\n\nGenerated by `python -m tools.natgrid --runs {args.runs}`: the rung each pair ends on, "
                   f"and the median seconds from `up` to a direct UDP path.\n")
        markdown = table(results, markdown=True) + caption
        if args.markdown == "-":
            print("\n" + markdown)
        else:
            with open(args.markdown, "w") as f:
                f.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
