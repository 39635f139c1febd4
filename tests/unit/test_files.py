"""Files written as root (`tunnelmesh.files` and its users): no planted symlink or hard link
is ever followed, a state directory others can write to is refused, and the SSH bridge's
setup neither takes over someone's account nor follows a symlink when it fixes modes.

The bridge tests use a stand-in account (pwd.getpwnam patched) whose home is a temp
directory, so they need no real account; its uid is this process's, so they also run
without root."""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tunnelmesh import cli, files
from tunnelmesh.cli import network as cli_network
from tunnelmesh.config import ConfigError, read_network_secret, write_network_secret
from tunnelmesh.files import FileError, FileExists, check_state_dir, write_atomic
from tunnelmesh.links import bridge
from tunnelmesh.links.bridge import BridgeError, setup_account, write_authorized_keys
from tunnelmesh.netstate import StateError, save_network_secret
from tunnelmesh.netstate import write_atomic as netstate_write_atomic
from tunnelmesh.paths import resolve_paths

VICTIM = b"root's file, which nobody may change\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "victim"
    path.parent.mkdir()
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


def _unchanged(victim: Path) -> None:
    assert victim.read_bytes() == VICTIM
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


def _planted_names(monkeypatch: pytest.MonkeyPatch, names: list[str]) -> None:
    """The next temp names `files` picks are `names` (then random ones again): an attacker
    who guessed them has planted something there."""
    queue = list(names)
    real = files._temp_name
    monkeypatch.setattr(files, "_temp_name", lambda name: queue.pop(0) if queue else real(name))


# --- the one writer ------------------------------------------------------------------------


@pytest.mark.parametrize("writer", ["files", "netstate", "secret"])
def test_symlink_at_the_old_fixed_temp_name_is_not_followed(tmp_path: Path, victim: Path, writer: str) -> None:
    """The writer used `.<name>.tmp`, opened O_TRUNC without O_NOFOLLOW: a symlink there
    made root truncate and overwrite its target."""
    target = tmp_path / "network.secret"
    (tmp_path / ".network.secret.tmp").symlink_to(victim)
    secret = bytes(range(32))
    if writer == "files":
        write_atomic(target, b"new\n", 0o600)
    elif writer == "netstate":
        netstate_write_atomic(target, b"new\n", secret=True)
    else:
        save_network_secret(target, secret)
    _unchanged(victim)
    assert not target.is_symlink() and stat.S_IMODE(target.stat().st_mode) == 0o600
    if writer == "secret":
        assert read_network_secret(target) == secret


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "file"])
def test_anything_planted_at_a_predicted_temp_name_is_never_used(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch, plant: str
) -> None:
    """Even if the random temp name were guessed: O_EXCL|O_NOFOLLOW refuses whatever is
    there (a hard link to root's file would otherwise be truncated and rewritten), and
    another name is tried."""
    guessed = ".state.json.guessed.tmp"
    if plant == "symlink":
        (tmp_path / guessed).symlink_to(victim)
    elif plant == "hardlink":
        os.link(victim, tmp_path / guessed)
    else:
        (tmp_path / guessed).write_bytes(VICTIM)
    _planted_names(monkeypatch, [guessed])
    write_atomic(tmp_path / "state.json", b"{}\n")
    _unchanged(victim)
    assert (tmp_path / "state.json").read_bytes() == b"{}\n"
    assert (tmp_path / guessed).is_symlink() or (tmp_path / guessed).read_bytes() == VICTIM  # left alone


def test_every_temp_name_taken_is_an_error_not_a_follow(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f".f.planted{i}.tmp" for i in range(files._TEMP_TRIES)]
    for name in names:
        (tmp_path / name).symlink_to(victim)
    _planted_names(monkeypatch, names)
    with pytest.raises(FileError, match="something is planting files there"):
        write_atomic(tmp_path / "f", b"x")
    _unchanged(victim)
    assert not (tmp_path / "f").exists()


def test_a_symlink_at_the_target_is_replaced_not_followed(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "peermap.json").symlink_to(victim)
    write_atomic(tmp_path / "peermap.json", b"[]\n")
    _unchanged(victim)
    assert not (tmp_path / "peermap.json").is_symlink()
    assert (tmp_path / "peermap.json").read_bytes() == b"[]\n"


