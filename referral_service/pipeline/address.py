"""Who the client is, for per-address rate limits: an IPv4 address or an IPv6 network.

The client is the transport's peer (the gRPC peer, or the HTTP connection's client, both in
gRPC's peer form), unless the peer is in ``trusted_proxies``: then it is the right-most address
of the configured header (``x-forwarded-for``) that is not itself a trusted proxy, so a client
cannot push a fake address in front. IPv6 addresses are grouped by network (/64 by default),
because one host usually owns a whole /64.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ClientAddress:
    def __init__(self, trusted_proxies: Iterable[str], header: str, ipv6_prefix: int) -> None:
        self._trusted: list[IpNetwork] = [ipaddress.ip_network(c, strict=False) for c in trusted_proxies]
        #: The client-address header (lower-case) the transports collect for ``resolve``.
        self.header = header.lower()
        self._ipv6_prefix = ipv6_prefix
        # Peers repeat (one per connection): parse each one once.
        self._peer_key = functools.lru_cache(maxsize=4096)(self._peer_key_uncached)

    def _is_trusted(self, address: IpAddress) -> bool:
        return any(address in network for network in self._trusted)

    def resolve(self, peer: str, forwarded: Sequence[str]) -> str:
        """The limit key of the client: an IP (v4) or a network (v6), or the raw peer."""
        if not (self._trusted and forwarded):
            return self._peer_key(peer)
        address = parse_peer(peer)
        if address is None:
            return peer or "unknown"
        return self._through_proxies(address, forwarded)

    def client_ip(self, peer: str, forwarded: Sequence[str]) -> str:
        """The client's own address (not its limit network): the TCP peer, or behind a trusted
        proxy the address it names; "" when the peer is not an IP (a unix socket)."""
        address = parse_peer(peer)
        if address is None:
            return ""
        if self._trusted and forwarded:
            address = self._client_behind(address, forwarded)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(address)

    def end_user(self, value: str) -> str | None:
        """The limit key of an end user's address forwarded by a service (None: not an IP)."""
        try:
            address = ipaddress.ip_address(value.strip().strip("[]"))
        except ValueError:
            return None
        return self._key(address)

    def _through_proxies(self, address: IpAddress, forwarded: Sequence[str]) -> str:
        return self._key(self._client_behind(address, forwarded))

    def _client_behind(self, address: IpAddress, forwarded: Sequence[str]) -> IpAddress:
        """From a trusted peer, the right-most hop of the header that is not a trusted proxy."""
        if self._is_trusted(address):
            hops = [part.strip() for value in forwarded for part in value.split(",")]
            for hop in reversed(hops):
                try:
                    candidate = ipaddress.ip_address(hop.strip("[]"))
                except ValueError:
                    break  # garbage in the header: stop at the last trustworthy hop
                address = candidate
                if not self._is_trusted(candidate):
                    break
        return address

    def _peer_key_uncached(self, peer: str) -> str:
        address = parse_peer(peer)
        return peer or "unknown" if address is None else self._key(address)

    def _key(self, address: IpAddress) -> str:
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, self._ipv6_prefix), strict=False))
        return str(address)


def parse_peer(peer: str) -> IpAddress | None:
    """``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` -> the address; None for unix sockets etc."""
    kind, _, rest = peer.partition(":")
    try:
        if kind == "ipv4":
            return ipaddress.ip_address(rest.rsplit(":", 1)[0])
        if kind == "ipv6":
            return ipaddress.ip_address(rest.rsplit(":", 1)[0].strip("[]").split("%")[0])
    except ValueError:
        return None
    return None
