"""`policy show/set/edit` (the admin-signed network policy) and `filter show/test` (this
node's packet filter, through the daemon)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from actors.messages import to_json
from tunnelmesh import control_client
from tunnelmesh.paths import Paths

from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, _run, _run_local




# --- the network policy ----------------------------------------------------------------------


def cmd_policy_show(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import kept_policy

    state, record = _run_local(kept_policy, paths)
    if args.json:
        shown = None if record is None else {"network": record.network, "version": record.version,
                                             "issued": record.issued, "text": record.text}
        print(json.dumps(shown, indent=2))
        return EXIT_OK
    if record is None:
        print(f"network {state.network.network}: no network policy set (a network made before the packet filter): "
              "every member reaches every port of every other member, as before, unless a node's own [filter] "
              "rules say otherwise; the admin sets one with `tunnelmesh policy set FILE`")
        return EXIT_OK
    issued = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(record.issued))
    print(f"# network policy v{record.version}, issued {issued}, signed by the admin key of network {record.network} "
          "(verified by this node)")
    print(record.text, end="" if record.text.endswith("\n") else "\n")
    return EXIT_OK


def cmd_policy_set(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.network import read_policy_file, set_policy

    path = Path(args.file)
    text = _run_local(read_policy_file, path)
    return _policy_sent(*_run(set_policy(paths, text, path)))


def cmd_policy_edit(args: argparse.Namespace, paths: Paths) -> int:
    import shlex
    import tempfile

    from tunnelmesh.filter import STARTER_POLICY
    from tunnelmesh.network import NetworkError, check_policy, policy_for_edit, set_policy

    current = _run(policy_for_edit(paths))
    base = current.text if current is not None else STARTER_POLICY
    editor = shlex.split(os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi")
    fd, name = tempfile.mkstemp(prefix="tunnelmesh-policy-", suffix=".toml")
    draft = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(base)
    while True:
        if subprocess.run([*editor, str(draft)], check=False).returncode != 0:
            raise CliError(f"the editor ({' '.join(editor)}) failed: nothing was sent; your edit is in {draft}")
        text = draft.read_text(errors="replace")
        if text == base:
            draft.unlink()
            print("no change: nothing was sent")
            return EXIT_OK
        try:
            check_policy(text, draft)
            break
        except NetworkError as exc:
            print(f"tunnelmesh: {exc}", file=sys.stderr)
        if not _ask("edit it again? [Y/n] "):
            raise CliError(f"nothing was sent; your edit is in {draft}", EXIT_USAGE)
    sent = _run(set_policy(paths, text, draft, based_on=current.version if current is not None else 0))
    draft.unlink()
    return _policy_sent(*sent)


def _ask(question: str) -> bool:
    """A yes (the default) from the terminal; no without one (stdin closed or not a terminal)."""
    if not sys.stdin.isatty():
        return False
    try:
        return input(question).strip().lower() in ("", "y", "yes")
    except EOFError:
        return False


def _policy_sent(record: Any, sent: str) -> int:
    if sent == "unchanged":
        print(f"network policy v{record.version} already has this text: nothing was sent")
    elif sent == "re-sent":
        print(f"network policy v{record.version} already has this text, but the coordinator held an older version "
              f"or none (restored from an older backup?): v{record.version} was sent to it again")
    else:
        print(f"network policy v{record.version} set: every node takes it within seconds "
              "(`tunnelmesh policy show` on a node shows what it verified)")
    return EXIT_OK


# --- filter ---------------------------------------------------------------------------


def cmd_filter_show(args: argparse.Namespace, paths: Paths) -> int:
    rules = control_client.filter_show(paths.control_socket)
    if args.json:
        print(json.dumps(to_json(rules), indent=2))
        return EXIT_OK
    print(f"packet filter: {rules.in_force}")
    if not rules.enabled:
        return EXIT_OK
    print("rules, in evaluation order (new flows admitted):" if rules.rules else "no rules: only replies come in")
    for rule in rules.rules:
        print(f"  {rule.rule}  ({rule.hits})")
    for peer in rules.peers:
        print(f"{peer.peer} may open here:")
        for o in peer.origins:
            if o.spoofed:
                print(f"  from {o.origin}: nothing (another member's address: dropped as spoofed)")
                continue
            opens = [f"tcp {o.tcp}" if o.tcp else "", f"udp {o.udp}" if o.udp else "", "icmp echo" if o.icmp else "",
                     "icmpv6 echo" if o.icmpv6 else ""]
            print(f"  from {o.origin}: {', '.join(x for x in opens if x) or 'nothing (replies only)'}")
    return EXIT_OK


def cmd_filter_test(args: argparse.Namespace, paths: Paths) -> int:
    if args.proto in ("tcp", "udp") and args.port is None:
        raise CliError(f"a port is needed for {args.proto}: tunnelmesh filter test {args.peer} {args.proto} PORT",
                       EXIT_USAGE)
    verdict = control_client.filter_test(paths.control_socket, args.peer, args.proto, args.port)
    if args.json:
        print(json.dumps(to_json(verdict), indent=2))
    else:
        what = f"{verdict.proto}/{verdict.port}" if verdict.proto in ("tcp", "udp") else f"{verdict.proto} echo"
        print(f"{what} from {verdict.peer}: {'allowed' if verdict.allowed else 'denied'}: {verdict.reason}")
    return EXIT_OK if verdict.allowed else EXIT_FAIL
