"""packaging/tunnelmesh.service: systemd accepts it without a warning, and it grants
what the daemon needs and no more."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import unavailable

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "tunnelmesh.service"
INSTALLED_EXE = "/usr/local/bin/tunnelmesh"


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        unavailable("systemd-analyze missing (tools/setup.sh installs systemd)")
    return tool


def verify(text: str, tmp_path: Path) -> tuple[int, list[str]]:
    """Run `systemd-analyze verify` on a copy whose ExecStart/ExecStop point at an
    executable that exists here; return its exit code and its lines about our unit."""
    exe = shutil.which("tunnelmesh") or sys.executable
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_EXE, exe))
    proc = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [line for line in lines if UNIT.name in line]


def service_section() -> dict[str, list[str]]:
    """The [Service] keys and their values; systemd allows repeated keys, so a list each."""
    keys: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def test_unit_verifies_without_warnings(tmp_path):
    code, about_unit = verify(UNIT.read_text(), tmp_path)
    assert about_unit == []
    assert code == 0


def test_verify_reports_a_broken_unit(tmp_path):
    """The check above can fail: a bad key and a missing binary are reported."""
    broken = UNIT.read_text().replace("[Service]\n", "[Service]\nNoSuchSetting=1\n")
    broken = broken.replace(f"ExecStop={INSTALLED_EXE}", "ExecStop=/nonexistent/tunnelmesh")
    code, about_unit = verify(broken, tmp_path)
    assert any("NoSuchSetting" in line for line in about_unit), about_unit
    assert code != 0 or any("nonexistent" in line for line in about_unit)


def test_unit_runs_the_daemon_with_only_network_capabilities():
    service = service_section()
    assert service["ExecStart"] == [f"{INSTALLED_EXE} up"]
    assert service["ExecStop"] == [f"{INSTALLED_EXE} down"]
    assert service["Restart"] == ["on-failure"]
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert service[key] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert service["DeviceAllow"] == ["/dev/net/tun rw"]
    assert service["StateDirectory"] == ["tunnelmesh"]
    assert service["ConfigurationDirectory"] == ["tunnelmesh"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["ProtectHome"] == ["read-only"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["PrivateTmp"] == ["yes"]
    # Hardening that would break the daemon: no TUN device, no host key, no netlink.
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert "User" not in service and "DynamicUser" not in service
    assert not any("/etc/ssh" in v for k in ("InaccessiblePaths", "TemporaryFileSystem") for v in service.get(k, []))
    assert "AF_NETLINK" in service["RestrictAddressFamilies"][0]