def test_replace_false_keeps_what_is_there_and_never_follows(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "key").write_bytes(b"old")
    with pytest.raises(FileExists, match="refusing to overwrite"):
        write_atomic(tmp_path / "key", b"new", 0o600, replace=False)
    assert (tmp_path / "key").read_bytes() == b"old"
    dangling = tmp_path / "elsewhere" / "made-by-root"
    (tmp_path / "link").symlink_to(dangling)
    with pytest.raises(FileExists):
        write_atomic(tmp_path / "link", b"new", 0o600, replace=False)
    assert not dangling.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "key", "link"]


def test_secret_mode_from_creation_whatever_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    modes: list[int] = []
    real_fchmod = os.fchmod

    def spy(fd: int, mode: int) -> None:
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))  # as created, before the fchmod
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", spy)
    old = os.umask(0)
    try:
        write_atomic(tmp_path / "s", b"secret", 0o600)
    finally:
        os.umask(old)
    assert modes == [0o600]
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o600


def test_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f").write_bytes(b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FileError, match="No space left on device.*previous version is kept"):
        write_atomic(tmp_path / "f", b"new")
    assert (tmp_path / "f").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_the_directory_is_fsynced_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[bool] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_atomic(tmp_path / "f", b"x")
    assert synced == [False, True]  # the file's data, then its new name


def test_network_secret_writer_uses_it(tmp_path: Path, victim: Path) -> None:
    (tmp_path / ".network.secret.tmp").symlink_to(victim)
    secret = write_network_secret(tmp_path / "network.secret")
    assert read_network_secret(tmp_path / "network.secret") == secret
    _unchanged(victim)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere" / "new")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_network_secret(tmp_path / "link")
    assert not (tmp_path / "elsewhere" / "new").exists()


def test_imported_secret_does_not_follow_a_symlink(tmp_path: Path, victim: Path) -> None:
    """`init --static --secret-file` copied the secret with O_TRUNC, following a symlink."""
    source = tmp_path / "given.secret"
    source.write_bytes(base64.b64encode(bytes(range(32))) + b"\n")
    source.chmod(0o600)
    target = tmp_path / "network.secret"
    target.symlink_to(victim)
    cli_network._import_secret(source, target)
    _unchanged(victim)
    assert read_network_secret(target) == bytes(range(32)) and not target.is_symlink()


def test_dedicated_key_does_not_follow_a_symlink_at_its_public_half(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "identity_ed25519.pub").symlink_to(victim)
    cli_network._new_key(tmp_path / "identity_ed25519")
    _unchanged(victim)
    assert stat.S_IMODE((tmp_path / "identity_ed25519").stat().st_mode) == 0o600
    assert (tmp_path / "identity_ed25519.pub").read_text().startswith("ssh-ed25519 ")


# --- the state directory -------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757, 0o1777, 0o720])
def test_state_dir_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    with pytest.raises(FileError, match=rf"writable by group or others \(mode {mode:04o}\).*run `chmod go-w {state}`"):
        check_state_dir(state)


@pytest.mark.parametrize("mode", [0o700, 0o710, 0o750, 0o755])
def test_state_dir_only_its_owner_writes_is_fine(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    check_state_dir(state)


def test_state_dir_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:
        os.chown(tmp_path, 4242, -1)  # root runs, a user owns it
    else:
        owner = tmp_path.stat().st_uid
        monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)  # someone else runs
    with pytest.raises(FileError, match=r"belongs to .*, not to .* who runs tunnelmesh.*run `chown "):
        check_state_dir(tmp_path)


def test_state_dir_of_root_tells_a_user_to_use_sudo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: os.stat_result((stat.S_IFDIR | 0o700, 0, 0, 2, 0, 0, 0, 0, 0, 0)))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(FileError, match=r"belongs to root: run this command as root \(sudo\)"):
        check_state_dir(tmp_path / "state", create=False)


