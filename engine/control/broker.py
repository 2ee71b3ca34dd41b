"""Where the broker is, and starting one ourselves when the graph says ``broker: embedded``.

``parse_broker`` turns a graph's broker setting into either an :class:`EmbeddedBroker` request or a
:class:`BrokerAddress`. ``embedded_broker`` starts mosquitto on a free loopback port when it is installed,
otherwise amqtt inside this process, and yields the address clients connect to. Given users, the broker
accepts only them (each with its own password); mosquitto also confines each to its topics (an ACL) and makes
its user name its client id, so no client can pose as another. amqtt has no ACLs: there every user may use
every topic, and only the signatures on the messages (:mod:`engine.control.signing`) keep clients apart.
Whatever happens inside the ``async with`` (an exception, a cancellation), the broker is stopped on the way
out and its files (password file, ACL) are removed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeAlias
from urllib.parse import unquote, urlsplit

from engine.control.topics import Acl
from engine.errors import ControlError

BrokerKind: TypeAlias = Literal["auto", "mosquitto", "amqtt"]
_KINDS: tuple[BrokerKind, ...] = ("auto", "mosquitto", "amqtt")
_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
_VALID = ("expected 'embedded', 'embedded:mosquitto', 'embedded:amqtt' (each optionally @ADDRESS[:PORT] to listen "
          "there), 'mqtt://[user:pass@]host[:port]' or 'mqtts://...'")
AGENTS_USER = "agents"  #: the agents' user on an embedded broker that listens on an address
PASSWORD_ENV = "ENGINE_BROKER_PASSWORD"  #: the password of the broker URL's user
PASSWORD_FILE_ENV = "ENGINE_BROKER_PASSWORD_FILE"  #: a file holding it
_MOSQUITTO_PLACES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")
# If this process is killed outright, the kernel sends mosquitto SIGTERM (util-linux setpriv; Linux only).
_SETPRIV = shutil.which("setpriv")
_DIE_WITH_PARENT = [_SETPRIV, "--pdeathsig", "TERM"] if _SETPRIV else []


@dataclass(frozen=True)
class TLSOptions:
    """TLS settings for an ``mqtts://`` broker; with no CA file the system's trusted CAs are used."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False  # skip certificate and host name verification (test brokers only)

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ControlError("a TLS client certificate needs both cert_file and key_file")


@dataclass(frozen=True)
class BrokerAddress:
    """A broker clients can connect to."""

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TLSOptions | None = None

    @property
    def display(self) -> str:
        """``host:port``, for messages (never shows the password)."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The address as a URL without the password."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.display}"

    def as_user(self, user: BrokerUser) -> BrokerAddress:
        return dataclasses.replace(self, username=user.name, password=user.password)


@dataclass(frozen=True)
class BrokerUser:
    """One user of an embedded broker; ``acl`` None means every topic."""

    name: str
    password: str = field(repr=False)
    acl: Acl | None = None
    shared: bool = False  #: several clients connect as this user (so its name cannot be their client id)

    @classmethod
    def generate(cls, name: str, acl: Acl | None = None) -> BrokerUser:
        """A user with a fresh random password."""
        return cls(name, secrets.token_urlsafe(24), acl)


@dataclass(frozen=True)
class EmbeddedBroker:
    """The graph asks the engine to start its own broker: on a free loopback port, or on ``host:port`` where
    agents on other hosts reach it (``embedded@10.0.0.10:1883``)."""

    kind: BrokerKind = "auto"
    host: str | None = None
    port: int = 1883

    @property
    def listen(self) -> tuple[str, int] | None:
        return (self.host, self.port) if self.host is not None else None


def parse_broker(setting: str, *, tls: TLSOptions | None = None,
                 password_file: Path | None = None) -> BrokerAddress | EmbeddedBroker:
    """Parse a broker setting; ``tls`` applies to ``mqtts://`` URLs (default: verify against system CAs). A URL with
    a user and no password takes the password from ``password_file``, else from ENGINE_BROKER_PASSWORD, else from
    the file ENGINE_BROKER_PASSWORD_FILE names (so that it need not be on a command line)."""
    text = setting.strip()
    if text.partition("@")[0] == "embedded" or text.startswith("embedded:"):
        name, at, where = text.partition("@")
        kind = name.partition(":")[2] or "auto"
        if kind not in _KINDS:
            raise ControlError(f"broker {setting!r}: unknown embedded broker {kind!r}; {_VALID}")
        if not at:
            return EmbeddedBroker(kind)  # type: ignore[arg-type]
        try:
            listen = urlsplit(f"mqtt://{where}")
            port = listen.port
        except ValueError as exc:
            raise ControlError(f"broker {setting!r}: {exc}; {_VALID}") from None
        if not listen.hostname or listen.username or listen.path:
            raise ControlError(f"broker {setting!r}: after @ comes the address to listen on, ADDRESS[:PORT]; {_VALID}")
        return EmbeddedBroker(kind, listen.hostname, port or 1883)  # type: ignore[arg-type]
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as exc:
        raise ControlError(f"broker {setting!r}: {exc}; {_VALID}") from exc
    if url.scheme not in _DEFAULT_PORTS:
        raise ControlError(f"broker {setting!r}: unknown scheme {url.scheme!r}; {_VALID}")
    if not url.hostname:
        raise ControlError(f"broker {setting!r}: no host; {_VALID}")
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ControlError(f"broker {setting!r}: a broker URL has no path, query or fragment; {_VALID}")
    if url.password is not None and not url.username:
        raise ControlError(f"broker {setting!r}: a password needs a user name; {_VALID}")
    if url.scheme == "mqtt" and tls is not None:
        raise ControlError(f"broker {setting!r}: TLS options need an mqtts:// URL")
    username = unquote(url.username) if url.username else None
    password = unquote(url.password) if url.password is not None else None
    if username and password is None:
        password = user_password(password_file)
    return BrokerAddress(
        host=url.hostname,
        port=port if port is not None else _DEFAULT_PORTS[url.scheme],
        username=username,
        password=password,
        tls=(tls or TLSOptions()) if url.scheme == "mqtts" else None,
    )


def user_password(password_file: Path | None = None) -> str | None:
    """The broker user's password: from ``password_file``, else ENGINE_BROKER_PASSWORD, else the file named by
    ENGINE_BROKER_PASSWORD_FILE; None when none is given."""
    if password_file is None and os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    where = password_file or (Path(os.environ[PASSWORD_FILE_ENV]) if os.environ.get(PASSWORD_FILE_ENV) else None)
    return None if where is None else read_secret(where, "broker password file")


def read_secret(path: Path, what: str) -> str:
    """The secret a file holds (``what`` names it in errors: an option or a kind of file), refusing an empty one."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ControlError(f"{what} {path}: {exc.strerror or exc}") from None
    if not text:
        raise ControlError(f"{what} {path} is empty")
    return text


