"""Broker settings: embedded choices, mqtt/mqtts URLs, and clear errors naming what is valid."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from engine.control.broker import (
    BrokerAddress,
    EmbeddedBroker,
    TLSOptions,
    agents_user,
    find_mosquitto,
    mosquitto_password_line,
    parse_broker,
    refuse_password_in_url,
    write_secret,
)
from engine.errors import ControlError


@pytest.mark.parametrize(
    ("setting", "kind"),
    [("embedded", "auto"), ("embedded:mosquitto", "mosquitto"), ("embedded:amqtt", "amqtt")],
)
def test_embedded(setting, kind):
    assert parse_broker(setting) == EmbeddedBroker(kind)


@pytest.mark.parametrize(("setting", "expected"), [
    ("embedded@10.0.0.10", EmbeddedBroker("auto", "10.0.0.10", 1883)),
    ("embedded:mosquitto@10.0.0.10:1884", EmbeddedBroker("mosquitto", "10.0.0.10", 1884)),
    ("embedded:amqtt@[fd00::1]:1885", EmbeddedBroker("amqtt", "fd00::1", 1885)),
])
def test_embedded_on_an_address(setting, expected):
    assert parse_broker(setting) == expected and expected.listen == (expected.host, expected.port)


def test_the_agents_password_is_made_once_and_kept_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.delenv("ENGINE_AGENTS_PASSWORD", raising=False)
    first, again = agents_user("10.0.0.10", 1883), agents_user("10.0.0.10", 1883)
    assert first.password == again.password and len(first.password) >= 24 and first.shared
    (kept,) = (tmp_path / "engine").iterdir()
    assert kept.stat().st_mode & 0o777 == 0o600
    assert agents_user("10.0.0.10", 1884).password != first.password  # another broker, another password
    monkeypatch.setenv("ENGINE_AGENTS_PASSWORD", "chosen")
    assert agents_user("10.0.0.10", 1883).password == "chosen"


def test_plain_url_with_default_port():
    assert parse_broker("mqtt://broker.lan") == BrokerAddress(host="broker.lan", port=1883)


def test_url_with_credentials_port_and_escapes():
    address = parse_broker("mqtt://al%40ice:p%3Ass@10.0.0.5:1884")
    assert address == BrokerAddress(host="10.0.0.5", port=1884, username="al@ice", password="p:ss")
    assert "p:ss" not in repr(address)
    assert address.url == "mqtt://al@ice@10.0.0.5:1884"
    assert address.display == "10.0.0.5:1884"


def test_mqtts_defaults_to_verified_tls_on_8883():
    address = parse_broker("mqtts://broker.example.com")
    assert address.port == 8883
    assert address.tls == TLSOptions()


def test_mqtts_with_tls_options(tmp_path: Path):
    tls = TLSOptions(ca_file=tmp_path / "ca.pem", cert_file=tmp_path / "c.pem", key_file=tmp_path / "k.pem")
    address = parse_broker("mqtts://u:p@broker:9883", tls=tls)
    assert address.tls == tls
    assert address.url == "mqtts://u@broker:9883"


def test_ipv6_host():
    assert parse_broker("mqtt://[::1]:1999") == BrokerAddress(host="::1", port=1999)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("", "unknown scheme ''"),
        ("localhost:1883", "unknown scheme 'localhost'"),
        ("http://broker:1883", "unknown scheme 'http'"),
        ("embedded:hivemq", "unknown embedded broker 'hivemq'"),
        ("mqtt://", "no host"),
        ("mqtt://broker:notaport", "Port could not be cast"),
        ("mqtt://broker:70000", "Port out of range"),
        ("mqtt://broker:1883/topic", "no path, query or fragment"),
        ("mqtt://broker?x=1", "no path, query or fragment"),
        ("mqtt://:secret@broker", "a password needs a user name"),
        ("embedded@", "after @ comes the address to listen on"),
        ("embedded@user:pw@host", "after @ comes the address to listen on"),
    ],
)
def test_malformed_settings_name_what_is_valid(setting, expected):
    with pytest.raises(ControlError) as info:
        parse_broker(setting)
    assert expected in str(info.value)
    if expected != "a password needs a user name":
        assert "expected 'embedded'" in str(info.value)


def test_tls_options_need_mqtts():
    with pytest.raises(ControlError, match="TLS options need an mqtts:// URL"):
        parse_broker("mqtt://broker", tls=TLSOptions(insecure=True))


def test_client_certificate_needs_both_files(tmp_path: Path):
    with pytest.raises(ControlError, match="both cert_file and key_file"):
        TLSOptions(cert_file=tmp_path / "c.pem")


def test_mosquitto_password_line_is_pbkdf2_sha512():
    user, _, hashed = mosquitto_password_line("alice", "s3cret").rstrip("\n").partition(":")
    _, algorithm, rounds, salt, digest = hashed.split("$")
    assert (user, algorithm, rounds) == ("alice", "7", "101")
    expected = hashlib.pbkdf2_hmac("sha512", b"s3cret", base64.b64decode(salt), 101)
    assert base64.b64decode(digest) == expected


def test_find_mosquitto_finds_an_executable_or_none():
    found = find_mosquitto()
    assert found is None or found.name == "mosquitto"


@pytest.mark.parametrize(("username", "password"), [("", "p"), ("a:b", "p"), ("a\nb", "p"), ("alice", "p\nq")])
def test_password_file_refuses_names_it_cannot_hold(username, password):
    with pytest.raises(ControlError, match="user name must be non-empty without ':'"):
        mosquitto_password_line(username, password)


def test_a_users_password_comes_from_a_file_or_the_environment_never_the_url(tmp_path, monkeypatch):
    monkeypatch.delenv("ENGINE_BROKER_PASSWORD", raising=False)
    monkeypatch.delenv("ENGINE_BROKER_PASSWORD_FILE", raising=False)
    assert parse_broker("mqtt://agent-h1@10.0.0.10").password is None
    (tmp_path / "h1.password").write_text("from-the-file\n")
    monkeypatch.setenv("ENGINE_BROKER_PASSWORD_FILE", str(tmp_path / "h1.password"))
    assert parse_broker("mqtt://agent-h1@10.0.0.10").password == "from-the-file"
    monkeypatch.setenv("ENGINE_BROKER_PASSWORD", "from-the-environment")
    assert parse_broker("mqtt://agent-h1@10.0.0.10").password == "from-the-environment"
    assert parse_broker("mqtt://agent-h1@10.0.0.10", password_file=tmp_path / "h1.password").password == "from-the-file"
    assert parse_broker("mqtt://10.0.0.10").password is None  # no user, no password
    with pytest.raises(ControlError, match="broker password file .*missing.password: No such file"):
        parse_broker("mqtt://agent-h1@10.0.0.10", password_file=tmp_path / "missing.password")


def test_a_password_in_a_command_line_url_is_refused_naming_the_ways_to_give_it():
    refuse_password_in_url("mqtt://agent-h1@10.0.0.10:1883", "--broker")  # no password: fine
    with pytest.raises(ControlError, match=r"--broker: a password in the URL shows in `ps`.*--password-file.*"
                                           "ENGINE_BROKER_PASSWORD"):
        refuse_password_in_url("mqtt://agent-h1:secret@10.0.0.10:1883", "--broker")


def test_secrets_are_written_private_from_the_start(tmp_path):
    write_secret(tmp_path / "a.password", "one\n")
    assert (tmp_path / "a.password").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_secret(tmp_path / "a.password", "two\n")
    (tmp_path / "b").write_text("open")
    (tmp_path / "b").chmod(0o644)
    write_secret(tmp_path / "b", "closed", replace=True)
    assert (tmp_path / "b").read_text() == "closed" and (tmp_path / "b").stat().st_mode & 0o777 == 0o600
