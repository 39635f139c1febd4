"""tools.coordsim's figures: parsing its command line lists and the coordinator's metrics,
summing up the change latencies, the printed table, the JSON document and the chart
(matplotlib, Agg backend). Pure functions, apart from `draw` writing its PNG.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from tools.benchchart import panel_grid
from tools.benchreport import percentile

BACKENDS = ("sqlite", "postgresql")
COORDINATOR_COUNTS = (1, 2)
#: The table's columns: (title, run key, format). A missing figure prints as "-".
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("N", "nodes", "d"),
    ("backend", "backend", "s"),
    ("coords", "coordinators", "d"),
    ("joined/seeded", "joined_seeded", "s"),
    ("joins/s", "joins_per_s", ".1f"),
    ("change p50 s", "change_p50_s", ".3f"),
    ("p99 s", "change_p99_s", ".3f"),
    ("to-all s", "time_to_all_s", ".3f"),
    ("worst s", "time_to_all_worst_s", ".3f"),
    ("coord CPU s", "coordinator_cpu_s", ".1f"),
    ("db CPU s", "database_cpu_s", ".1f"),
    ("KiB/node", "kib_per_node", ".1f"),
)


def parse_counts(text: str) -> list[int]:
    """"100,1000,10000" (or "1e4") -> [100, 1000, 10000]; ValueError for anything but
    positive whole numbers."""
    counts = []
    for item in text.split(","):
        item = item.strip()
        try:
            number = float(item)
        except ValueError:
            raise ValueError(f"{item!r} is not a number of nodes") from None
        if number != int(number) or number < 1:
            raise ValueError(f"{item!r}: a number of nodes is a whole number of at least 1")
        counts.append(int(number))
    return counts


def parse_choices(text: str, allowed: tuple[Any, ...]) -> list[Any]:
    """A comma-separated list, each item one of `allowed` (compared as text), in the given
    order without repeats; ValueError naming what is allowed otherwise."""
    by_text = {str(choice): choice for choice in allowed}
    chosen: list[Any] = []
    for item in (part.strip() for part in text.split(",")):
        if item not in by_text:
            raise ValueError(f"{item!r} is not one of {', '.join(by_text)}")
        if by_text[item] not in chosen:
            chosen.append(by_text[item])
    return chosen


def plan(nodes: list[int], backends: list[str], coordinators: list[int]) -> list[tuple[int, str, int]]:
    """The runs, as (nodes, backend, coordinators): SQLite has one coordinator by design,
    so a count above 1 is run on PostgreSQL only. Smallest N first (a larger one may not fit)."""
    return [(n, backend, count) for n in sorted(set(nodes)) for backend in backends for count in coordinators
            if backend != "sqlite" or count == 1]


def metric_value(text: str, name: str) -> float | None:
    """A sample's value from Prometheus' text format (the first unlabelled sample of
    `name`), None when absent."""
    found = re.search(rf"^{re.escape(name)}(?:\{{\}})? ([0-9.eE+-]+|NaN)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def proc_stat_times(text: str, ticks_per_s: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) in seconds from a /proc/<pid>/stat line: the
    process's own CPU and that of its children it has reaped (fields 14 to 17)."""
    rest = text[text.rindex(")") + 2:].split()  # from field 3, "state"
    return (int(rest[11]) + int(rest[12])) / ticks_per_s, (int(rest[13]) + int(rest[14])) / ticks_per_s


def parent_of(text: str) -> int:
    """The parent pid (field 4) of a /proc/<pid>/stat line."""
    return int(text[text.rindex(")") + 2:].split()[1])


def change_latencies(answers: list[list[tuple[float, int]]], started: float, old_version: int
                     ) -> tuple[list[float], int]:
    """Per node, the seconds from `started` to its first long-poll answer at or after it
    with a version above `old_version`; and how many nodes had no such answer."""
    latencies, missing = [], 0
    for node_answers in answers:
        times = [t for t, version in node_answers if version > old_version and t >= started]
        if times:
            latencies.append(min(times) - started)
        else:
            missing += 1
    return latencies, missing


def change_summary(latencies: list[float], missing: int) -> dict[str, Any]:
    """One change: p50, p99, the slowest node, and the time until every node had it
    (None if some never did)."""
    return {"reached": len(latencies), "missing": missing, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "max_s": max(latencies) if latencies else None,
            "time_to_all_s": max(latencies) if latencies and not missing else None}


