"""A short run of the soak tool (tools/soak.py): five nodes and a standalone coordinator in
the netns lab, every kind of churn at least once, the report complete and pairs that no
action disturbed (almost) never losing a ping."""

from __future__ import annotations

import json

import pytest

from tools import soak
from tools.lab import Lab

pytestmark = [pytest.mark.e2e, pytest.mark.long]

#: Pings lost on pairs no action was disturbing, out of ~1,500 (10 pairs, 1 per second).
UNDISTURBED_LOST_MAX = 2


def test_a_short_soak_runs_every_kind_of_churn_and_reports(lab: Lab) -> None:
    # 1.5 minutes with 1 s between actions: the cycle's eight actions all start in time
    # even when the ladder takes its full bounds.
    report = soak.soak(lab, soak.Options(minutes=1.5, churn_gap_s=1.0, sample_every_s=5.0))
    summary = report["summary"]
    text = soak.render(report, summary)
    print(text)

    assert set(summary["actions"]) == set(soak.CYCLE), summary["actions"]
    assert not summary["failed_actions"], text
    assert summary["lost"]["undisturbed"] <= UNDISTURBED_LOST_MAX, text
    assert summary["lost"]["sent"] >= 10 * 60, text  # every pinger ran for (most of) the run
    # Every daemon and the coordinator was sampled from start to end, with new pids
    # after the restarts.
    first, last = report["samples"][0]["procs"], report["samples"][-1]["procs"]
    for name in report["processes"]:
        assert first[name] and last[name] and first[name]["rss_kib"] > 0 and first[name]["fds"] > 0, (name, first, last)
    assert last[soak.COORDINATOR]["pid"] != first[soak.COORDINATOR]["pid"]
    assert any(last[n]["pid"] != first[n]["pid"] for n in soak.CORE)
    assert summary["verdict"] in ("flat", "growing"), text  # enough samples to judge
    assert json.loads(json.dumps(report)) == report  # the --json report is plain JSON
