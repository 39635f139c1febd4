"""`up`: the daemon in the foreground, or started in the background (`--detach`).

Imports little (tests/unit/test_startup_imports.py): `up --detach` starts the daemon
process first and imports what it waits with (the control client) while that starts;
the time until the first packet gets through counts from the command's start.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from tunnelmesh.files import FileError, lock_dir, read_pid
from tunnelmesh.paths import Paths

from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, _check_state_dir


def cmd_up(args: argparse.Namespace, paths: Paths) -> int:
    if os.geteuid() != 0:
        raise CliError("tunnelmesh up needs root (or CAP_NET_ADMIN) to create the TUN device; try sudo", EXIT_FAIL)
    if args.detach:
        return _up_detached(args, paths)
    import asyncio  # lazily: most commands, `up --detach` too, run no event loop

    from actors.daemon import StartupError, configure_logging, run_daemon
    from actors.spin import SpinningLoop

    configure_logging(args.log_level)
    try:
        with asyncio.Runner(loop_factory=SpinningLoop) as runner:  # polls briefly before it sleeps: actors/spin.py
            return runner.run(run_daemon(paths))
    except StartupError as exc:
        raise CliError(str(exc), EXIT_USAGE if "config" in str(exc) or ".toml" in str(exc) else EXIT_FAIL) from None
    except KeyboardInterrupt:
        return EXIT_OK


#: How often `up --detach` asks whether the daemon answers yet (s): a refused connect to a
#: socket not there yet costs microseconds, a coarse poll would add its whole period to
#: the connect time.
READY_POLL = 0.02


def _up_detached(args: argparse.Namespace, paths: Paths) -> int:
    _check_state_dir(paths)
    # Checked here, not only in the child: otherwise the running daemon would answer
    # the readiness check below and this would report success while the child exits.
    # A pid file or control socket without the lock is what a killed daemon left: the
    # child removes them.
    try:
        probe = lock_dir(paths.state_dir)
    except FileError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None
    if probe is None:
        pid = read_pid(paths.pid_file)
        raise CliError(f"tunnelmesh is already running with state dir {paths.state_dir}"
                       f"{f' (pid {pid})' if pid is not None else ''}; stop it with `tunnelmesh down`", EXIT_FAIL)
    os.close(probe)
    log_path = paths.log_file
    argv = [sys.executable, "-m", "tunnelmesh", "--state-dir", str(paths.state_dir), "--config", str(paths.config),
            "up", "--log-level", args.log_level]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    # While the daemon starts: the control client, which the command needs only from here on.
    from tunnelmesh import control_client
    from tunnelmesh.control_client import ControlError, request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise CliError("tunnelmesh failed to start:\n  " + "\n  ".join(tail), EXIT_FAIL)
        try:
            answer = request(paths.control_socket, "ping_daemon", timeout=1)
        except ControlError:
            time.sleep(READY_POLL)
            continue
        if answer != "running":  # it waits for the ssh-agent: returns now, it comes up once the key is there
            print(f"tunnelmesh started (pid {process.pid}, log {log_path}) and is {answer}; it comes up by "
                  "itself then (`tunnelmesh status` says how it stands, `tunnelmesh down` stops it)")
            return EXIT_OK
        print(f"tunnelmesh up (pid {process.pid}, log {log_path})")
        filter_status = control_client.status(paths.control_socket).filter
        if filter_status is not None:  # what a network from before the filter most needs to hear
            print(f"packet filter: {filter_status.in_force}")
        return EXIT_OK
    raise CliError(f"tunnelmesh did not come up within 30 s; see {log_path}", EXIT_FAIL)
