"""`tunnelmesh wg-export NAME`: admit a plain WireGuard device and print its wg-quick
config and a QR code of it (tunnelmesh.exports.wg, docs/exports.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunnelmesh.paths import Paths

from .common import EXIT_OK, _run, _run_local


def cmd_wg_export(args: argparse.Namespace, paths: Paths) -> int:
    from tunnelmesh.exports.wg import export_device, qr_code, write_config

    export = _run(export_device(paths, args.name, via=args.via, endpoint=args.endpoint, public_key=args.public_key))
    if args.out is not None:
        _run_local(write_config, Path(args.out), export)
    if args.json:
        print(json.dumps(export.to_json(), indent=2))
        return EXIT_OK
    device = export.device
    print(f"admitted {device.name} as {device.ipv4} / {device.ipv6}, served by {export.server_name} at "
          f"{export.endpoint}; `tunnelmesh revoke {device.name}` removes it", file=sys.stderr)
    if args.out is not None:
        print(f"wrote its wg-quick config to {args.out} (0600)", file=sys.stderr)
    else:
        print(export.config())
    if export.private_key is None:
        print("no QR code: the config lacks the device's private key (--public-key); add it on the device",
              file=sys.stderr)
    elif not args.no_qr:
        print(qr_code(export.qr_text()))
    return EXIT_OK
