"""The relay and the coordinator API where only HTTP(S) gets out, in the netns lab.

First the client classes alone (`RelayClient`, `Coordinator`), then whole daemons.

`hub` (192.0.2.1) runs a standalone coordinator on :7400, real Debian tinyproxy
on :8888 (an HTTP proxy that CONNECTs only to :8443) and real nginx on :8443
terminating TLS (certificates made at test time by a private CA) in front of the
coordinator, WebSocket upgrade included. nftables on the hub refuses :7400 from
the wire, so `node` (192.0.2.2) reaches the coordinator only through a proxy.

On `node` this file runs as a script (`client_side`): it sets up the network and
joins two members through the proxy, then relays between them over each path
and reports what worked and the errors the failing paths gave, as JSON.

Whole daemons: `hub` runs the standalone coordinator behind nginx (TLS, private
CA) and nothing else; the network's URL is nginx's https://. Members `a` (admin,
`init --external-coordinator --ca-file`) and `b` reach nginx directly; `d`, whose
own nftables let out only TCP to one address and port, `join --ca-file`s and runs
its daemon either through real tinyproxy on a node of its own (`HTTPS_PROXY` in
the daemon's environment) or straight to nginx. Either way it must get the peer map
and reach every peer over the relay.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable
from tests.support.tls import make_ca, make_server
from tools.lab import Lab, Node, clean_environment, find_tool
from tools.mesh import MeshNode, diagnostics, rung_of, wait_for_handshakes

HUB = "192.0.2.1"
COORDINATOR_PORT = 7400
PROXY_PORT = 8888
TLS_PORT = 8443
PROXY = f"http://{HUB}:{PROXY_PORT}"
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


# --- the test: the hub's services, and the client script's report -----------------------------


def _tinyproxy_conf(directory: Path, listen: str = HUB) -> Path:
    conf = directory / "tinyproxy.conf"
    conf.write_text(f"Port {PROXY_PORT}\nListen {listen}\nTimeout 300\nAllow 192.0.2.0/24\nConnectPort {TLS_PORT}\n"
                    "LogLevel Info\nMaxClients 20\n")
    return conf


def _nginx_conf(directory: Path, cert: Path, key: Path) -> Path:
    for temp in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / temp).mkdir()
    conf = directory / "nginx.conf"
    conf.write_text(f"""
pid {directory}/nginx.pid;
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen {HUB}:{TLS_PORT} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://{HUB}:{COORDINATOR_PORT};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 120s;
        }}
    }}
}}
""")
    return conf


def _wait_listening(node: Any, port: int, what: str, process: Any, host: str = HUB) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        probe = node.run("python3", "-c", f"import socket; socket.create_connection(('{host}', {port}), timeout=1)",
                         check=False)
        if probe.returncode == 0:
            return
        if process.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"{what} did not start:\n{node.log(process.log_name)[-3000:]}")


def _require_tools() -> None:
    missing = [tool for tool in ("tinyproxy", "nginx") if find_tool(tool) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} (run tools/setup.sh)")


def _hub_behind_tls(lab: Lab) -> tuple[Any, Node, Path]:
    """The switch, `hub` running the standalone coordinator (its port refused from the wire)
    behind nginx, and the CA file that trusts nginx's certificate."""
    switch = lab.add_switch("sw", "192.0.2.0/24")
    hub = lab.add_node("hub")
    lab.connect(hub, switch, HUB)
    work = Path(hub.state_dir)
    ca = make_ca()
    ca_file, _ = ca.write(Path(lab.workdir), "ca")
    cert, key = make_server(ca, HUB).write(work, "server")
    hub.nft(f"""table inet relaytest {{
        chain input {{ type filter hook input priority 0; policy accept;
            iifname "eth0" tcp dport {COORDINATOR_PORT} reject with tcp reset
        }}
    }}""")
    coordinator = hub.popen(sys.executable, "-m", "tunnelmesh", "coordinator", "--listen",
                            f"{HUB}:{COORDINATOR_PORT}", "--db", str(work / "coordinator.db"),
                            "--trusted-proxy", HUB, "--plain-http",
                            log_name="coordinator")  # nginx, in front of it, terminates TLS
    _wait_listening(hub, COORDINATOR_PORT, "the coordinator", coordinator)
    nginx = hub.popen("nginx", "-e", "stderr", "-p", str(work), "-c", str(_nginx_conf(work, cert, key)),
                      "-g", "daemon off;", log_name="nginx")
    _wait_listening(hub, TLS_PORT, "nginx", nginx)
    return switch, hub, ca_file


