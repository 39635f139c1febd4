"""`[coordinator] urls`: several coordinators of one network, in order of preference, as
the alternative to `url` (exactly one of the two). `url` stays the first of them; every
error names the file and the line of what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnelmesh.config import ConfigError, CoordinatorConfig, parse_config
from tunnelmesh.config.checker import MAX_COORDINATOR_URLS

PIN = "sha256:" + "ab" * 32
NODE = '[node]\nname = "alpha"\n\n[coordinator]\n'  # the [coordinator] table's keys start on line 5


def coordinator(keys: str, tmp_path: Path) -> CoordinatorConfig:
    config = parse_config(NODE + keys, path=tmp_path / "tunnelmesh.toml", state_dir=tmp_path)
    assert config.coordinator is not None
    return config.coordinator


def refused(keys: str, tmp_path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        coordinator(keys, tmp_path)
    assert info.value.path == tmp_path / "tunnelmesh.toml"
    return info.value


def test_urls_are_kept_in_order_without_trailing_slashes_and_url_is_the_first(tmp_path: Path) -> None:
    config = coordinator('urls = ["https://c1.example.org:7400/", "https://192.0.2.2:7400"]\n'
                         f'tls_fingerprint = "{PIN}"\n', tmp_path)
    assert config.urls == ("https://c1.example.org:7400", "https://192.0.2.2:7400")
    assert config.url == "https://c1.example.org:7400"
    assert config.tls_fingerprint == PIN  # one pin for all: they serve the same certificate


def test_url_alone_is_a_list_of_one(tmp_path: Path) -> None:
    config = coordinator('url = "http://192.0.2.1:7400/"\n', tmp_path)
    assert (config.url, config.urls) == ("http://192.0.2.1:7400", ("http://192.0.2.1:7400",))


def test_a_list_over_several_lines_names_the_line_of_the_bad_url(tmp_path: Path) -> None:
    error = refused('urls = [\n  "https://c1.example.org:7400",\n  "ftp://c2.example.org",\n]\n', tmp_path)
    assert error.line == 7 and "urls 'ftp://c2.example.org' must be http://host:port or https://host:port" in str(error)
    assert str(error).startswith(f"{tmp_path / 'tunnelmesh.toml'}:7: [coordinator]: ")


@pytest.mark.parametrize(("keys", "line", "message"), [
    ('url = "http://192.0.2.1:7400"\nurls = ["http://192.0.2.2:7400"]\n', 6, "url and urls both say where"),
    ('serve = "0.0.0.0:7400"\n', 4, "missing required key 'url' (or 'urls' for several coordinators)"),
    ("urls = []\n", 5, "urls must be a list of 1 to"),
    ('urls = "http://192.0.2.1:7400"\n', 5, "urls must be a list of 1 to"),
    (f"urls = [{', '.join(f'{chr(34)}http://192.0.2.{i}:7400{chr(34)}' for i in range(MAX_COORDINATOR_URLS + 1))}]\n",
     5, f"urls must be a list of 1 to {MAX_COORDINATOR_URLS} URLs"),
    ('urls = ["http://192.0.2.1:7400", 7400]\n', 5, "urls must be strings, not an integer"),
    ('urls = ["http://192.0.2.1:7400", "http://192.0.2.1:7400/"]\n', 5, "lists 'http://192.0.2.1:7400/' twice"),
    ('urls = ["http://[fe80::1:7400"]\n', 5, "must be http://host:port"),
    ('urls = ["http://192.0.2.1:99999"]\n', 5, "must be http://host:port"),
    ('urls = ["https://"]\n', 5, "must be http://host:port"),
    ('url = 7400\n', 5, "url must be a string, not an integer"),
    (f'urls = ["https://192.0.2.1:7400", "http://192.0.2.2:7400"]\ntls_fingerprint = "{PIN}"\n', 6,
     "tls_fingerprint needs an https:// url (over http:// there is no certificate to check it against), "
     "not 'http://192.0.2.2:7400'"),
])
def test_bad_urls_are_refused_saying_where_and_why(tmp_path: Path, keys: str, line: int, message: str) -> None:
    error = refused(keys, tmp_path)
    assert message in error.message, error.message
    assert error.line == line, str(error)
