"""Which Host a server answers (worker/hosts.py), and WEB_ALLOWED_HOSTS that extends it."""

from __future__ import annotations

import pytest

from settings import Settings, SettingsError
from worker.hosts import HostAllowlist, host_name


@pytest.mark.parametrize(
    ("host", "name"),
    [
        ("Keeper.Example.COM:5000", "keeper.example.com"),
        ("keeper.example.com.", "keeper.example.com"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]:5000", "::1"),
        ("[0:0::1]", "::1"),
        ("::1", "::1"),
        ("evil.example@127.0.0.1", None),
        ("127.0.0.1/x", None),
        ("a b", None),
        ("clé.example", None),
        ("[::g]:80", None),
        ("", None),
    ],
)
def test_host_name_is_the_name_alone_or_none(host: str, name: str | None) -> None:
    assert host_name(host) == name


@pytest.mark.parametrize(
    ("address", "served", "foreign"),
    [
        ("127.0.0.1", ["localhost:5000", "127.0.0.1:5000", "[::1]:5000"], ["10.0.0.5"]),
        ("::1", ["localhost", "[::1]:5000", "127.0.0.1"], ["[fd00::1]"]),
        ("0.0.0.0", ["localhost:5000", "127.0.0.1"], ["0.0.0.0", "10.0.0.5"]),
        ("10.0.0.5", ["10.0.0.5:5000"], ["localhost", "127.0.0.1", "10.0.0.6"]),
    ],
)
def test_a_server_answers_to_its_address_and_loopback_names_only_on_loopback(
    address: str, served: list[str], foreign: list[str]
) -> None:
    hosts = HostAllowlist.serving(address, ["keeper.example.com"])

    for host in [*served, "keeper.example.com", "Keeper.Example.com:443"]:
        assert hosts.allows(host), host
    for host in [*foreign, "rebound.example", "keeper.example.com.rebound.example", "", None]:
        assert not hosts.allows(host), host


def test_web_allowed_hosts_is_read_as_names() -> None:
    settings = Settings.from_env({"WEB_ALLOWED_HOSTS": " Keeper.internal , [fd00::5], 10.0.0.5,"})

    assert settings.web_allowed_hosts == ("keeper.internal", "fd00::5", "10.0.0.5")
    assert Settings.from_env({}).web_allowed_hosts is None


@pytest.mark.parametrize("entry", ["https://keeper.example.com", "keeper.example.com/", "*"])
def test_web_allowed_hosts_refuses_what_is_no_host_name(entry: str) -> None:
    with pytest.raises(SettingsError, match=r"WEB_ALLOWED_HOSTS: .* is not a host name"):
        Settings.from_env({"WEB_ALLOWED_HOSTS": f"keeper.example.com,{entry}"})