def test_relay_and_api_through_an_http_proxy_and_tls_termination(lab: Lab) -> None:
    _require_tools()
    switch, hub, ca_file = _hub_behind_tls(lab)  # only the hub itself (the proxies) reaches the coordinator's port
    node = lab.add_node("node")
    lab.connect(node, switch, "192.0.2.2")
    proxy = hub.popen("tinyproxy", "-d", "-c", str(_tinyproxy_conf(Path(hub.state_dir))), log_name="tinyproxy")
    _wait_listening(hub, PROXY_PORT, "tinyproxy", proxy)

    env = {**clean_environment(), "PYTHONPATH": str(ROOT)}
    result = node.run(sys.executable, "-m", "tests.e2e.test_relay_proxies", str(ca_file), env=env, timeout=150,
                      check=False)
    assert result.returncode == 0, f"client script failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["direct"].startswith("connection refused on 192.0.2.1:7400"), report
    assert report["api_via_proxy"] == "ok", report
    # A forwarding proxy strips the upgrade of plain ws://: the client says to use https://.
    assert "proxies pass WebSockets only through CONNECT" in report["relay_via_proxy_plain"], report
    assert report["relay_via_proxy_and_tls"] == "ok", report
    assert report["api_via_proxy_and_tls"] == "ok", report
    assert report["no_ca_file"].startswith("TLS: certificate verify failed on 192.0.2.1:8443"), report
    assert report["api_no_ca_file"].startswith(
        "cannot reach the coordinator at https://192.0.2.1:8443: TLS: certificate verify failed"), report
    assert report["proxy_refuses_connect"].startswith("proxy 192.0.2.1:8888 refused CONNECT (403"), report
    assert report["no_proxy_bypasses"].startswith("connection refused on 192.0.2.1:7400"), report
    # The proxy really carried it: tinyproxy logged the CONNECT to nginx.
    assert f"CONNECT {HUB}:{TLS_PORT}" in hub.log("tinyproxy"), hub.log("tinyproxy")[-2000:]


# --- whole daemons: a node whose only way out is the proxy, or the TLS terminator -------------

PROXY_NODE = "192.0.2.2"
MEMBERS = {"a": "192.0.2.11", "b": "192.0.2.12", "d": "192.0.2.13"}
TLS_URL = f"https://{HUB}:{TLS_PORT}"
SETTLE = 60.0  # seconds for every session of the network to come up


def _only_way_out(member: MeshNode, address: str, port: int) -> None:
    """In the member's own namespace: out on its wire only TCP to address:port, in only
    that connection's replies."""
    wire = member.node.interfaces[0]
    member.node.nft(f"""table inet tm_only_way_out {{
  chain out {{
    type filter hook output priority 0; policy accept;
    oifname "{wire}" ip daddr {address} tcp dport {port} accept
    oifname "{wire}" counter drop
  }}
  chain in {{
    type filter hook input priority 0; policy accept;
    iifname "{wire}" ip saddr {address} tcp sport {port} ct state established accept
    iifname "{wire}" counter drop
  }}
}}
""")


def _check_reaches_every_peer(mesh: dict[str, MeshNode], ca_file: Path) -> None:
    d = mesh["d"]
    config = tomllib.loads(Path(d.config_path).read_text())["coordinator"]
    assert config == {"url": TLS_URL, "ca_file": str(ca_file)}, config  # what `join --ca-file` wrote
    wait_for_handshakes(mesh, timeout=SETTLE)
    status = d.status()
    coordinator, relay = status["node"]["coordinator"], status["node"]["transports"]["relay"]
    assert coordinator["state"] == "connected" and coordinator["url"] == TLS_URL, coordinator
    assert coordinator["members"] == 3, coordinator  # it got the peer map
    assert relay["state"] == "connected", relay
    assert sorted(p["name"] for p in status["peers"]) == ["a", "b"], status["peers"]
    for peer in ("a", "b"):
        assert rung_of(d, peer) == "relay" and rung_of(mesh[peer], "d") == "relay", diagnostics(mesh)
        pongs = d.tm("ping", peer, "-c", "3", "-i", "0.2", "--timeout", "5", check=False)
        lines = pongs.stdout.strip().splitlines()
        assert pongs.returncode == 0 and len(lines) == 3, f"{pongs.stdout}{pongs.stderr}\n{diagnostics(mesh)}"
        assert all(re.match(rf"pong from {peer} via relay\b", line) and "answer came on" not in line
                   for line in lines), lines
        inner = d.node.run("ping", "-c", "3", "-i", "0.2", "-W", "2", mesh[peer].mesh_ip, check=False)
        assert inner.returncode == 0, f"{inner.stdout}\n{diagnostics(mesh)}"
    print(f"d: {[(p['name'], p['path']) for p in d.status()['peers']]}; a<->b: "
          f"{rung_of(mesh['a'], 'b')}/{rung_of(mesh['b'], 'a')}")