def test_state_dir_is_made_0700_and_a_missing_one_is_left_to_the_caller(tmp_path: Path) -> None:
    check_state_dir(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()
    old = os.umask(0)
    try:
        check_state_dir(tmp_path / "new" / "state")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new" / "state").stat().st_mode) == 0o700
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileError, match="not a directory"):
        check_state_dir(tmp_path / "file")


@pytest.mark.parametrize("command", [["invite"], ["revoke", "x"], ["rotate-secret"], ["approve", "x", "--fingerprint", "SHA256:x"]])
def test_cli_refuses_to_write_into_an_open_state_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    assert cli.main(["--state-dir", str(state), *command]) == cli.EXIT_FAIL
    assert f"run `chmod go-w {state}`" in capsys.readouterr().err
    assert list(state.iterdir()) == []


def test_daemon_refuses_an_open_state_dir(tmp_path: Path) -> None:
    from actors.daemon import StartupError, run_daemon

    tmp_path.chmod(0o777)
    with pytest.raises(StartupError, match="writable by group or others"):
        asyncio.run(run_daemon(resolve_paths(str(tmp_path), None)))
    assert list(tmp_path.iterdir()) == []


# --- the SSH bridge's account --------------------------------------------------------------


def _account(home: Path, *, password: str = "*", shell: str = "/bin/sh", name: str = "tmbrtest") -> pwd.struct_passwd:
    return pwd.struct_passwd((name, "x", os.getuid(), os.getgid(), "TunnelMesh SSH bridge", str(home), shell))


