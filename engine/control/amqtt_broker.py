"""The embedded broker when mosquitto is not installed: amqtt inside this process."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from amqtt.broker import Broker
from amqtt.errors import BrokerError
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from engine.control.broker import BrokerUser, free_port
from engine.errors import ControlError


class UsersAuthPlugin(BaseAuthPlugin):
    """amqtt authentication accepting exactly the given user names, each with its password."""

    @dataclass
    class Config:
        passwords: dict[str, str]

    async def authenticate(self, *, session: Session) -> bool | None:
        expected: UsersAuthPlugin.Config = self.config
        password = expected.passwords.get(session.username or "")
        return password is not None and hmac.compare_digest((session.password or "").encode(), password.encode())


@contextlib.asynccontextmanager
async def run_amqtt(users: Sequence[BrokerUser], listen: tuple[str, int] | None = None) -> AsyncIterator[int]:
    if users:
        auth = {f"{__name__}.UsersAuthPlugin": {"passwords": {user.name: user.password for user in users}}}
    else:
        auth = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    last_error: BrokerError | None = None
    host = listen[0] if listen else "127.0.0.1"
    for _ in range(1 if listen else 3):
        port = listen[1] if listen else free_port()
        broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}}, "plugins": auth})
        try:
            await broker.start()
        except BrokerError as exc:  # a taken port: try another one
            last_error = exc
            continue
        try:
            yield port
        finally:
            async with asyncio.timeout(5):
                await broker.shutdown()
        return
    if listen:
        raise ControlError(f"the embedded amqtt cannot listen on {host}:{port}: {last_error}")
    raise ControlError(f"amqtt could not start on a free loopback port in 3 tries: {last_error}")
