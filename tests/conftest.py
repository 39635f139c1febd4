"""Shared fixtures: the network-namespace lab, root checks, markers by directory.

Tests that need root or the lab's tools skip with a reason on a developer machine, but
FAIL when CI=true: CI must never go green by skipping the real tests.
"""

from __future__ import annotations

import itertools
import os
import secrets
import warnings
from pathlib import Path
from typing import NoReturn

import pytest
from hypothesis import HealthCheck, settings

from tools import lab as labmod

# Timing is not what the property tests check: with three workers on two shared cores an
# example (a whole nested Status, say) can take longer than hypothesis's 200 ms deadline, and
# drawing one can trip the too_slow health check. Neither is a failure of the code under test.
settings.register_profile("shared-cores", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("shared-cores")

# Every namespace this pytest process creates starts with RUN_PREFIX, so the end-of-session
# sweep removes exactly its own leftovers and never another run's live lab. Under
# pytest-xdist each worker is a process of its own: its own prefix, its own sweep.
RUN_PREFIX = f"tml{secrets.token_hex(3)[:5]}-"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
_lab_numbers = itertools.count(1)
_MARKERS_BY_DIR = {"e2e": "e2e", "interop": "interop"}


def unavailable(reason: str) -> NoReturn:
    """Skip with `reason`, or fail under CI=true: the one way a test says that a tool, root
    or a device it needs is missing here."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: this test must run, not skip)", pytrace=False)
    pytest.skip(reason)


def lab_problem() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    missing = [tool for tool in ("ip", "nft") if labmod.find_tool(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (run tools/setup.sh)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        try:
            top = Path(item.path).relative_to(here).parts[0]
        except (ValueError, IndexError):
            continue
        if top in _MARKERS_BY_DIR:
            item.add_marker(_MARKERS_BY_DIR[top])
    # Longest first (under pytest-xdist the workers then finish together, the short unit
    # tests filling the gaps at the end): tests marked `long`, then the other whole-daemon
    # tests, then the rest, each in collection order.
    items.sort(key=lambda item: 0 if item.get_closest_marker("long") else 1 if item.get_closest_marker("e2e")
               or item.get_closest_marker("interop") else 2)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    setattr(item, f"_report_{report.when}", report)  # for the lab fixture's failure dump
    return report


@pytest.fixture
def require_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root")


@pytest.fixture
def make_lab(request: pytest.FixtureRequest):
    """Factory for labs with this run's prefix; all of them are torn down after the test.

    On failure, the tail of every process log is printed (shown with the test's report).
    Set TUNNELMESH_LAB_KEEP=1 to keep the workdirs for inspection.
    """
    problem = lab_problem()
    if problem:
        unavailable(problem)
    labs: list[labmod.Lab] = []
    keep = os.environ.get("TUNNELMESH_LAB_KEEP") == "1"

    def make() -> labmod.Lab:
        lab = labmod.Lab(prefix=f"{RUN_PREFIX}{next(_lab_numbers)}-", keep=keep)
        labs.append(lab)
        return lab

    yield make
    failed = getattr(request.node, "_report_call", None)
    for lab in labs:
        if failed is not None and failed.failed:
            _dump_logs(lab)
        lab.cleanup()


@pytest.fixture
def lab(make_lab) -> labmod.Lab:
    """A fresh Lab for one test, torn down afterwards whatever happens."""
    return make_lab()


def _dump_logs(lab: labmod.Lab) -> None:
    workdir = Path(lab.workdir)
    if not workdir.is_dir():
        return
    for log in sorted(workdir.glob("*.log")):
        text = log.read_text(errors="replace")
        print(f"===== {log.name} (last 3000 chars) =====\n{text[-3000:]}")
    print(f"===== lab workdir: {workdir}")


@pytest.fixture(scope="session", autouse=True)
def _sweep_lab_leftovers():
    """At the end of the run, remove anything this run's labs left and say so."""
    yield
    if os.geteuid() != 0 or labmod.find_tool("ip") is None:
        return
    removed = labmod.cleanup_leftovers(RUN_PREFIX)
    if removed:
        warnings.warn(f"lab leftovers removed at end of session: {removed}", stacklevel=1)


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server per test worker (tools/pgserver.py), removed at the end."""
    from tools.pgserver import PostgresUnavailable, TemporaryPostgres

    try:
        server = TemporaryPostgres().start()
    except PostgresUnavailable as exc:
        unavailable(str(exc))
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path):
    """The coordinator's database on each backend in turn (tests/support/databases.py)."""
    from tests.support.databases import postgres_database, sqlite_database

    if request.param == "sqlite":
        return sqlite_database(tmp_path)
    return postgres_database(request.getfixturevalue("postgres_server"), tmp_path)
