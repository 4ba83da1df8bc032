"""The client's address: the TCP peer, or behind a trusted proxy its X-Forwarded-For.

Per-address limits key on this. A client that is not a trusted proxy cannot choose its
address by sending X-Forwarded-For: the header is believed only from a trusted peer, and
then only its right-most address that is not itself trusted (the one the last trusted
proxy saw connecting), so entries a client prepends are never read.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def parse_networks(spec: str) -> tuple[Network, ...]:
    """`10.0.0.0/8, 192.168.1.7` as networks; ValueError naming a malformed entry."""
    networks = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR") from None
    return tuple(networks)


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def client_address(peer: str | None, forwarded_for: list[str], trusted: str) -> str:
    """The address limits apply to. `forwarded_for` holds every X-Forwarded-For header
    in the order received; `trusted` is CHATNODE_TRUSTED_PROXIES."""
    address = peer or "unknown"
    networks = parse_networks(trusted)
    if not networks or not _trusted(address, networks):
        return address
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        if not hop:
            continue
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address  # a malformed chain: fall back to the proxy itself
        if not _trusted(hop, networks):
            return hop
    return address  # every hop is trusted (or none given): the proxy's own address


def limit_subject(address: str) -> str:
    """One counter per client: an IPv6 client by its /64 (a host is routinely given a
    whole /64 and may use any address in it, so counting single addresses would let it
    escape every per-address limit); an IPv4-mapped IPv6 address as the IPv4 one."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
