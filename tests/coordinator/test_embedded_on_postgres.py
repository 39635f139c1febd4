"""The embedded coordinator's `[coordinator] db` (the config key matching `tunnelmesh
coordinator --db`): a SQLite file, or a PostgreSQL connection string without a password
(`db_password_file` holds it), with `cluster_url` for relays across coordinators. The
daemon's own start of its coordinator (`actors.daemon._start_coordinator`), for real, on
a real throwaway PostgreSQL."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from actors.daemon import StartupError, _start_coordinator
from tests.support.databases import postgres_database
from tunnelmesh.config import ConfigError, NodeConfig, parse_config
from tunnelmesh.coordinator.cluster import CLUSTER

NODE = '[node]\nname = "alpha"\n\n[coordinator]\nurl = "http://127.0.0.1:{port}"\nserve = "127.0.0.1:{port}"\n'


def config(keys: str, tmp_path: Path, port: int = 7400) -> NodeConfig:
    return parse_config(NODE.format(port=port) + keys, path=tmp_path / "tunnelmesh.toml", state_dir=tmp_path)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_db_is_a_sqlite_file_by_default_or_a_postgresql_string_kept_as_written(tmp_path: Path) -> None:
    default = config("", tmp_path).coordinator
    assert default is not None and default.db == tmp_path / "coordinator.db"
    relative = config('db = "coord/c.db"\n', tmp_path).coordinator
    assert relative is not None and relative.db == tmp_path / "coord" / "c.db"
    dsn = "postgresql://tunnelmesh@db.example/tunnelmesh?sslmode=require"
    shared = config(f'db = "{dsn}"\ndb_password_file = "db.password"\ncluster_url = "https://10.0.0.11:7400"\n',
                    tmp_path).coordinator
    assert shared is not None and shared.db == dsn and shared.db_password_file == tmp_path / "db.password"
    assert shared.cluster_url == "https://10.0.0.11:7400"


@pytest.mark.parametrize(("keys", "line", "message"), [
    ('db = "postgresql://tm:hunter2@db.example/tm"\n', 7, "db holds a password: take it out and put it in a file "
                                                           "named by db_password_file"),
    ('db = "postgresql://tm@db.example/tm?password=hunter2"\n', 7, "db holds a password"),
    ('db = "postgresql://tm@[db.example/tm"\n', 7, "db is not a PostgreSQL connection string"),
    ('db_password_file = "p"\n', 7, "db_password_file goes with a PostgreSQL db"),
    ('cluster_url = "http://10.0.0.11:7400"\n', 7, "cluster_url goes with a PostgreSQL db"),
])
def test_a_wrong_db_setting_names_its_line_and_never_echoes_a_password(tmp_path: Path, keys: str, line: int,
                                                                      message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config(keys, tmp_path)
    assert info.value.line == line and message in str(info.value), str(info.value)
    assert "hunter2" not in str(info.value)


def test_the_embedded_coordinator_serves_a_postgresql_database_and_joins_its_cluster(
        postgres_server: Any, tmp_path: Path) -> None:
    db = postgres_database(postgres_server, tmp_path)
    (tmp_path / "db.password").write_text("unused by a trust socket\n")
    node = config(f'db = "{db.url}"\ndb_password_file = "db.password"\ncluster_url = "http://127.0.0.1:7499"\n',
                  tmp_path, free_port())

    async def scenario() -> None:
        site = await _start_coordinator(node)
        try:
            app = site.runner.app
            assert app.get(CLUSTER) is not None and app[CLUSTER].url == "http://127.0.0.1:7499"
            host, port = site.runner.addresses[0][:2]
            async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/v1/network") as answer:
                assert answer.status == 503  # served, from PostgreSQL: no network set up there yet
                assert "no network yet" in (await answer.json())["error"]
        finally:
            await site.stop()

    asyncio.run(scenario())
    assert db.query("SELECT count(*) FROM schema_version") == [(1,)]  # it migrated the database


def test_an_unreadable_password_file_stops_the_start_with_what_to_do(postgres_server: Any, tmp_path: Path) -> None:
    db = postgres_database(postgres_server, tmp_path)
    node = config(f'db = "{db.url}"\ndb_password_file = "missing.password"\n', tmp_path)
    with pytest.raises(StartupError, match=r"embedded coordinator: \[coordinator\] db_password_file .*missing.password: "
                                           r"cannot read it \(No such file or directory\)"):
        asyncio.run(_start_coordinator(node))
