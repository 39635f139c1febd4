"""tools.ladderbench's pure part: `ping -D` parsing, medians, targets and the tables.
No lab, no speed assertions."""

from __future__ import annotations

import pytest

from tools import ladderbench as lb

PING = """\
PING 100.64.0.3 (100.64.0.3) 56(84) bytes of data.
[1000.100000] 64 bytes from 100.64.0.3: icmp_seq=1 ttl=64 time=1.00 ms
[1000.201000] 64 bytes from 100.64.0.3: icmp_seq=2 ttl=64 time=1.00 ms
[1000.400000] no answer yet for icmp_seq=3
[1000.500000] no answer yet for icmp_seq=4
[1003.700000] 64 bytes from 100.64.0.3: icmp_seq=5 ttl=64 time=2500 ms
[1003.750000] 64 bytes from 100.64.0.3: icmp_seq=33 ttl=64 time=50.0 ms
"""


def test_first_answer_after_counts_only_pings_sent_after():
    assert lb.ping_replies(PING)[0] == pytest.approx((1000.1, 1000.099))
    # seq 2 was sent at 1000.200, before the cut at 1000.2005: its late answer does not count.
    assert lb.first_answer_after(PING, 1000.2005) == pytest.approx(3.4995)  # seq 5, sent at 1001.200
    assert lb.first_answer_after(PING, 1001.5) == pytest.approx(2.25)  # seq 33 only
    assert lb.first_answer_after(PING, 1004.0) is None
    assert lb.first_answer_after("", 0.0) is None


def test_verdict_and_summary():
    assert lb.verdict(4.0, 5.0) == "met" and lb.verdict(6.0, 5.0) == "MISSED"
    assert lb.verdict(0.4, 0.5, at_most=False) == "MISSED" and lb.verdict(None, 5.0) == ""
    stats = lb.summarize([{"ssh_ping_s": 3.0, "new_rung": "ssh"}, {"ssh_ping_s": 5.0}, {"ssh_ping_s": 4.0, "x": None}])
    assert stats == {"ssh_ping_s": {"median": 4.0, "min": 3.0, "max": 5.0}}


def test_tables():
    records = [{"ssh_ping_s": 3.4, "udp_back_s": 31.0, "tcp_udp_mbps": 400.0, "tcp_ssh_mbps": 100.0,
                "tcp_relay_mbps": 300.0, "tcp_udp_loss_mbps": 200.0, "errors": {"new": "boom"}}]
    lines = lb.report(records, 10).splitlines()
    row = next(line for line in lines if line.startswith("UDP cut -> first ping")).split()
    assert row[-5:] == ["3.40", "3.40", "<=", "10", "met"]
    assert next(line for line in lines if line.startswith("rules removed")).endswith("<= 30  MISSED")
    assert next(line for line in lines if line.startswith("new session, UDP cut: `up` returned")).split()[-4:] == \
        ["-", "-", "<=", "5"]
    assert next(line for line in lines if line.startswith("clean link")).split()[2:] == \
        ["400", "100", "0.25", "300", "0.75"]
    assert next(line for line in lines if line.startswith("1 % random loss")).split()[-5:] == \
        ["200", "-", "-", "-", "-"]
    assert lines[lines.index(next(line for line in lines if line.startswith("target"))) + 1].split() == \
        ["MISSED", "met"]
    assert lines[-1] == "round 1: new failed: boom"
    table = lb.timing_table(lb.summarize(records))
    assert len({len(line) for line in table}) <= 2  # the verdict column may be empty


def test_parse_args():
    args = lb.parse_args([])
    assert (args.rounds, args.time, args.json, args.parts) == (3, 10, False, list(lb.PARTS))
    assert lb.parse_args(["--only", "tcp,switch"]).parts == ["switch", "tcp"]
    for bad in (["--only", "udp"], ["--rounds", "0"], ["--time", "0"]):
        with pytest.raises(SystemExit):
            lb.parse_args(bad)
