"""Signed control messages: nothing received is trusted until it proves it comes from a holder of the run's key.

A control message on the wire is one header line and the message's JSON::

    DGE1 <sender> <seq> <mac>\\n{"v": 1, "kind": ..., ...}

``mac`` is HMAC-SHA256 under the run's key over the topic, the sender, the sequence number and the JSON bytes,
so a message cannot be forged, altered, or moved to another topic. ``seq`` counts up per sender; a receiver
keeps a window of the sequence numbers it has seen per (sender, topic) and refuses one seen before or older
than the window, so a captured message cannot be replayed. (A key belongs to one run, so a message from
another run fails its MAC.) The window tolerates reordering, which is what re-sending after a reconnect
causes, and a duplicate it refuses is one the receiver already acted on. A sender started again under its name
counts from 0 again: receivers told so by the controller forget its windows (:meth:`Opener.forget`).

:meth:`Opener.open` checks, cheapest first and before any parsing: size, header, MAC, replay, JSON nesting
depth; then the schema (:func:`engine.control.messages.decode`). Whatever fails raises :class:`Rejected`
with a short ``reason`` that receivers count.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import secrets
import threading
from dataclasses import dataclass

import numpy as np

from engine.control.messages import Message, decode, encode
from engine.errors import ControlError

MAGIC = b"DGE1"
KEY_BYTES = 32
MAX_MESSAGE_BYTES = 1 << 20  #: the largest control message (a manifest of many tensors is a few KB)
MAX_DEPTH = 16  #: the deepest JSON nesting a message may have (the schema needs 5)
REPLAY_WINDOW = 4096  #: sequence numbers remembered per (sender, topic)
SENDER_PATTERN = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEADER = re.compile(rb"DGE1 (" + SENDER_PATTERN.pattern + rb") (0|[1-9][0-9]{0,18}) ([0-9a-f]{64})")
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')
# JSON brackets as +1 / -1 (int8) steps; every other byte is deleted.
_STEPS = bytes(1 if b in b"[{" else 255 if b in b"]}" else 0 for b in range(256))
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class Rejected(ControlError):
    """A received message failed a check; ``reason`` is one of a few short words, for counting."""

    def __init__(self, reason: str, detail: str, sender: str | None = None):
        self.reason = reason
        self.sender = sender
        super().__init__(f"{reason}: {detail}")


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def run_key(deploy_key: bytes, run_id: str) -> bytes:
    """The signing key of a run whose workers agents start: derived from the deployment key that controller and
    agents share, so that it never travels; another run's key says nothing about this one."""
    return hmac.new(deploy_key, b"run key\0" + run_id.encode(), hashlib.sha256).digest()


def read_key(text: str, where: str) -> bytes:
    """A key given as hex (at least 32 bytes); ControlError naming ``where`` otherwise."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) < KEY_BYTES:
        raise ControlError(f"{where}: a deployment key is {2 * KEY_BYTES} or more hex digits "
                           "(make one with: python -c 'import secrets; print(secrets.token_hex(32))')")
    return key


def _mac(key: bytes, topic: str, sender: bytes, seq: bytes, body: bytes) -> bytes:
    signed = hmac.new(key, MAGIC, hashlib.sha256)
    for part in (topic.encode(), sender, seq):
        signed.update(b"\0" + part)
    signed.update(b"\n" + body)
    return signed.hexdigest().encode()


class Sealer:
    """Signs what one sender publishes; thread-safe (the sequence counter is shared by every caller)."""

    def __init__(self, key: bytes, sender: str, first_seq: int = 0):
        if len(key) < 16:
            raise ControlError("a run key must have at least 16 bytes")
        if not SENDER_PATTERN.fullmatch(sender.encode()):
            raise ControlError(f"sender {sender!r} must be letters, digits, . _ - (at most 128)")
        self._key = key
        self.sender = sender
        self._seq = itertools.count(first_seq)  # a client that signs anew on every start counts from its clock
        self._lock = threading.Lock()

    def seal(self, topic: str, message: Message) -> bytes:
        return self.seal_body(topic, encode(message))

    def seal_body(self, topic: str, body: bytes) -> bytes:
        """Sign JSON bytes as they are (``seal`` signs a message's encoding)."""
        with self._lock:
            seq = str(next(self._seq)).encode()
        sender = self.sender.encode()
        return b"%s %s %s %s\n%s" % (MAGIC, sender, seq, _mac(self._key, topic, sender, seq, body), body)


class _Window:
    """The sequence numbers seen from one (sender, topic): the highest, and a bitmap of those below it."""

    def __init__(self) -> None:
        self.highest = -1
        self.seen = 0  # bit i: highest - i was seen

    def admit(self, seq: int) -> str | None:
        """Record ``seq``; None if new, else why it is refused."""
        if seq > self.highest:
            shift = seq - self.highest
            self.seen = ((self.seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            self.highest = seq
            return None
        age = self.highest - seq
        if age >= REPLAY_WINDOW:
            return f"sequence number {seq} is older than the last {REPLAY_WINDOW} seen"
        if self.seen >> age & 1:
            return f"sequence number {seq} was seen before"
        self.seen |= 1 << age
        return None


@dataclass(frozen=True)
class Opened:
    sender: str
    message: Message


class Opener:
    """Checks received messages for one receiver: authenticity, freshness, shape; keeps the replay windows."""

    def __init__(self, key: bytes):
        self._key = key
        self._windows: dict[tuple[bytes, str], _Window] = {}

    def forget(self, sender: str) -> None:
        """Drop every window of ``sender``: its process was started again and counts from 0."""
        for key in [key for key in self._windows if key[0] == sender.encode()]:
            del self._windows[key]

    def open(self, topic: str, payload: bytes) -> Opened:
        if len(payload) > MAX_MESSAGE_BYTES:
            raise Rejected("too large", f"{len(payload)} bytes (at most {MAX_MESSAGE_BYTES})")
        header, newline, body = payload.partition(b"\n")
        match = _HEADER.fullmatch(header) if newline else None
        if match is None:
            raise Rejected("unsigned", "no valid 'DGE1 <sender> <seq> <mac>' header line")
        sender, seq, mac = match.groups()
        name = sender.decode()
        if not hmac.compare_digest(mac, _mac(self._key, topic, sender, seq, body)):
            raise Rejected("bad signature", f"the MAC does not match (claimed sender {name!r})", name)
        refused = self._windows.setdefault((sender, topic), _Window()).admit(int(seq))
        if refused is not None:
            raise Rejected("replayed", f"from {name!r}: {refused}", name)
        depth = json_depth(body)
        if depth > MAX_DEPTH:
            raise Rejected("too deep", f"from {name!r}: JSON nested {depth} deep (at most {MAX_DEPTH})", name)
        try:
            return Opened(name, decode(body))
        except ControlError as exc:
            raise Rejected("invalid", f"from {name!r}: {exc}", name) from exc


def json_depth(body: bytes) -> int:
    """How deep arrays and objects nest in a JSON text, without parsing it (strings are skipped)."""
    steps = _STRINGS.sub(b"", body).translate(_STEPS, _NOT_BRACKETS)
    return int(np.frombuffer(steps, np.int8).cumsum(dtype=np.int64).max()) if steps else 0
