"""No state is lost to bad input (issue 17, part 2; docs/architecture.md "State files and
damage"): a revoked node that tries to join again keeps every file until the new join has
been checked whole, and the daemon's start refuses damaged state it cannot get back, with
an error that names the file and says what to do, while a damaged peer map cache (the
coordinator gives it back) is only ignored.

Real coordinator (aiohttp over SQLite on 127.0.0.1), real SSH keys, the real `join`."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import asyncssh
import pytest

from tests.support.coordinator import World, now, serving
from tunnelmesh.membership import AdminKey, MembershipError, Token, make_invite
from tunnelmesh.netstate import NetworkState, load_peer_map, save_revocations
from tunnelmesh.network import NetworkError, join, revoke
from tunnelmesh.paths import Paths

#: What a revoked node's failed join must leave as it was, byte for byte.
KEPT = ("network.json", "peermap.json", "tunnelmesh.toml", "revocations.json", "bindings.json", "network.secret")


def key_file(directory: Path) -> str:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "identity_ed25519"
    path.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    os.chmod(path, 0o600)
    return str(path)


def contents(paths: Paths) -> dict[str, bytes]:
    return {name: (paths.state_dir / name).read_bytes() for name in KEPT}


def invite(world: World, url: str, *, created: int | None = None, uses: int = 1, expires_in: int = 3600) -> str:
    """A token the admin's machine made (kept in its ledger), for the coordinator at `url`."""
    made = now() - 10 if created is None else created
    token = make_invite(world.admin, url, name=None, expires=made + expires_in, uses=uses, now=made)
    world.invites.append(token.grant)
    return token.encode()


async def joined(paths: Paths, token: str, key: str) -> NetworkState:
    return (await join(paths, token_or_url=token, name="j", identity_spec=key, listen_port=51820, wait=20)).state


def test_a_revoked_nodes_join_with_a_bad_token_deletes_nothing_and_a_good_one_replaces_it(tmp_path: Path) -> None:
    world = World.create()  # its identities are made outside the loop

    async def scenario() -> None:
        paths = Paths(tmp_path / "j", tmp_path / "j" / "tunnelmesh.toml")
        key = key_file(paths.state_dir)
        async with serving(tmp_path / "coordinator.db", world) as served:
            old_reusable = invite(world, served.url, uses=0)
            first = await joined(paths, invite(world, served.url), key)
            revocation = await revoke(served.machine.paths, "j")
            save_revocations(paths.revocations, [revocation])  # as the node's daemon keeps it on the next map
            assert load_peer_map(paths.peer_map_cache, first)[0].revoked(first.member) is not None
            before = contents(paths)

            real = Token.parse(invite(world, served.url))
            stretched = {**real.grant, "body": {**real.grant["body"], "uses": 0}}  # not what the admin signed
            forged = Token(served.url, real.network, stretched, real.invite_seed).encode()
            other = make_invite(AdminKey.generate(), served.url, name=None, expires=now() + 600, uses=1, now=now())
            refused = {
                "tmjoin-not-a-token": (MembershipError, "not a join token"),
                forged: (NetworkError, "not signed by this network's admin key"),
                other.encode(): (NetworkError, "another network|not this network"),
                invite(world, served.url, created=now() - 7200): (NetworkError, "the invite expired"),
                old_reusable: (Exception, "revoked"),  # older than the revocation: the coordinator refuses it
            }
            for token, (error, says) in refused.items():
                with pytest.raises(error, match=says):
                    await joined(paths, token, key)
                assert contents(paths) == before, f"a refused join ({says}) changed the node's files"

            deadline = time.monotonic() + 5  # a new invite must be made after the revocation
            while now() <= revocation.at and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            again = await joined(paths, invite(world, served.url, created=now()), key)
        assert again.member.authorized_at > revocation.at
        after = contents(paths)
        assert after["network.json"] != before["network.json"] and after["tunnelmesh.toml"]
        peer_map, _ = load_peer_map(paths.peer_map_cache, NetworkState.load(paths.network_state))
        assert peer_map.revoked(again.member) is None
        assert peer_map.revocations_of(again.member) == [revocation]  # the old revocation is kept

    asyncio.run(scenario())
