"""This process's listening TCP sockets, and moving one onto a single address without its owner noticing.

For a native library that binds its listening sockets to every interface and offers no setting to choose the
address (Mooncake's transfer engine, see mooncake.py). A socket cannot be bound a second time, so
:func:`rebind` puts a new socket, listening on the wanted address and the same port, under the old one's
descriptor number (``dup2``); the library keeps using that number and never learns of the swap. What the
library relies on carries over: the socket options it set, blocking mode, close-on-exec, and every epoll
set that watches the descriptor (an event loop such as asio's waits on the socket through epoll, which
keys it by the open file, so the new file is added with the same event mask and user data, read from
``/proc/self/fdinfo``). Only system calls and ``/proc`` are used, through ctypes where Python's socket
module would need a socket object: wrapping a descriptor the library owns in one could change its
blocking mode (``socket.setdefaulttimeout``). Linux only, like the transfer engine.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import platform
import re
import socket
import sys
import time
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_EPOLL_CTL_ADD = 1
_EPOLL_ENTRY = re.compile(
    r"^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)(?:.*\bino:\s*([0-9a-f]+))?", re.M
)
"""A line of an epoll descriptor's /proc fdinfo: watched descriptor, event mask, user data, inode (newer kernels)."""
_TCP_LISTEN = "0A"
"""A listening socket's state in /proc/net/tcp."""

_COPIED_OPTIONS = (
    (socket.SOL_SOCKET, socket.SO_REUSEADDR, 4),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 4),
    (socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16),
    (socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 4),
)
"""``(level, option, size)`` of the options a listener's owner may have set and rely on: the receive timeout
paces a blocking accept loop, and accepted connections inherit the others."""


class _EpollEvent(ctypes.Structure):
    if platform.machine() in ("x86_64", "i386", "i686"):
        _pack_ = 1  # the kernel's struct epoll_event is packed on x86 only
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket held open at descriptor ``fd``."""

    fd: int
    inode: int
    address: str
    port: int

    @property
    def on_every_interface(self) -> bool:
        return ipaddress.ip_address(self.address).is_unspecified


def listeners() -> list[Listener]:
    """The listening IPv4 and IPv6 TCP sockets this process holds open, one entry per descriptor."""
    found = []
    for fd, inode in _sockets().items():
        try:
            if _int_option(fd, socket.SO_ACCEPTCONN) and _int_option(fd, socket.SO_PROTOCOL) == socket.IPPROTO_TCP:
                found.append(Listener(fd, inode, *_local_address(fd)))
        except (OSError, ValueError):  # closed meanwhile, or not an IP socket
            continue
    return found


def rebind(listener: Listener, host: str) -> None:
    """Make descriptor ``listener.fd`` a socket listening on ``host`` (a name or address) at the same port.

    The old socket has SO_REUSEPORT turned on so that the new one can bind its port while the old still
    listens; once this returns the old one is closed, unless another thread is blocked in ``accept`` on it
    (that call keeps it open until it returns: see :func:`wait_closed`). The new socket keeps SO_REUSEPORT,
    which lets only processes of the same user bind the same address and port. Raises OSError if ``host`` is
    not an address of this machine, or the descriptor no longer holds that socket.
    """
    fd = listener.fd
    family, _, _, _, sockaddr = socket.getaddrinfo(host, listener.port, type=socket.SOCK_STREAM)[0]
    old = os.dup(fd)  # the old socket stays reachable after dup2, to copy from and to close
    try:
        if _inode(old) != listener.inode:
            raise OSError(f"descriptor {fd} no longer holds the socket listening on port {listener.port}")
        with socket.socket(family, socket.SOCK_STREAM) as new:
            new.setblocking(True)
            for level, option, size in _COPIED_OPTIONS:
                _setsockopt(new.fileno(), level, option, _getsockopt(old, level, option, size))
            new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            _setsockopt(old, socket.SOL_SOCKET, socket.SO_REUSEPORT, (1).to_bytes(4, sys.byteorder))
            new.bind(sockaddr)
            new.listen(socket.SOMAXCONN)
            watchers = _epoll_watchers(fd, listener.inode)
            os.dup2(new.fileno(), fd, inheritable=os.get_inheritable(fd))
        # Read after the swap: an owner turning non-blocking mode on meanwhile did it on the old socket (seen
        # here) or on the new one (kept: this only ever turns it on).
        if not os.get_blocking(old):
            os.set_blocking(fd, False)
        for epoll_fd, events, data in watchers:
            if _libc.epoll_ctl(epoll_fd, _EPOLL_CTL_ADD, fd, ctypes.byref(_EpollEvent(events, data))) != 0:
                raise _errno_error("epoll_ctl(EPOLL_CTL_ADD) of the rebound socket")
    finally:
        os.close(old)


def wait_closed(inodes: set[int], timeout_s: float) -> set[int]:
    """Wait until none of the sockets ``inodes`` listens any more; return those still listening."""
    deadline = time.monotonic() + timeout_s
    while (left := still_listening(inodes)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def still_listening(inodes: set[int]) -> set[int]:
    """Those of the sockets ``inodes`` that still listen.

    Looks in the network namespace's socket tables, not at this process's descriptors: a socket that only a
    blocked ``accept`` keeps open has no descriptor left but still listens.
    """
    found = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/self/net/{table}") as rows:
            next(rows)
            found |= {int(fields[9]) for fields in map(str.split, rows) if fields[3] == _TCP_LISTEN}
    return inodes & found


def _sockets() -> dict[int, int]:
    """Descriptor -> inode of every socket this process holds open."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = _inode(int(name))
        except (OSError, ValueError):  # closed meanwhile, or not a socket
            continue
    return found


