"""`tunnelmesh up` refuses a bad config before touching the network, and the CLI's
other refusals (a second instance, `status` with no daemon).

Each test is one lab namespace with one node made by `tunnelmesh init --static
--new-key`; no mesh is needed. A refused `up` must exit 2 (bad configuration, as
the CLI documents), name the config file and the offending line, and leave no tm0
interface, pid file or control socket behind.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tools.mesh import TUNNELMESH, MeshNode

pytestmark = pytest.mark.e2e

MESH_IP = "100.100.0.1"
PLAIN_KEY_1 = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
PLAIN_KEY_2 = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
# Run as root but without the capabilities that let root read any file, so a
# mode-000 file is really unreadable (CAP_NET_ADMIN stays: up could make tm0).
NO_DAC = ("setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search")


@pytest.fixture
def member(lab) -> MeshNode:
    node = lab.add_node("n")
    member = MeshNode(node, "", MESH_IP)
    member.tm("init", "--static", "--name", "n", "--mesh-ip", MESH_IP, "--new-key")
    return member


def line_number(text: str, pattern: str, after: int = 0) -> int:
    """1-based number of the first line matching regex `pattern` (whole line) after line `after`."""
    for number, line in enumerate(text.splitlines(), 1):
        if number > after and re.fullmatch(pattern, line):
            return number
    raise AssertionError(f"no line /{pattern}/ after line {after} in:\n{text}")


def plain_peer(name: str, key: str, mesh_ip: str) -> str:
    return f'\n[[peers]]\nname = "{name}"\nwireguard_public_key = "{key}"\nmesh_ip = "{mesh_ip}"\n'


def leftovers(member: MeshNode) -> list[str]:
    state = Path(member.node.state_dir)
    left = []
    if "tm0" in member.node.run("ip", "link").stdout:
        left.append("tm0 interface")
    if "100.100.0." in member.node.run("ip", "route").stdout:
        left.append("route into the mesh")
    for name in ("tunnelmesh.pid", "control.sock"):
        if (state / name).exists():
            left.append(name)
    return left


def up(member: MeshNode, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`tunnelmesh up` in the foreground (or with --detach in extra); it must exit by
    itself within 20 s, since every config here is bad."""
    argv = [*prefix, *TUNNELMESH, "--state-dir", member.node.state_dir, "up", *extra]
    try:
        return member.node.run(*argv, check=False, timeout=20)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`tunnelmesh up {' '.join(extra)}` was still running after 20 s: it started despite the bad "
                    f"config\nstderr: {exc.stderr}\nconfig:\n{Path(member.config_path).read_text()}", pytrace=False)


# Each case edits the starter config and returns (new config text, the line number the
# error must name, a word the message must contain).


def unknown_key(text: str, member: MeshNode):
    text = text.replace("[node]\n", '[node]\ncolour = "blue"\n', 1)
    return text, line_number(text, r'colour = "blue"'), "colour"


def bad_ip(text: str, member: MeshNode):
    text, n = re.subn(r'(?m)^mesh_ip = ".*"$', 'mesh_ip = "100.100.0.300"', text)
    assert n == 1, text
    return text, line_number(text, r'mesh_ip = "100\.100\.0\.300"'), "100.100.0.300"


def duplicate_of_own_mesh_ip(text: str, member: MeshNode):
    text += plain_peer("phone", PLAIN_KEY_1, MESH_IP)
    return text, line_number(text, rf'mesh_ip = "{re.escape(MESH_IP)}"', after=line_number(text, r"\[\[peers\]\]")), MESH_IP


def duplicate_mesh_ip_between_peers(text: str, member: MeshNode):
    text += plain_peer("phone", PLAIN_KEY_1, "100.100.0.7") + plain_peer("laptop", PLAIN_KEY_2, "100.100.0.7")
    # the later peer's mesh_ip is the duplicate
    return text, line_number(text, r'mesh_ip = "100\.100\.0\.7"', after=line_number(text, 'name = "laptop"')), "100.100.0.7"