def _members(lab: Lab, switch: Any) -> dict[str, MeshNode]:
    mesh: dict[str, MeshNode] = {}
    for name, address in MEMBERS.items():
        node = lab.add_node(name)
        mesh[name] = MeshNode(node, lab.connect(node, switch, address), "")
    return mesh


def _start_network(mesh: dict[str, MeshNode], ca_file: Path, d_env: dict[str, str], way_out: tuple[str, int]) -> None:
    """a (admin, network on the standalone coordinator behind nginx) and b up, then d
    joined and up with only `way_out` open; d's `tunnelmesh` runs (join, and the
    daemon `up` starts) with `d_env`."""
    a, b, d = mesh["a"], mesh["b"], mesh["d"]
    d.env = d_env
    _only_way_out(d, *way_out)
    a.tm("init", "--name", "a", "--new-key", "--url", TLS_URL, "--external-coordinator", "--ca-file", str(ca_file))
    a.up()
    for member in (b, d):
        member.tm("join", a.tm("invite").stdout.strip(), "--name", member.name, "--new-key",
                  "--ca-file", str(ca_file))
        member.up()
    for member in mesh.values():
        with open(f"{member.node.state_dir}/network.json") as f:
            member.mesh_ip = json.load(f)["member"]["body"]["ipv4"]


def test_a_daemon_whose_only_way_out_is_an_http_proxy_reaches_every_peer_over_the_relay(lab: Lab) -> None:
    _require_tools()
    switch, _, ca_file = _hub_behind_tls(lab)
    proxy_node = lab.add_node("proxy")
    lab.connect(proxy_node, switch, PROXY_NODE)
    proxy = proxy_node.popen("tinyproxy", "-d", "-c", str(_tinyproxy_conf(Path(proxy_node.state_dir), PROXY_NODE)),
                             log_name="tinyproxy")
    _wait_listening(proxy_node, PROXY_PORT, "tinyproxy", proxy, host=PROXY_NODE)
    mesh = _members(lab, switch)
    try:
        _start_network(mesh, ca_file, {"HTTPS_PROXY": f"http://{PROXY_NODE}:{PROXY_PORT}"}, (PROXY_NODE, PROXY_PORT))
        _check_reaches_every_peer(mesh, ca_file)
        # The proxy carried d's connections (join, coordinator API, relay) to nginx, and only d's.
        log = proxy_node.log("tinyproxy")
        assert f"CONNECT {HUB}:{TLS_PORT}" in log and MEMBERS["d"] in log, log[-2000:]
        assert MEMBERS["a"] not in log and MEMBERS["b"] not in log, log[-2000:]
    finally:
        for member in mesh.values():
            member.down(check=False)


def test_a_daemon_whose_only_way_out_is_the_tls_terminator_reaches_every_peer_over_the_relay(lab: Lab) -> None:
    _require_tools()
    switch, _, ca_file = _hub_behind_tls(lab)
    mesh = _members(lab, switch)
    try:
        _start_network(mesh, ca_file, {}, (HUB, TLS_PORT))
        _check_reaches_every_peer(mesh, ca_file)
        # Behind nginx (a trusted proxy) the coordinator saw each member's own address, not nginx's.
        for member in mesh.values():
            observed = member.status()["node"]["coordinator"]["observed"]
            assert observed is not None and observed.startswith(f"{member.underlay}:"), (member.name, observed)
    finally:
        for member in mesh.values():
            member.down(check=False)


# --- the client side, run on `node` ------------------------------------------------------------


