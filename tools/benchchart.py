"""tools.bench --chart: a PNG of the key figures per system, one panel per metric, with
the date and the machine in the title (matplotlib, Agg backend: no display needed).

Drawn from the JSON document tools.benchreport.document builds, so a saved --json-out
file can be drawn again: `python -m tools.benchchart results.json chart.png`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tools.benchreport import COLUMN_TITLES, PEER_COUNTS, SYSTEMS

#: (metric key, panel title): the figures a reader compares first.
PANELS: tuple[tuple[str, str], ...] = (
    ("tcp_ab_mbps", "TCP a->b, Mbit/s (higher is better)"),
    ("tcp_ba_mbps", "TCP b->a, Mbit/s (higher is better)"),
    ("tcp_p4_mbps", "TCP a->b, 4 flows, Mbit/s (higher is better)"),
    ("udp64_pps", "UDP 64 B, received kpackets/s (higher is better)"),
    ("udp1400_pps", "UDP 1400 B, received kpackets/s (higher is better)"),
    ("ping_median_ms", "ping median, ms (lower is better)"),
    ("ping_p99_ms", "ping p99, ms (lower is better)"),
    ("connect_s", "connect time, s (lower is better)"),
    ("cpu_s_per_gb", "CPU s per GB, both daemons (lower is better)"),
    ("rss_idle_mib", "daemon RSS idle, MiB (lower is better)"),
    ("wakeups_idle_per_min", "idle wake-ups per minute, 1 peer (lower is better)"),
    ("rss_per_peer_kib", f"RSS per static peer, KiB ({'/'.join(map(str, PEER_COUNTS))} peers; lower is better)"),
)
SCALE = {"udp64_pps": 1e-3, "udp1400_pps": 1e-3}  # shown in thousands
COLORS = {"tunnelmesh": "#1f77b4", "tunnelmesh+filter": "#6baed6", "wireguard-go": "#d62728", "nebula": "#2ca02c",
          "veth": "#7f7f7f"}


def caption(doc: dict[str, Any]) -> str:
    """The title's second line: when and on what the figures were measured."""
    machine = doc.get("machine") or {}
    runs = doc.get("runs", 1)
    return (f"{machine.get('date', '?')}: {machine.get('cpu_model', '?')}, {machine.get('cpus', '?')} cores, "
            f"Linux {machine.get('kernel', '?')}, Python {machine.get('python', '?')}; "
            f"iperf3 -t {doc.get('time_s', '?')}, {runs} run{'s' if runs != 1 else ''}"
            f"{' (medians)' if runs != 1 else ''}")


def panel_grid(count: int, row_height: float) -> tuple[Any, list[Any]]:
    """A matplotlib figure (Agg) of `count` panels, three a row, the rest of the last row
    hidden: (figure, the panels' axes). The caller closes the figure."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    columns = 3
    rows = -(-count // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(5 * columns, row_height * rows + 1), squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return figure, list(axes.flat[:count])


def draw(doc: dict[str, Any], path: str | Path) -> list[str]:
    """Draw the document's medians (system -> metric -> value) to a PNG at `path`; raw veth
    is left out (its throughput would flatten every other bar). Returns the panels' metric
    keys that had a value; ValueError when none had."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    medians: dict[str, dict[str, float | None]] = doc.get("medians") or {}
    systems = [s for s in SYSTEMS if s in medians and s != "veth"]
    panels = [(key, title) for key, title in PANELS if any(medians[s].get(key) is not None for s in systems)]
    if not panels:
        raise ValueError("no figures to draw: no system has a value for any charted metric")
    figure, axes = panel_grid(len(panels), 3.2)
    try:
        for axis, (key, title) in zip(axes, panels):
            values = [medians[s].get(key) for s in systems]
            heights = [0.0 if v is None else v * SCALE.get(key, 1.0) for v in values]
            bars = axis.bar([COLUMN_TITLES[s] for s in systems], heights, color=[COLORS[s] for s in systems])
            for bar, value, height in zip(bars, values, heights):
                label = "n/a" if value is None else f"{height:.3g}"
                axis.annotate(label, (bar.get_x() + bar.get_width() / 2, height), ha="center", va="bottom",
                              fontsize=8, xytext=(0, 2), textcoords="offset points")
            axis.set_title(title, fontsize=9)
            axis.tick_params(axis="x", labelsize=8, rotation=15)
            axis.margins(y=0.15)
        title = " vs ".join(COLUMN_TITLES[s] for s in systems)
        figure.suptitle(f"tools.bench: {title}\n{caption(doc)}", fontsize=10)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        pyplot.close(figure)
    return [key for key, _ in panels]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m tools.benchchart RESULTS.json CHART.png", file=sys.stderr)
        return 2
    draw(json.loads(Path(argv[0]).read_text()), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
