"""What `tunnelmesh up` imports before a static node's first packet: only what it runs.

aiohttp, asyncssh, prometheus_client, async_upnp_client, aioice, textual and the
coordinator's modules are each ~0.05-0.15 s of imports and megabytes of RSS that a static
node never uses: they are imported where coordinator mode, the SSH rung, an agent
identity, the metrics, port mapping or the TUI start. Each check runs in a fresh
interpreter (this one has imported everything by now) and names what came in and through
which module.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from tunnelmesh.identity import load_identity_file

#: Never imported by a static node's start (the CLI's `up --detach` nor the daemon's).
#: (sqlite3 is not among them while actors/tun.py imports pyroute2, whose ndb imports it.)
HEAVY = ("aiohttp", "asyncssh", "prometheus_client", "async_upnp_client", "aioice", "textual", "hypothesis",
         "tunnelmesh.coordinator", "tunnelmesh.membership", "tunnelmesh.links.ssh",
         "tunnelmesh.links.relay", "actors.coordinator_client", "actors.metrics", "actors.port_mapper")

#: Prints the heavy modules present after running the given statements, as JSON.
PROBE = """
import json, sys
{statements}
heavy = {heavy!r}
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in heavy or
                        any(name == h or name.startswith(h + ".") for h in heavy))))
"""


def heavy_after(statements: str) -> list[str]:
    program = PROBE.format(statements=statements, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_the_cli_parses_up_without_the_heavy_modules() -> None:
    assert heavy_after("from tunnelmesh.cli import build_parser; build_parser().parse_args(['up', '--detach'])\n"
                       "import tunnelmesh.cli.daemon") == []


def test_up_detach_starts_the_daemon_before_it_imports_the_control_client() -> None:
    """Until the daemon process is started, `up --detach` has imported neither actors/ nor
    the control client (whose schema is actors.messages): what it imports after, it
    imports while the daemon starts."""
    done = subprocess.run([sys.executable, "-c", UP_UNTIL_POPEN], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


#: Runs `tunnelmesh up --detach` (its root check passed over) up to the daemon's Popen,
#: which prints what of actors/ and the control client is imported by then and stops.
UP_UNTIL_POPEN = """
import json, os, subprocess, sys, tempfile
os.geteuid = lambda: 0

class Started(Exception):
    pass

def popen(*args, **kwargs):
    print(json.dumps(sorted(m for m in sys.modules if m.startswith(("actors", "tunnelmesh.control_client")))))
    raise Started

subprocess.Popen = popen
from tunnelmesh.cli import main
state = tempfile.mkdtemp()
try:
    main(["--state-dir", state, "up", "--detach"])
except Started:
    pass
"""


def test_the_daemon_module_imports_nothing_heavy() -> None:
    assert heavy_after("import actors.daemon") == []


STATIC_CONFIG = """\
[node]
name = "a"
identity = "{key}"
mesh_ip = "100.100.0.1"
network_secret_file = "{secret}"

[[peers]]
name = "b"
identity = "{peer}"
mesh_ip = "100.100.0.2"
endpoint = "192.0.2.2:51820"
"""


def test_a_static_nodes_load_imports_nothing_heavy(tmp_path: Path) -> None:
    """The daemon's `_load` of a static node: config, the identity from a key file, the
    peer's identity line checked, the secret: all without asyncssh or membership."""
    from tunnelmesh.config import write_network_secret

    own_key, peer_key = new_ed25519_key(tmp_path / "own"), new_ed25519_key(tmp_path / "peer")
    secret = tmp_path / "network.secret"
    write_network_secret(secret)
    peer = asyncio.run(load_identity_file(peer_key)).public.to_line()
    config = tmp_path / "tunnelmesh.toml"
    config.write_text(STATIC_CONFIG.format(key=own_key, secret=secret, peer=peer))
    statements = (
        "import asyncio\n"
        "from actors.daemon import _load\n"
        "from tunnelmesh.paths import resolve_paths\n"
        f"paths = resolve_paths({str(tmp_path)!r}, {str(config)!r})\n"
        "loaded = asyncio.run(_load(paths))\n"
        "assert loaded is not None and loaded.config.peers[0].name == 'b'\n"
    )
    assert heavy_after(statements) == []


def test_the_help_shows_the_default_range_init_uses() -> None:
    from tunnelmesh.cli import DEFAULT_CIDR_SHOWN, build_parser
    from tunnelmesh.membership import DEFAULT_CIDR

    assert DEFAULT_CIDR_SHOWN == DEFAULT_CIDR
    assert build_parser().parse_args(["init"]).cidr is None  # cmd_init takes DEFAULT_CIDR then


def new_ed25519_key(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return path