async def _relay_error(url: str, ca_file: str | None, identity: Any, network: str) -> str:
    """The error a RelayClient reports for `url` (after its first attempt)."""
    from tests.coordinator.test_relay import Sink
    from tunnelmesh.links.relay import RelayClient

    client = RelayClient(url, identity, network, Sink(), ca_file=ca_file)
    task = asyncio.create_task(client.run())
    try:
        for _ in range(300):
            if client.error is not None or client.state == "connected":
                break
            await asyncio.sleep(0.05)
        return client.error or client.state
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _relay_roundtrip(url: str, ca_file: str | None, nodes: Any, network: str) -> str:
    """Two members' RelayClients connect through `url` and exchange one message each way."""
    from tests.coordinator.test_relay import Sink
    from tunnelmesh.links.relay import RelayClient

    sinks = [Sink(), Sink()]
    clients = [RelayClient(url, nodes[i], network, sinks[i - 1], ca_file=ca_file) for i in (1, 2)]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    try:
        for _ in range(300):
            if all(c.state == "connected" for c in clients):
                break
            await asyncio.sleep(0.05)
        else:
            return f"not connected: {[c.error for c in clients]}"
        clients[0].link(nodes[2].public.wg_public_key).send(b"\x04one to two")
        clients[1].link(nodes[1].public.wg_public_key).send(b"\x04two to one")
        for _ in range(200):
            if sinks[0].received and sinks[1].received:
                break
            await asyncio.sleep(0.05)
        got = (sinks[1].received, sinks[0].received)
        want = ([(nodes[1].public.wg_public_key, b"\x04one to two")], [(nodes[2].public.wg_public_key, b"\x04two to one")])
        return "ok" if got == want else f"received {got!r}"
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _api(url: str, ca_file: str | None, identity: Any) -> str:
    from tunnelmesh.coordinator.client import Coordinator, CoordinatorError

    try:
        async with Coordinator(url, identity=identity, ca_file=ca_file) as coordinator:
            update = await coordinator.map(0, 0)
    except CoordinatorError as exc:
        return str(exc)
    return "ok" if len(update["members"]) == 3 else f"map: {update}"


def _proxies(**variables: str) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        os.environ.pop(name, None)
    os.environ.update(variables)


async def client_side(ca_file: str, world: Any) -> dict[str, str]:
    import tempfile

    from tests.support.coordinator import AdminMachine, join, set_up

    plain, tls = f"http://{HUB}:{COORDINATOR_PORT}", f"https://{HUB}:{TLS_PORT}"
    network = world.network.network
    report: dict[str, str] = {}

    _proxies()
    report["direct"] = await _api(plain, None, world.nodes[1])
    report["direct"] = report["direct"].removeprefix(f"cannot reach the coordinator at {plain}: ")

    _proxies(HTTP_PROXY=PROXY)  # plain HTTP through the proxy (absolute-form requests)
    admin_node = await set_up(plain, world)
    machine = AdminMachine.create(Path(tempfile.mkdtemp()) / "admin", plain, world, admin_node)
    async with machine.admitting():  # the admin's machine countersigns joins with an invite
        for i, name in ((1, "one"), (2, "two")):
            await join(plain, world, i, world.invite(), name)
    report["api_via_proxy"] = await _api(plain, None, world.nodes[1])
    report["relay_via_proxy_plain"] = await _relay_error(plain, None, world.nodes[1], network)

    _proxies(https_proxy=PROXY)  # TLS through the proxy's CONNECT, to nginx
    report["relay_via_proxy_and_tls"] = await _relay_roundtrip(tls, ca_file, world.nodes, network)
    report["api_via_proxy_and_tls"] = await _api(tls, ca_file, world.nodes[1])
    report["no_ca_file"] = await _relay_error(tls, None, world.nodes[1], network)
    report["api_no_ca_file"] = await _api(tls, None, world.nodes[1])
    # The proxy allows CONNECT only to the TLS port.
    report["proxy_refuses_connect"] = await _relay_error(f"https://{HUB}:{COORDINATOR_PORT}", ca_file,
                                                         world.nodes[1], network)
    _proxies(HTTP_PROXY=PROXY, NO_PROXY=f"{HUB}:{COORDINATOR_PORT}")  # NO_PROXY: straight at the blocked port
    report["no_proxy_bypasses"] = await _relay_error(plain, None, world.nodes[1], network)
    return report


if __name__ == "__main__":
    from tests.support.coordinator import World

    world = World.create()  # outside the loop: making its identities runs loops of their own
    print(json.dumps(asyncio.run(asyncio.wait_for(client_side(sys.argv[1], world), 120))))
