"""The relay and the coordinator API where only HTTP(S) gets out, in the netns lab.

`hub` (192.0.2.1) runs a standalone coordinator on :7400, real Debian tinyproxy
on :8888 (an HTTP proxy that CONNECTs only to :8443) and real nginx on :8443
terminating TLS (certificates made at test time by a private CA) in front of the
coordinator, WebSocket upgrade included. nftables on the hub refuses :7400 from
the wire, so `node` (192.0.2.2) reaches the coordinator only through a proxy.

On `node` this file runs as a script (`client_side`): it sets up the network and
joins two members through the proxy, then relays between them over each path
and reports what worked and the errors the failing paths gave, as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable
from tests.support.tls import make_ca, make_server
from tools.lab import Lab, clean_environment, find_tool

HUB = "192.0.2.1"
COORDINATOR_PORT = 7400
PROXY_PORT = 8888
TLS_PORT = 8443
PROXY = f"http://{HUB}:{PROXY_PORT}"
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


# --- the test: the hub's services, and the client script's report -----------------------------


def _tinyproxy_conf(directory: Path) -> Path:
    conf = directory / "tinyproxy.conf"
    conf.write_text(f"Port {PROXY_PORT}\nListen {HUB}\nTimeout 60\nAllow 192.0.2.0/24\nConnectPort {TLS_PORT}\n"
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
            proxy_read_timeout 120s;
        }}
    }}
}}
""")
    return conf


def _wait_listening(node: Any, port: int, what: str, process: Any) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        probe = node.run("python3", "-c", f"import socket; socket.create_connection(('{HUB}', {port}), timeout=1)",
                         check=False)
        if probe.returncode == 0:
            return
        if process.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"{what} did not start:\n{node.log(process.log_name)[-3000:]}")


def test_relay_and_api_through_an_http_proxy_and_tls_termination(lab: Lab) -> None:
    missing = [tool for tool in ("tinyproxy", "nginx") if find_tool(tool) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)} (run tools/setup.sh)")
    switch = lab.add_switch("sw", "192.0.2.0/24")
    hub, node = lab.add_node("hub"), lab.add_node("node")
    lab.connect(hub, switch, HUB)
    lab.connect(node, switch, "192.0.2.2")
    work = Path(hub.state_dir)
    ca = make_ca()
    ca_file, _ = ca.write(work, "ca")
    cert, key = make_server(ca, HUB).write(work, "server")

    # Only the hub itself (the proxies) may reach the coordinator's port.
    hub.nft(f"""table inet relaytest {{
        chain input {{ type filter hook input priority 0; policy accept;
            iifname "eth0" tcp dport {COORDINATOR_PORT} reject with tcp reset
        }}
    }}""")
    coordinator = hub.popen(sys.executable, "-m", "tunnelmesh", "coordinator", "--listen",
                            f"{HUB}:{COORDINATOR_PORT}", "--db", str(work / "coordinator.db"), log_name="coordinator")
    _wait_listening(hub, COORDINATOR_PORT, "the coordinator", coordinator)
    proxy = hub.popen("tinyproxy", "-d", "-c", str(_tinyproxy_conf(work)), log_name="tinyproxy")
    _wait_listening(hub, PROXY_PORT, "tinyproxy", proxy)
    nginx = hub.popen("nginx", "-e", "stderr", "-p", str(work), "-c", str(_nginx_conf(work, cert, key)),
                      "-g", "daemon off;", log_name="nginx")
    _wait_listening(hub, TLS_PORT, "nginx", nginx)

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
    from tests.support.coordinator import join, set_up

    plain, tls = f"http://{HUB}:{COORDINATOR_PORT}", f"https://{HUB}:{TLS_PORT}"
    network = world.network.network
    report: dict[str, str] = {}

    _proxies()
    report["direct"] = await _api(plain, None, world.nodes[1])
    report["direct"] = report["direct"].removeprefix(f"cannot reach the coordinator at {plain}: ")

    _proxies(HTTP_PROXY=PROXY)  # plain HTTP through the proxy (absolute-form requests)
    await set_up(plain, world)
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
