"""`[nat]` port_mapping, port_mapping_protocols, port_mapping_lifetime: defaults, values,
and refusals that name the line and say what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunnelmesh.config import ConfigError, parse_config
from tunnelmesh.config.model import NatConfig

BASE = '[node]\nname = "a"\nmesh_ip = "10.9.0.1"\n'


def nat_config(tmp_path: Path, table: str) -> NatConfig:
    return parse_config(BASE + table, path=tmp_path / "config.toml", state_dir=tmp_path).nat


def test_port_mapping_defaults_and_values(tmp_path: Path) -> None:
    default = nat_config(tmp_path, "")
    assert (default.port_mapping, default.port_mapping_protocols, default.port_mapping_lifetime) == (
        True, ("pcp", "nat-pmp", "upnp"), 7200)
    chosen = nat_config(tmp_path, '[nat]\nport_mapping = false\nport_mapping_protocols = ["upnp", "pcp"]\n'
                                  "port_mapping_lifetime = 20\n")
    assert (chosen.port_mapping, chosen.port_mapping_protocols, chosen.port_mapping_lifetime) == (
        False, ("upnp", "pcp"), 20)


@pytest.mark.parametrize(("table", "expected"), [
    ('[nat]\nport_mapping = "yes"\n', ":5: [nat]: port_mapping must be true or false, not a string"),
    ('[nat]\nport_mapping_protocols = ["pcp", "igd"]\n', ":5: [nat]: port_mapping_protocols must be a list of "
                                                         "distinct names out of 'pcp', 'nat-pmp', 'upnp'"),
    ('[nat]\nport_mapping_protocols = ["pcp", "pcp"]\n', ":5: [nat]: port_mapping_protocols must be"),
    ("[nat]\nport_mapping_protocols = []\n", ":5: [nat]: port_mapping_protocols must be"),
    ('[nat]\nport_mapping_protocols = "pcp"\n', ":5: [nat]: port_mapping_protocols must be"),
    ("[nat]\nport_mapping_lifetime = 10\n", ":5: [nat]: port_mapping_lifetime must be between 20 and 86400 seconds"),
])
def test_port_mapping_refusals_name_the_line(tmp_path: Path, table: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        nat_config(tmp_path, table)
    assert expected in str(caught.value)