def password_in_url(setting: str) -> bool:
    """Whether a broker setting carries a password (``mqtt://user:pass@...``)."""
    with contextlib.suppress(ValueError):
        return urlsplit(setting.strip()).password is not None
    return False


def refuse_password_in_url(setting: str, option: str) -> None:
    """A password on a command line shows in ``ps`` to every user of the host: refused, naming the way to give it."""
    if password_in_url(setting):
        raise ControlError(f"{option}: a password in the URL shows in `ps` to every user of this host; give the user "
                           f"only (mqtt://USER@HOST:PORT) and the password in a file (--password-file, or "
                           f"{PASSWORD_FILE_ENV}) or in {PASSWORD_ENV}")


def find_mosquitto() -> Path | None:
    """The mosquitto binary: on PATH, or where distributions put it (often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    return next((Path(place) for place in _MOSQUITTO_PLACES if os.access(place, os.X_OK)), None)


@contextlib.asynccontextmanager
async def embedded_broker(
    kind: BrokerKind = "auto", *, users: Sequence[BrokerUser] = (), start_timeout_s: float = 5.0,
    listen: tuple[str, int] | None = None,
) -> AsyncIterator[BrokerAddress]:
    """Run a broker for the duration of the block, on a free loopback port or on ``listen`` (host, port); yields
    its address (no credentials: see :meth:`BrokerAddress.as_user`).

    ``auto`` means mosquitto when it is installed, otherwise amqtt in this process. With ``users`` the broker
    accepts only them; without, anyone.
    """
    if len({user.name for user in users}) != len(users):
        raise ControlError("embedded broker users must have distinct names")
    if kind not in _KINDS:
        raise ControlError(f"unknown embedded broker {kind!r}; expected one of {', '.join(_KINDS)}")
    binary = find_mosquitto() if kind != "amqtt" else None
    if kind == "mosquitto" and binary is None:
        raise ControlError("mosquitto is not installed (not on PATH nor in /usr/sbin); install it or use amqtt")
    if binary is not None:
        runner = _mosquitto(binary, users, start_timeout_s, listen)
    else:
        from engine.control.amqtt_broker import run_amqtt  # amqtt is heavy to import; workers never need it

        runner = run_amqtt(users, listen)
    async with runner as port:
        yield BrokerAddress(host=listen[0] if listen else "127.0.0.1", port=port)


def agents_user(host: str, port: int) -> BrokerUser:
    """The agents' user on an embedded broker listening on ``host:port``. Its password is made once and kept
    (``$XDG_STATE_HOME/engine``, mode 0600) so that agents started with it reach every later run's broker;
    ENGINE_AGENTS_PASSWORD sets it instead. It may use every engine topic: the deployment key's signatures, not
    the broker, keep agents, runs and workers apart."""
    password = os.environ.get("ENGINE_AGENTS_PASSWORD")
    if not password:
        path = agents_password_file(host, port)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            write_secret(path, secrets.token_urlsafe(24) + "\n")
        password = path.read_text().strip()
    return BrokerUser(AGENTS_USER, password, Acl(read=("dge/#",), write=("dge/#",)), shared=True)


def write_secret(path: Path, text: str, *, replace: bool = False) -> None:
    """Write a file only its owner may read (mode 0600 from its creation on); FileExistsError if it exists, unless
    ``replace``."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    with os.fdopen(os.open(path, flags, 0o600), "w") as file:
        file.write(text)
    os.chmod(path, 0o600)  # a file that existed keeps its mode otherwise


