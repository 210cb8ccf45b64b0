"""Where a tenant's alert webhook may go, and the one address it is sent to (SSRF defence).

A tenant names the URL; the platform must never deliver into its own network. Three ways round a name check
are closed here:

- **Rebinding**: the name is resolved once, every address is checked, and the connection goes to a checked
  address (``pin``): the Host header and TLS SNI keep the name, so the receiver and its certificate see the
  URL the tenant gave. A resolver that answers a public address to the check and 127.0.0.1 to the connect gets
  nothing, because there is no second lookup.
- **IPv4 inside IPv6**: IPv4-mapped (``::ffff:a.b.c.d``), IPv4-compatible (``::a.b.c.d``), NAT64
  (``64:ff9b::/96`` and the local-use ``64:ff9b:1::/48``) and 6to4 (``2002::/16``) addresses carry an IPv4
  address a gateway may reach; the embedded address is judged too (``unwrapped``).
- **Other IPv4 spellings**: ``http://2130706433/``, ``http://0x7f.1/`` and ``http://0177.0.0.1/`` are all
  127.0.0.1 to ``inet_aton``; a host whose last label is numeric must be a canonical dotted quad
  (``canonical_host``), which the settings PUT enforces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def unwrapped(address: Address) -> list[Address]:
    """The address, and the IPv4 address it carries when it is one of the IPv6 forms that embed one."""
    if not isinstance(address, ipaddress.IPv6Address):
        return [address]
    found: list[Address] = [address]
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    elif address.sixtofour is not None:
        found.append(address.sixtofour)
    elif any(address in net for net in _NAT64) or int(address) >> 32 == 0:  # NAT64, IPv4-compatible (::a.b.c.d)
        found.append(low32)
    return found


def forbidden(address: Address) -> bool:
    """Loopback, private, link-local, reserved, multicast or unspecified, itself or in the IPv4 it carries."""
    return any(not a.is_global or a.is_multicast for a in unwrapped(address))


def canonical_host(host: str) -> None:
    """Refuse IPv4 spelled other than as a canonical dotted quad (decimal, hex, octal or short forms)."""
    name = host.rstrip(".").lower()
    if name.startswith("[") or not _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):
        return  # an IPv6 literal, or a name (a top-level label is never numeric)
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        raise ValueError("an IPv4 host must be written as four decimal numbers (a.b.c.d)") from None


def addresses(host: str, *, resolve: bool) -> list[Address]:
    """The host as an IP literal, or (``resolve``) every address the name resolves to; [] when it does not."""
    literal = _literal(host)
    if literal is not None or not resolve:
        return [literal] if literal is not None else []
    try:
        infos = socket.getaddrinfo(host.rstrip(".").lower(), None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return _of(infos)


async def resolved(host: str) -> list[Address]:
    """``addresses(host, resolve=True)`` without blocking the event loop, so the caller's deadline covers a
    tenant's nameserver that stalls."""
    literal = _literal(host)
    if literal is not None:
        return [literal]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host.rstrip(".").lower(), None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return _of(infos)


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.rstrip(".").lower())
    except ValueError:
        return None


def _of(infos: list[tuple[Any, ...]]) -> list[Address]:
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def is_local_name(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


@dataclass(frozen=True)
class Pinned:
    """A request to ``url`` sent to one checked address: connect to ``connect_url``, say ``host``, and send the
    URL's own credentials (``user:password@``), if any, as Basic authentication."""

    connect_url: str
    host: str
    sni_hostname: str | None
    address: Address
    credentials: tuple[str, str] | None = None


async def pin(url: str, *, allow_private: bool) -> Pinned:
    """Resolve ``url``'s host once and choose the address to connect to; PermissionError when any address the
    name has is forbidden (unless ``allow_private``), OSError when it has none."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if is_local_name(host) and not allow_private:
        raise PermissionError("the URL names localhost: not sent")
    found = await resolved(host)
    if not found:
        raise OSError(f"the host {host!r} does not resolve")
    if not allow_private and any(forbidden(a) for a in found):
        raise PermissionError("the URL resolves to a loopback, private or link-local address: not sent")
    address = found[0]
    netloc = f"[{address}]" if address.version == 6 else str(address)
    if parts.port is not None:
        netloc += f":{parts.port}"
    sni = host if parts.scheme.lower() == "https" and _literal(host) is None else None
    header = parts.netloc.rpartition("@")[2]  # the credentials go in Authorization, never in Host
    credentials = (unquote(parts.username), unquote(parts.password or "")) if parts.username is not None else None
    return Pinned(urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, "")), header, sni, address,
                  credentials)
