"""The soak tool's pure part: ping logs, loss classes, growth, verdict, the table."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tools import soak
from tools.lab import CommandError

# Real `ping -n -D -O -i 0.2 -W 1 -c 8` output with half the echo requests dropped.
PING_LOG = """PING 127.0.0.1 (127.0.0.1) 56(84) bytes of data.
[1796388401.388394] no answer yet for icmp_seq=1
[1796388401.593465] no answer yet for icmp_seq=2
[1796388401.796219] no answer yet for icmp_seq=3
[1796388401.796322] 64 bytes from 127.0.0.1: icmp_seq=4 ttl=64 time=0.032 ms
[1796388402.000303] 64 bytes from 127.0.0.1: icmp_seq=5 ttl=64 time=0.043 ms
[1796388402.416214] no answer yet for icmp_seq=6
[1796388402.620171] no answer yet for icmp_seq=7

--- 127.0.0.1 ping statistics ---
8 packets transmitted, 2 received, 75% packet loss, time 1434ms
"""


def test_ping_log_lost_requests_and_their_send_times() -> None:
    log = soak.parse_ping_log(PING_LOG, interval=0.2)
    assert log.answered == {4, 5}
    lost = log.lost(until=1796388500.0)
    assert len(lost) == 5  # 1, 2, 3, 6, 7; seq 8 never reported
    assert lost[0] == pytest.approx(1796388401.188394)  # "no answer yet" comes one interval after the send
    assert log.sent_at[4] == pytest.approx(1796388401.796322 - 0.000032)
    assert log.sent(until=1796388500.0) == 7


def test_ping_log_requests_still_in_flight_are_not_lost() -> None:
    log = soak.parse_ping_log(PING_LOG, interval=0.2)
    assert len(log.lost(until=1796388402.0)) == 3  # 6 and 7 were sent later


def test_ping_log_gaps_are_placed_an_interval_apart() -> None:
    text = ("[100.000000] 64 bytes from 10.0.0.1: icmp_seq=1 ttl=64 time=1.0 ms\n"
            "ping: sendmsg: Network is unreachable\n"
            "ping: sendmsg: Network is unreachable\n"
            "[103.000000] 64 bytes from 10.0.0.1: icmp_seq=4 ttl=64 time=1.0 ms\n")
    log = soak.parse_ping_log(text, interval=1.0)
    assert log.lost(until=200.0) == pytest.approx([100.999, 101.999])


@given(st.text(max_size=2000))
def test_ping_log_parser_takes_any_text(text: str) -> None:
    log = soak.parse_ping_log(text, interval=1.0)
    assert log.answered <= set(log.sent_at)


WINDOWS = [{"kind": "rung-udp", "start": 100.0, "end": 130.0, "pairs": ["a-b"], "ok": True}]


def test_losses_on_a_disturbed_pair_within_the_window_and_grace_are_expected() -> None:
    lost = {"a-b": [96.0, 110.0, 134.0, 136.0], "c-d": [110.0]}
    out = soak.classify_losses(lost, WINDOWS, grace=5.0)
    assert out["disturbed"] == 3  # 96 and 134 lie within the grace
    assert out["undisturbed"] == 2  # a-b at 136, and c-d, which the cut did not touch
    assert out["undisturbed_by_pair"] == {"a-b": 1, "c-d": 1}
    assert soak.classify_losses(lost, WINDOWS, grace=5.0, until=100.0)["disturbed"] == 1


def sample(t: float, **procs: tuple[int, int, int] | None) -> dict[str, Any]:
    return {"t": t, "procs": {name: None if p is None else {"pid": p[0], "rss_kib": p[1], "fds": p[2]}
                              for name, p in procs.items()}}


def test_growth_compares_the_first_and_last_quarter_of_the_last_pid() -> None:
    samples = [sample(0, a=(1, 90_000, 40))]  # an old pid, bigger: not part of the judged segment
    samples += [sample(t, a=(2, 70_000 + 100 * t, 13 + t // 10)) for t in range(10, 90, 10)]
    g = soak.growth(samples, "a")
    assert g["judged"] and g["pids"] == 2 and g["segment_from_t"] == 10
    # Quarters of 8 samples: t 10, 20 against t 70, 80.
    assert g["rss_kib_growth"] == pytest.approx((77_000 + 78_000) / 2 - (71_000 + 72_000) / 2)
    assert g["fds_growth"] == pytest.approx((20 + 21) / 2 - (14 + 15) / 2)
    assert g["first"]["rss_kib"] == 90_000 and g["last"]["rss_kib"] == 70_000 + 8000


def test_growth_skips_missing_samples_and_needs_four() -> None:
    samples = [sample(0, a=None), sample(10, a=(1, 1000, 10)), sample(20, a=(1, 1000, 10))]
    assert not soak.growth(samples, "a")["judged"]
    assert soak.growth([sample(0, b=(1, 1, 1))], "a") == {"pids": 0, "judged": False}


def judged(rss_kib: float, fds: float) -> dict[str, Any]:
    return {"judged": True, "rss_kib_growth": rss_kib, "fds_growth": fds}


def test_verdict_bounds() -> None:
    flat = {"a": judged(5 * 1024, 10), "coord": {"judged": False}}
    assert soak.verdict(flat, rss_bound_mib=5, fd_bound=10) == ("flat", [])
    growing = {**flat, "b": judged(5 * 1024 + 1, 0), "c": judged(0, 11)}
    assert soak.verdict(growing, rss_bound_mib=5, fd_bound=10) == ("growing", ["b", "c"])
    assert soak.verdict({"a": {"judged": False}}, rss_bound_mib=5, fd_bound=10) == ("too short", [])


def report(rss_step: int) -> dict[str, Any]:
    samples = [sample(t, **{name: (7, 70_000 + rss_step * t, 13) for name in soak.CORE},
                      coord=(9, 60_000, 20)) for t in range(0, 200, 10)]
    return {
        "config": {"grace_s": 5.0, "rss_bound_mib": 5.0, "fd_bound": 10, "ping_interval_s": 1.0},
        "duration_s": 200.0, "interrupted": False, "processes": [*soak.CORE, soak.COORDINATOR],
        "samples": samples,
        "events": [*WINDOWS, {"kind": "coordinator", "start": 150.0, "end": 160.0, "pairs": [], "ok": False,
                              "error": "every node reconnects to the coordinator: not within 60 s"}],
        "pairs": {pair: {"sent": 200, "lost_at": [110.0] if pair == "a-b" else []} for pair in soak.PAIRS}
        | {"d-e": {"sent": 200, "lost_at": [155.0]}},
    }


def test_summary_and_table_of_a_flat_run() -> None:
    rep = report(rss_step=1)
    summary = soak.summarize(rep)
    assert summary["verdict"] == "flat"
    assert summary["lost"] == {"disturbed": 1, "undisturbed": 1, "undisturbed_by_pair": {"d-e": 1}, "sent": 2000}
    assert summary["actions"] == {"rung-udp": {"done": 1, "failed": 0}, "coordinator": {"done": 0, "failed": 1}}
    text = soak.render(rep, summary)
    rows = [line for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 20
    assert rows[-1].split()[:3] == ["190", "1", "1"]  # lost so far: undisturbed, disturbed
    assert rows[0].split()[:3] == ["0", "0", "0"]
    assert "68.4/13" in rows[0] and "coordinator: not within 60 s" in text
    assert text.splitlines()[-1] == "verdict: flat"


def test_summary_of_a_growing_run_names_the_processes() -> None:
    summary = soak.summarize(report(rss_step=100))  # 100 KiB per second: ~14 MiB between the quarters
    assert summary["verdict"] == "growing" and summary["growing"] == list(soak.CORE)
    assert soak.render(report(rss_step=100), summary).splitlines()[-1] == "verdict: growing (a, b, c, d, e)"


def test_bad_usage_is_refused() -> None:
    for argv in (["--minutes", "0"], ["--sample-every", "0"], ["--restarts-until", "2"], ["--fd-bound", "-1"]):
        with pytest.raises(SystemExit) as exc:
            soak.parse_args(argv)
        assert exc.value.code == 2
    _, options = soak.parse_args(["--minutes", "30", "--churn-gap", "5"])
    assert options.minutes == 30 and options.churn_gap_s == 5


def test_a_failed_command_is_reported_with_the_end_of_its_stderr() -> None:
    exc = CommandError(1, ["tunnelmesh", "up", "--detach"], "", "tunnelmesh: failed to start:\n  line 1\n  the reason\n")
    error = soak.action_error(exc)
    assert error.startswith("command `tunnelmesh up --detach` exited with 1; stderr: ")
    assert error.endswith("line 1 | the reason") and "\n" not in error
    assert soak.action_error(soak.ActionFailed("f pings a: not within 30 s")) == "f pings a: not within 30 s"
