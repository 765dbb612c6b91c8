"""Refuse network connections to anything but this machine (tests and CI run with it on).

``block_network()`` patches ``socket`` so that connecting to, or resolving, any host other than a
loopback address raises ``NetworkBlockedError``. Jupyter kernels talk to their client over
loopback, so notebooks still run. ``helpers`` calls it at import when ``QWENVL_BLOCK_NETWORK=1``,
which ``tests/conftest.py`` sets, so kernels started by nbval are guarded too.
"""

from __future__ import annotations

import ipaddress
import socket

_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}
_originals: dict[str, object] = {}


class NetworkBlockedError(ConnectionRefusedError):
    """Raised for any attempt to reach a host other than this machine."""


def _is_local(host) -> bool:
    if host is None:
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback or host in ("0.0.0.0", "::")
    except ValueError:
        return False


def _check(address) -> None:
    if isinstance(address, tuple) and address and not _is_local(address[0]):
        raise NetworkBlockedError(f"network access to {address[0]!r} is blocked: this course runs offline")


def block_network() -> None:
    """Install the guard (idempotent)."""
    if _originals:
        return
    _originals["connect"] = socket.socket.connect
    _originals["connect_ex"] = socket.socket.connect_ex
    _originals["getaddrinfo"] = socket.getaddrinfo

    def connect(self, address):
        _check(address)
        return _originals["connect"](self, address)

    def connect_ex(self, address):
        _check(address)
        return _originals["connect_ex"](self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_local(host):
            raise NetworkBlockedError(f"name lookup of {host!r} is blocked: this course runs offline")
        return _originals["getaddrinfo"](host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo


def unblock_network() -> None:
    """Remove the guard."""
    if _originals:
        socket.socket.connect = _originals.pop("connect")
        socket.socket.connect_ex = _originals.pop("connect_ex")
        socket.getaddrinfo = _originals.pop("getaddrinfo")