def missing_key_file(text: str, member: MeshNode):
    key = f"{member.node.state_dir}/identity_ed25519"
    assert key in text, text
    text = text.replace(key, f"{member.node.state_dir}/no_such_key")
    return text, line_number(text, r"identity = .*"), "no_such_key"


CASES = {
    "unknown key": unknown_key,
    "bad IP": bad_ip,
    "duplicate of own mesh IP": duplicate_of_own_mesh_ip,
    "duplicate mesh IP between peers": duplicate_mesh_ip_between_peers,
    "missing key file": missing_key_file,
}


def assert_refused(member: MeshNode, result: subprocess.CompletedProcess, line: int, word: str) -> None:
    config = Path(member.config_path)
    output = result.stdout + result.stderr
    context = f"exit {result.returncode}\noutput:\n{output}\nconfig:\n{config.read_text()}"
    assert result.returncode == 2, f"expected exit 2 (bad configuration): {context}"
    assert f"{config}:{line}:" in output, f"the error does not name {config}:{line}: {context}"
    assert word in output, f"the error does not mention {word!r}: {context}"
    assert "Traceback" not in output, context
    left = leftovers(member)
    assert not left, f"a refused `up` left {left} behind: {context}"


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: c.replace(" ", "-"))
def test_bad_config_is_refused_naming_file_and_line(member, case):
    text, line, word = CASES[case](Path(member.config_path).read_text(), member)
    Path(member.config_path).write_text(text)
    assert_refused(member, up(member), line, word)


def test_unreadable_key_file_is_refused_naming_file_and_line(member):
    key = Path(member.node.state_dir) / "identity_ed25519"
    os.chmod(key, 0)
    # Precondition: without the DAC capabilities the key really cannot be read.
    probe = member.node.run(*NO_DAC, "cat", str(key), check=False)
    assert probe.returncode != 0 and "Permission denied" in probe.stderr, f"key still readable: {probe}"
    text = Path(member.config_path).read_text()
    result = up(member, prefix=NO_DAC)
    assert_refused(member, result, line_number(text, r"identity = .*"), "identity_ed25519")
    assert "Permission denied" in result.stderr, result.stderr


def test_detached_up_reports_the_config_error(member):
    text, line, word = unknown_key(Path(member.config_path).read_text(), member)
    Path(member.config_path).write_text(text)
    result = up(member, "--detach")
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"up --detach succeeded with a bad config: {output}"
    assert f"{member.config_path}:{line}:" in output and word in output, (
        f"up --detach does not say what is wrong (file:line {line}, {word!r}):\n{output}"
    )
    assert not leftovers(member), leftovers(member)


def test_second_up_on_same_state_dir_says_already_running(member):
    member.up()
    try:
        first = member.status()["node"]["pid"]
        for extra in ((), ("--detach",)):
            result = up(member, *extra)
            output = result.stdout + result.stderr
            assert result.returncode != 0, f"a second `up {' '.join(extra)}` succeeded:\n{output}"
            assert "already running" in output, f"a second `up {' '.join(extra)}` does not say so:\n{output}"
            # The first daemon is untouched: same process, interface and socket still there.
            status = member.tm("status", "--json", check=False)
            assert status.returncode == 0, f"the first daemon stopped answering:\n{status.stderr}\n{member.log_tail()}"
            assert member.status()["node"]["pid"] == first, "the first daemon was replaced"
            assert "tm0" in member.node.run("ip", "link").stdout, "the second `up` removed the first one's tm0"
            assert (Path(member.node.state_dir) / "control.sock").exists()
    finally:
        member.down(check=False)
    assert not leftovers(member), leftovers(member)


def test_status_without_daemon_says_not_running_and_exits_1(member):
    for args in (("status",), ("status", "--json"), ("peers",)):
        result = member.tm(*args, check=False)
        assert result.returncode == 1, f"`{' '.join(args)}` with no daemon exited {result.returncode}: {result.stderr}"
        assert "not running" in result.stderr, f"`{' '.join(args)}` with no daemon says: {result.stdout}{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
