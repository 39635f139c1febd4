"""The NAT lab's routers do what their NAT type says (tools/natlab.py).

One lab holds a router of every type, each with one node behind it, and one outside
host running a UDP reflector (and TCP listeners) on two addresses plus coturn. From each
inside node, raw UDP sockets show the type's defining behaviour:

- mapping: the address:port the reflector saw for two destinations (same for the cone
  types, and the node's own port kept; for the symmetric type a new random port of the
  whole range for each: two different ones);
- filtering: before answering, the reflector sends to the seen address from another
  port of the same address ("port"), from its other address ("addr"), and to a port the
  node never sent from ("cold"); what arrives shows the filter;
- udp-blocked and tcp-web-only let no UDP out, and TCP to 80/443 only for the latter.

coturn's RFC 5780 verdict (turnutils_natdiscovery) is checked against each type, and
conntrack flushing and roaming to another router are shown to act.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from tools.natlab import BEHAVIOUR, NAT_TYPES, NatLab, flush_conntrack, natdiscovery, start_coturn

# On the outside host. Datagrams to (a1, 5000) "probe <cold port>": first the filtering
# probes, then the answer "seen <ip:port>" (last, so that the client knows the probes
# were sent before it). Datagrams to (a2, 5000): only the answer.
REFLECTOR = r"""
import select, socket, sys, time
a1, a2 = sys.argv[1], sys.argv[2]
def udp(address, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    return sock
main, alt_port, alt_addr = udp(a1, 5000), udp(a1, 5001), udp(a2, 5000)
tcp = [socket.create_server((a1, port)) for port in (80, 443, 8080)]
print("ready", flush=True)
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    readable, _, _ = select.select([main, alt_addr, *tcp], [], [], 1)
    for sock in readable:
        if sock in tcp:
            conn, _ = sock.accept()
            conn.close()
            continue
        data, peer = sock.recvfrom(2048)
        if sock is main:
            alt_port.sendto(b"port", peer)
            alt_addr.sendto(b"addr", peer)
            cold = int(data.split()[1])
            if cold:
                main.sendto(b"cold", (peer[0], cold))
        sock.sendto(f"seen {peer[0]}:{peer[1]}".encode(), peer)
"""

# In an inside node: one socket sends to both destinations; a second, silent socket is
# the "cold" port. Prints what the reflector saw and which probes came in, then TCP.
CLIENT = r"""
import json, select, socket, sys, time
a1, a2 = sys.argv[1], sys.argv[2]
sock, cold = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
sock.bind(("0.0.0.0", int(sys.argv[3])))
cold.bind(("0.0.0.0", 0))
result = {"local": sock.getsockname()[1], "seen": [], "inbound": []}
def exchange(destination, payload):
    sock.sendto(payload, destination)
    end = time.monotonic() + 2.0
    while (left := end - time.monotonic()) > 0:
        for ready in select.select([sock, cold], [], [], left)[0]:
            data = ready.recv(2048).decode()
            if data.startswith("seen "):
                result["seen"].append(data[5:])
                end = time.monotonic() + 0.3  # the probes went out before the answer
            else:
                result["inbound"].append(data)
exchange((a1, 5000), f"probe {cold.getsockname()[1]}".encode())
exchange((a2, 5000), b"probe 0")
result["tcp"] = {}
for port in (80, 443, 8080):
    try:
        socket.create_connection((a1, port), timeout=2).close()
        result["tcp"][port] = True
    except OSError:
        result["tcp"][port] = False
print(json.dumps(result))
"""

# Which of the filtering probes reach the node.
INBOUND = {
    "none": {"port", "addr", "cold"},
    "full-cone": {"port", "addr"},
    "address-restricted": {"port"},
    "port-restricted": set(),
    "symmetric": set(),
    "udp-blocked": set(),
    "tcp-web-only": set(),
}


def probe(node, a1: str, a2: str, port: int = 0) -> dict:
    out = node.run(sys.executable, "-c", CLIENT, a1, a2, str(port), timeout=30).stdout
    return json.loads(out)


LISTENER = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", int(sys.argv[1])))
sock.settimeout(float(sys.argv[2]))
print("listening", flush=True)
try:
    print("got", sock.recv(64).decode(), flush=True)
except TimeoutError:
    print("got nothing", flush=True)
"""
SENDER = "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); " \
         "s.bind((sys.argv[1], 5002)); s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))"


def unsolicited(node, sender, source: str, to: str, port: int, payload: str, wait: float) -> str:
    """Send `payload` from `sender` (source:5002) to to:port while `node` listens on
    `port` for up to `wait` seconds; what it got, or "nothing"."""
    listener = node.popen(sys.executable, "-c", LISTENER, str(port), str(wait), log_name=f"listen-{payload}")
    node.wait_for_log(listener.log_name, r"listening")
    sender.run(sys.executable, "-c", SENDER, source, to, str(port), payload)
    return node.wait_for_log(listener.log_name, r"got \S+", timeout=wait + 10).split("got ", 1)[1].strip()


def check_type(nat_type: str, result: dict, node_address: str, public: str) -> None:
    where = f"{nat_type}: {result}"
    seen = [tuple(s.rsplit(":", 1)) for s in result["seen"]]
    assert set(result["inbound"]) == INBOUND[nat_type], where
    if nat_type in ("udp-blocked", "tcp-web-only"):
        assert seen == [], where
    else:
        assert len(seen) == 2, where
        expected_ip = node_address if nat_type == "none" else public
        assert {ip for ip, _ in seen} == {expected_ip}, where
        ports = [int(port) for _, port in seen]
        if nat_type == "symmetric":
            assert ports[0] != ports[1], where  # a new mapping per destination
        else:
            assert ports == [result["local"]] * 2, where  # one mapping, the node's own port kept
    web = {int(p): ok for p, ok in result["tcp"].items()}
    assert web == ({80: True, 443: True, 8080: nat_type != "tcp-web-only"}), where


def test_every_nat_type_behaves_as_named(lab) -> None:
    nat = NatLab(lab)
    internet = nat.add_public("internet", addresses=2)
    a1, a2 = internet.addresses
    reflector = internet.popen(sys.executable, "-c", REFLECTOR, a1, a2, log_name="reflector")
    internet.wait_for_log("reflector", r"^ready$")
    start_coturn(internet, a1, a2)
    sites = {t: nat.add_site(f"r-{t}", t) for t in NAT_TYPES}
    nodes = {t: nat.add_inside_node(site, f"n-{t}") for t, site in sites.items()}

    with ThreadPoolExecutor(len(NAT_TYPES) * 2) as pool:
        probes = {t: pool.submit(probe, node, a1, a2) for t, node in nodes.items()}
        verdicts = {t: pool.submit(natdiscovery, node, a1) for t, node in nodes.items()}
        results = {t: f.result() for t, f in probes.items()}
        coturn = {t: f.result() for t, f in verdicts.items()}
    assert reflector.poll() is None, internet.log("reflector")
    for t in NAT_TYPES:
        check_type(t, results[t], nodes[t].addresses[0], sites[t].public)
    seen_by_coturn = {t: (v.mapping, v.filtering) for t, v in coturn.items()}
    assert seen_by_coturn == BEHAVIOUR, "\n\n".join(f"== {t}\n{v.output}" for t, v in coturn.items())

    # Flushing the full cone's conntrack and sets forgets its mappings: inbound from the
    # other address to the port that was open comes in before the flush, not after.
    cone, router = nodes["full-cone"], sites["full-cone"].router
    assert "addr" in probe(cone, a1, a2, port=41000)["inbound"]
    assert unsolicited(cone, internet, a2, sites["full-cone"].public, 41000, "early", wait=5) == "early"
    flush_conntrack(router)
    assert router.run("conntrack", "-C").stdout.strip() == "0"
    assert unsolicited(cone, internet, a2, sites["full-cone"].public, 41000, "late", wait=1.5) == "nothing"

    # Roaming: the public node moves behind a new port-restricted router; the reflector
    # now sees that router's address, and the old link is gone.
    roam = nat.add_site("r-roam", "port-restricted")
    new_address = nat.move(nodes["none"], roam)
    assert nodes["none"].addresses == [new_address]
    check_type("port-restricted", probe(nodes["none"], a1, a2), new_address, roam.public)