@pytest.fixture
def fake_account(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """A pre-existing bridge account (this process's uid, home in tmp_path) with the
    shadow file `shadow`; tests change the shadow line and the shell through `accounts`."""
    home = tmp_path / "home"
    home.mkdir()
    shadow = tmp_path / "shadow"
    shadow.write_text("root:*:19000:0:99999:7:::\ntmbrtest:*:19000:0:99999:7:::\n")
    monkeypatch.setattr(bridge, "SHADOW", shadow, raising=False)  # raising: the test also runs on older code
    monkeypatch.setattr(bridge.pwd, "getpwnam", lambda user: _account(home))
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # setup needs root; nothing here does
    yield home, shadow


@pytest.mark.parametrize("password", ["$6$salt$hash", "", "$y$j9T$abc"])
def test_setup_refuses_an_account_with_a_usable_password(fake_account: tuple[Path, Path], password: str) -> None:
    home, shadow = fake_account
    shadow.write_text(f"tmbrtest:{password}:19000:0:99999:7:::\n")
    with pytest.raises(BridgeError, match=r"has a password that works.*choose another name with --user"):
        setup_account("tmbrtest")
    assert list(home.iterdir()) == []  # nothing touched


@pytest.mark.parametrize("shell", ["/bin/bash", "/usr/bin/zsh", "/usr/sbin/nologin", ""])
def test_setup_refuses_an_account_with_another_shell(
    fake_account: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, shell: str
) -> None:
    home, _ = fake_account
    monkeypatch.setattr(bridge.pwd, "getpwnam", lambda user: _account(home, shell=shell))
    with pytest.raises(BridgeError, match=r"already exists with the shell .*choose another name with --user"):
        setup_account("tmbrtest")
    assert list(home.iterdir()) == []


@pytest.mark.parametrize("password", ["*", "!", "!!", "!$6$salt$hash", "!*"])
def test_setup_takes_a_locked_bridge_account(fake_account: tuple[Path, Path], password: str) -> None:
    home, shadow = fake_account
    shadow.write_text(f"tmbrtest:{password}:19000:0:99999:7:::\n")
    setup_account("tmbrtest")
    assert stat.S_IMODE((home / ".ssh").stat().st_mode) == 0o700


def test_password_field_without_a_shadow_line(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text("other:$6$x:1::::::\n")
    account = _account(tmp_path)
    assert bridge._password_field(account, shadow) == "*"  # "x" in passwd, no shadow line: none works
    plain = pwd.struct_passwd(("old", "abc", 1, 1, "", "/", "/bin/sh"))
    assert bridge._password_field(plain, shadow) == "abc"


def test_setup_does_not_follow_a_symlinked_ssh_dir(fake_account: tuple[Path, Path], tmp_path: Path) -> None:
    """~/.ssh belongs to the account: a symlink there made root chown and chmod its target."""
    home, _ = fake_account
    elsewhere = tmp_path / "root-dir"
    elsewhere.mkdir()
    elsewhere.chmod(0o755)
    (home / ".ssh").symlink_to(elsewhere)
    with pytest.raises(BridgeError, match=r"\.ssh is a symlink"):
        setup_account("tmbrtest")
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755


def test_setup_does_not_follow_a_symlinked_state_dir(fake_account: tuple[Path, Path], tmp_path: Path) -> None:
    elsewhere = tmp_path / "root-dir"
    elsewhere.mkdir()
    elsewhere.chmod(0o755)
    (tmp_path / "state").symlink_to(elsewhere)
    with pytest.raises(BridgeError, match="not a symlink"):
        setup_account("tmbrtest", tmp_path / "state")
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755


def test_setup_refuses_an_open_state_dir(fake_account: tuple[Path, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    with pytest.raises(BridgeError, match="chmod go-w"):
        setup_account("tmbrtest", state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o777


def test_setup_gives_the_state_dir_search_access_only(fake_account: tuple[Path, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    setup_account("tmbrtest", state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o710


def test_authorized_keys_symlink_is_refused(fake_account: tuple[Path, Path], victim: Path) -> None:
    home, _ = fake_account
    setup_account("tmbrtest")
    (home / ".ssh" / "authorized_keys").symlink_to(victim)
    with pytest.raises(BridgeError, match="not a regular file"):
        write_authorized_keys("tmbrtest", [], "/usr/bin/tunnelmesh")
    with pytest.raises(BridgeError, match="not a regular file"):
        setup_account("tmbrtest")
    _unchanged(victim)


def test_authorized_keys_writer_ignores_a_hard_link_at_its_old_temp_name(
    fake_account: tuple[Path, Path], victim: Path
) -> None:
    """The account owns ~/.ssh: a hard link to root's file at the fixed temp name made root
    truncate it, write the keys into it and chown it to the account."""
    home, _ = fake_account
    setup_account("tmbrtest")
    os.link(victim, home / ".ssh" / ".authorized_keys.tunnelmesh.tmp")
    write_authorized_keys("tmbrtest", [], "/usr/bin/tunnelmesh")
    _unchanged(victim)
    keys = home / ".ssh" / "authorized_keys"
    assert keys.read_text().startswith("# Written by tunnelmesh")
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600


def test_authorized_keys_writer_refuses_a_symlinked_ssh_dir(
    fake_account: tuple[Path, Path], tmp_path: Path
) -> None:
    home, _ = fake_account
    elsewhere = tmp_path / "root-dir"
    elsewhere.mkdir()
    (home / ".ssh").symlink_to(elsewhere)
    with pytest.raises(BridgeError, match=r"\.ssh is a symlink"):
        write_authorized_keys("tmbrtest", [], "/usr/bin/tunnelmesh")
    assert list(elsewhere.iterdir()) == []


def test_state_error_from_netstate_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(StateError, match=rf"cannot write {tmp_path}/missing/f"):
        netstate_write_atomic(tmp_path / "missing" / "f", b"x")


def test_write_secret_is_the_atomic_writer_at_0600_whatever_the_umask(tmp_path: Path) -> None:
    from tunnelmesh.files import write_secret

    path = tmp_path / "key"
    old = os.umask(0)
    try:
        write_secret(path, b"one")
        write_secret(path, b"two")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"two" and stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExists):
        write_secret(path, b"three", replace=False)
    assert path.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["key"]


def test_the_tls_key_goes_through_the_secret_writer(tmp_path: Path) -> None:
    from tunnelmesh.tls import TlsError, write_certificate

    cert, key = tmp_path / "tls.pem", tmp_path / "tls.key"
    write_certificate(cert, key, "192.0.2.1")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(cert.stat().st_mode) == 0o644
    with pytest.raises(TlsError, match="cannot write the coordinator's TLS certificate"):
        write_certificate(cert, tmp_path / "missing-dir" / "tls.key", "192.0.2.1")
