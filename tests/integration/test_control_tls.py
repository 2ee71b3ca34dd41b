"""mqtts:// against a mosquitto TLS listener with a throwaway CA."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from engine.control import ControlClient, TLSOptions, parse_broker
from engine.control.broker import find_mosquitto, free_port
from engine.control.messages import Shutdown
from engine.control.signing import new_key
from engine.errors import ControlError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]
KEY = new_key()


def make_certificates(folder: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "1", "-extfile", "san.ext",
    )


@pytest.fixture
def tls_broker(tmp_path: Path):
    make_certificates(tmp_path)
    port = free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nuser {pwd.getpwuid(os.getuid()).pw_name}\nallow_anonymous true\n"
        f"persistence false\ncafile {tmp_path / 'ca.pem'}\ncertfile {tmp_path / 'server.pem'}\n"
        f"keyfile {tmp_path / 'server.key'}\n"
    )
    process = subprocess.Popen([str(find_mosquitto()), "-c", str(config)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "TLS mosquitto did not listen within 5 s"
            time.sleep(0.01)
    yield port, tmp_path / "ca.pem"
    process.terminate()
    process.wait(timeout=5)


def test_mqtts_with_the_ca_file_verifies_and_round_trips(tls_broker):
    port, ca = tls_broker

    async def scenario():
        address = parse_broker(f"mqtts://localhost:{port}", tls=TLSOptions(ca_file=ca))
        async with ControlClient(address, key=KEY, client_id="tls") as client:
            await client.subscribe("t")
            await client.publish("t", Shutdown(reason="over tls"))
            got = await client.receive(3)
            assert got is not None and got.message == Shutdown(reason="over tls")

    asyncio.run(asyncio.wait_for(scenario(), 15))


def test_mqtts_refuses_an_untrusted_certificate_unless_insecure(tls_broker):
    port, _ = tls_broker

    async def scenario():
        with pytest.raises(ControlError, match=f"cannot reach broker at localhost:{port}: .*certificate verify failed"):
            async with ControlClient(key=KEY, address=parse_broker(f"mqtts://localhost:{port}"), client_id="strict"):
                pass
        insecure = parse_broker(f"mqtts://localhost:{port}", tls=TLSOptions(insecure=True))
        async with ControlClient(insecure, key=KEY, client_id="insecure") as client:
            assert client.connected

    asyncio.run(asyncio.wait_for(scenario(), 15))