def _inode(fd: int) -> int:
    target = os.readlink(f"/proc/self/fd/{fd}")
    if not target.startswith("socket:["):
        raise ValueError(f"descriptor {fd} is not a socket: {target}")
    return int(target[8:-1])


def _epoll_watchers(fd: int, inode: int) -> list[tuple[int, int, int]]:
    """``(epoll descriptor, event mask, user data)`` of every epoll set in this process that watches ``fd``."""
    watchers = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/self/fdinfo/{name}") as info:
                entries = _EPOLL_ENTRY.findall(info.read())
        except OSError:
            continue
        watchers += [
            (int(name), int(events, 16), int(data, 16))
            for tfd, events, data, ino in entries
            if int(tfd) == fd and (not ino or int(ino, 16) == inode)
        ]
    return watchers


def _local_address(fd: int) -> tuple[str, int]:
    """``getsockname`` of an IPv4 or IPv6 socket: (address, port)."""
    raw, length = ctypes.create_string_buffer(128), ctypes.c_uint32(128)
    if _libc.getsockname(fd, raw, ctypes.byref(length)) != 0:
        raise _errno_error("getsockname")
    family, port = int.from_bytes(raw.raw[0:2], sys.byteorder), int.from_bytes(raw.raw[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(family, raw.raw[4:8]), port
    if family == socket.AF_INET6:
        return socket.inet_ntop(family, raw.raw[8:24]), port
    raise ValueError(f"descriptor {fd} is not an IP socket (family {family})")


def _int_option(fd: int, option: int) -> int:
    return int.from_bytes(_getsockopt(fd, socket.SOL_SOCKET, option, 4), sys.byteorder)


def _getsockopt(fd: int, level: int, option: int, size: int) -> bytes:
    value, length = ctypes.create_string_buffer(size), ctypes.c_uint32(size)
    if _libc.getsockopt(fd, level, option, value, ctypes.byref(length)) != 0:
        raise _errno_error("getsockopt")
    return value.raw[: length.value]


def _setsockopt(fd: int, level: int, option: int, value: bytes) -> None:
    if _libc.setsockopt(fd, level, option, value, len(value)) != 0:
        raise _errno_error("setsockopt")


def _errno_error(call: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{call}: {os.strerror(code)}")