def changes_summary(changes: list[dict[str, Any]], latencies: list[float]) -> dict[str, Any]:
    """Several changes: p50 and p99 over every node's latency of every change, the median
    time-to-all over the changes and the worst one (None if a change never reached all)."""
    to_all = [c["time_to_all_s"] for c in changes]
    complete = bool(to_all) and all(t is not None for t in to_all)
    return {"change_p50_s": percentile(latencies, 50), "change_p99_s": percentile(latencies, 99),
            "time_to_all_s": statistics.median(to_all) if complete else None,
            "time_to_all_worst_s": max(to_all) if complete else None}


def per_node_kib(before_kib: float | None, connected_kib: float | None, nodes: int) -> float | None:
    """Resident memory the coordinators grew by per connected node."""
    if before_kib is None or connected_kib is None or nodes < 1:
        return None
    return (connected_kib - before_kib) / nodes


def cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt)


def format_table(runs: list[dict[str, Any]]) -> str:
    """The runs as an aligned text table, one line each; a failed run says why below it."""
    rows = [[title for title, _, _ in COLUMNS]]
    notes = []
    for run in runs:
        row = dict(run, joined_seeded=f"{run.get('joined', 0)}/{run.get('seeded', 0)}")
        rows.append([cell(row.get(key), fmt) for _, key, fmt in COLUMNS])
        if run.get("failed"):
            notes.append(f"N={run['nodes']} {run['backend']} x{run['coordinators']}: {run['failed']}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines + notes)


def document(runs: list[dict[str, Any]], machine: dict[str, Any], command: str) -> dict[str, Any]:
    """What --json-out writes, and what `draw` reads."""
    return {"tool": "tools.coordsim", "command": command, "machine": machine, "runs": runs}


def series_label(run: dict[str, Any]) -> str:
    return f"{run['backend']}, {run['coordinators']} coordinator{'s' if run['coordinators'] != 1 else ''}"


def cpu_per_change(run: dict[str, Any]) -> float | None:
    """The coordinators' CPU seconds while the changes went out, per change."""
    seconds = (run.get("coordinator_cpu_by_phase_s") or {}).get("changes")
    changes = len(run.get("changes") or [])
    return seconds / changes if seconds is not None and changes else None


#: (figure, panel title, log y axis): the chart's panels, N on a log axis.
PANELS: tuple[tuple[str, str, bool], ...] = (
    ("time_to_all_s", "one change to every node, s (median of changes)", True),
    ("change_p50_s", "one change, p50 over nodes, s", True),
    ("joins_per_s", "joins/s (approval flow; 20 unsigned requests/s\nper coordinator, 2 per join)", False),
    ("cpu_per_change_s", "coordinator CPU per change, s", True),
    ("kib_per_node", "coordinator RSS per connected node, KiB", False),
)


def draw(doc: dict[str, Any], path: str | Path) -> list[str]:
    """One panel per figure, one line per backend and coordinator count against N; returns
    the panels drawn. ValueError when no run has any figure."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    runs = [{**run, "cpu_per_change_s": cpu_per_change(run)} for run in doc.get("runs", []) if not run.get("failed")]
    panels = [panel for panel in PANELS if any(run.get(panel[0]) is not None for run in runs)]
    if not panels:
        raise ValueError("no figures to draw: no run finished with a value for any charted figure")
    labels = list(dict.fromkeys(series_label(run) for run in runs))
    figure, axes = panel_grid(len(panels), 3.6)
    try:
        for axis, (key, title, log_y) in zip(axes, panels):
            for label in labels:
                points = sorted((run["nodes"], run[key]) for run in runs
                                if series_label(run) == label and run.get(key) is not None)
                if points:
                    axis.plot([n for n, _ in points], [v for _, v in points], marker="o", label=label)
                    for n, value in points:
                        axis.annotate(f"{value:.3g}", (n, value), fontsize=7, xytext=(3, 3),
                                      textcoords="offset points")
            axis.set_xscale("log")
            if log_y:
                axis.set_yscale("log")
            axis.set_xlabel("simulated nodes (N)", fontsize=8)
            axis.set_title(title, fontsize=9)
            axis.margins(y=0.2)
            axis.tick_params(labelsize=8)
        axes[0].legend(fontsize=8)
        machine = doc.get("machine") or {}
        figure.suptitle(f"tools.coordsim: simulated nodes against real coordinators\n{machine.get('date', '?')}: "
                        f"{machine.get('cpu_model', '?')}, {machine.get('cpus', '?')} cores, "
                        f"Python {machine.get('python', '?')}", fontsize=10)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        pyplot.close(figure)
    return [key for key, _, _ in panels]

