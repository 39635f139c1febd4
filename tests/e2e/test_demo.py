"""The README's first command, `python -m tools.demo`: a real three-node network in
namespaces (init, invite, join, up), status, every pair pinging, default deny and a port
opened by the network policy, a TCP transfer checked end to end, the receiver's
Prometheus metrics, and `down`. It must end with DEMO OK and leave nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import lab_problem, unavailable
from tools.lab import clean_environment

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_the_readmes_demo_runs_to_demo_ok() -> None:
    if (problem := lab_problem()) is not None:
        unavailable(problem)
    done = subprocess.run([sys.executable, "-m", "tools.demo"], cwd=ROOT, env=clean_environment(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240)
    said = f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0 and done.stdout.rstrip().endswith("DEMO OK"), said
    for step in ("every pair pings through the tunnel", "sha256 matches", 'tunnelmesh_peer_rx_bytes_total{peer="alpha"}',
                 "interfaces removed"):
        assert step in done.stdout, f"no {step!r} in the demo's output:\n{said}"