def state_folder() -> Path:
    """Where the engine keeps what outlives a run: ``$XDG_STATE_HOME/engine`` (``~/.local/state/engine``)."""
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "engine"


def agents_password_file(host: str, port: int) -> Path:
    """The file holding the agents' password of the embedded broker listening on ``host:port``."""
    return state_folder() / f"broker-{host}-{port}.password"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def mosquitto_password_line(username: str, password: str) -> str:
    """One line of a mosquitto 2 password file (PBKDF2-SHA512, 101 rounds: what ``mosquitto_passwd`` writes)."""
    if not username or any(char in username for char in ":\n\r") or any(char in password for char in "\n\r"):
        raise ControlError("a broker user name must be non-empty without ':' or line breaks; a password without line breaks")
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"{username}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}\n"


def mosquitto_acl(users: Sequence[BrokerUser]) -> str:
    """A mosquitto ACL file: each user may read and write exactly its filters (every topic when acl is None)."""
    lines = []
    for user in users:
        lines.append(f"user {user.name}")
        if user.acl is None:
            lines.append("topic readwrite #")
        else:
            lines += [f"topic read {topic}" for topic in user.acl.read] + [f"topic write {topic}" for topic in user.acl.write]
        lines.append("")
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def _mosquitto(binary: Path, users: Sequence[BrokerUser], start_timeout_s: float,
                     listen: tuple[str, int] | None) -> AsyncIterator[int]:
    with tempfile.TemporaryDirectory(prefix="dge-mosquitto-") as tmp:
        folder = Path(tmp)
        auth = "allow_anonymous true\n"
        if users:
            (folder / "passwd").write_text("".join(mosquitto_password_line(user.name, user.password) for user in users))
            (folder / "acl").write_text(mosquitto_acl(users))
            auth = f"allow_anonymous false\npassword_file {folder / 'passwd'}\nacl_file {folder / 'acl'}\n"
            if not any(user.shared for user in users):  # one client per user: its name is its client id
                auth += "use_username_as_clientid true\n"
        # Another process may take the probed port before mosquitto binds it: then try a fresh one.
        host = listen[0] if listen else "127.0.0.1"
        for _ in range(1 if listen else 3):
            port = listen[1] if listen else free_port()
            config = folder / "mosquitto.conf"
            # "user": started as root, mosquitto would switch to user mosquitto, who cannot read our folder.
            config.write_text(
                f"listener {port} {host}\nuser {pwd.getpwuid(os.getuid()).pw_name}\n{auth}persistence false\n"
                "max_inflight_messages 0\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
                "log_dest stderr\nlog_type error\n"
            )
            log = folder / "mosquitto.log"
            process = start_mosquitto(binary, config, log)
            try:
                if await wait_listening(process, host, port, start_timeout_s, log):
                    yield port
                    return
            finally:
                stop_process(process)
        if listen:
            raise ControlError(f"the embedded mosquitto cannot listen on {host}:{port}: {log.read_text()[-300:].strip()}")
        raise ControlError(f"mosquitto could not bind a free loopback port in 3 tries: {log.read_text()[-500:]}")


def start_mosquitto(binary: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """mosquitto on ``config``, logging to ``log``, in its own session (a terminal's Ctrl-C is for the engine to
    handle); it gets SIGTERM if this process is killed outright."""
    with log.open("wb") as log_file:
        return subprocess.Popen([*_DIE_WITH_PARENT, str(binary), "-c", str(config)], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=log_file, start_new_session=True)


async def wait_listening(process: subprocess.Popen[bytes], host: str, port: int, timeout_s: float, log: Path) -> bool:
    """True once the port accepts; False if mosquitto exited because the port was taken."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log.read_text(errors="replace")
            if "Address already in use" in text or "Cannot assign requested address" in text:
                return False
            raise ControlError(f"mosquitto exited with code {process.returncode} at start: {text[-500:]}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return True
        await asyncio.sleep(0.01)
    raise ControlError(f"mosquitto did not accept connections on {host}:{port} within {timeout_s:g} s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop mosquitto synchronously, so that even a cancelled caller leaves no process behind."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=3)
