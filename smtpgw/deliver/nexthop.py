"""Next hops of a destination: what the Sender connects to for one ``rules.routing.Destination``.

Owns: turning a destination into hops (host, address, port): an IP literal of a ForwardRoute as
is, ``localhost`` as loopback (RFC 6761 §6.3), a bracketed host by its addresses, a domain by its
MX (RFC 5321 §5.1, through ``deliver/mx.py`` and the loop's stub resolver); the ``Resolve``
callable type the Sender is given.

Must never: block the loop (every lookup answers through ``done``), or turn a lookup's temporary
failure into a permanent one (``mx`` classifies them; this module passes them on unchanged).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable

from smtpgw.deliver import mx
from smtpgw.net.dns import Resolver
from smtpgw.rules import routing

Destination = routing.Destination


@dataclass
class Hop:
    host: str
    ip: str
    port: int


# done(hops, permanent error, temporary error): the errors start with an enhanced status code
ResolveCallback = Callable[[list[Hop], str | None, str | None], None]
Resolve = Callable[[Destination, ResolveCallback], None]


def literal_hops(dest: Destination) -> list[Hop] | None:
    """Hops known without DNS: a bracketed IP address in a ForwardRoute."""
    if dest[0] != "host":
        return None
    host, port = dest[1], dest[2]  # type: ignore[misc]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return [Hop(host, str(ip), port)]


def resolve_destination(resolver: Resolver, dest: Destination, done: ResolveCallback) -> None:
    """Next hops of ``dest``: an IP literal as is, ``localhost`` as loopback (RFC 6761 §6.3), a
    bracketed host by its addresses, a domain by its MX (RFC 5321 §5.1)."""
    hops = literal_hops(dest)
    if hops is not None:
        done(hops, None, None)
        return
    port = dest[2] if dest[0] == "host" else 25  # type: ignore[misc]
    if dest[0] == "host" and dest[1] == "localhost":
        done([Hop("localhost", "127.0.0.1", port)], None, None)
        return

    def finished(result: mx.NextHops) -> None:
        done([Hop(host, ip, port) for host, ip in result.hosts], result.permanent_error, result.temporary_error)

    if dest[0] == "mx":
        mx.resolve_next_hops(resolver, dest[1], finished)
    else:
        mx.resolve_host(resolver, dest[1], finished)


def through(resolver: Callable[[], Resolver]) -> Resolve:
    """The ``Resolve`` of the running gateway: the resolver in use at each call (a reload replaces it)."""
    return lambda dest, done: resolve_destination(resolver(), dest, done)
