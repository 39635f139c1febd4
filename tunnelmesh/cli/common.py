"""What every group of `tunnelmesh` commands shares: errors, exit codes, running a coroutine
or a blocking call, the node's config and identity."""

from __future__ import annotations

from typing import Any

from tunnelmesh.config import ConfigError, load_config
from tunnelmesh.paths import Paths


EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def _run(coro: Any) -> Any:
    """Run a network operation; its refusals become CLI errors with their message."""
    import asyncio  # lazily: most commands, `up --detach` too, run no event loop

    from tunnelmesh.coordinator.client import CoordinatorError
    from tunnelmesh.membership import MembershipError
    from tunnelmesh.netstate import StateError
    from tunnelmesh.network import NetworkError

    try:
        return asyncio.run(coro)
    except (NetworkError, MembershipError, StateError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except CoordinatorError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None


def _run_local(function: Any, *args: Any) -> Any:
    """A local network operation; its refusal becomes a CLI error with its message."""
    from tunnelmesh.network import NetworkError

    try:
        return function(*args)
    except NetworkError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _load(paths: Paths) -> Any:
    try:
        return load_config(paths.config, state_dir=paths.state_dir)
    except ConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


def _identity(config: Any) -> Any:
    import asyncio  # lazily: most commands, `up --detach` too, run no event loop

    from tunnelmesh.identity import IdentityError, load_identity

    try:
        return asyncio.run(load_identity(config.identity, passphrase_file=config.passphrase_file,
                                         agent_path=config.agent_socket))
    except IdentityError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None

_WRITES_STATE = frozenset({"init", "join", "invite", "invites", "approve", "revoke", "rotate-secret"})


def _check_state_dir(paths: Paths, *, create: bool = True) -> None:
    from tunnelmesh.files import FileError, check_state_dir

    try:
        check_state_dir(paths.state_dir, create=create)
    except FileError as exc:
        raise CliError(str(exc), EXIT_FAIL) from None
