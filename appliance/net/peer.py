"""Client addresses: the one normal form every listener, limit and check uses."""

from appliance.address import normal_ip


def peer_ip(peer):
    """The peer's IP as a string (a Twisted address or a string); IPv4-mapped
    IPv6 as plain IPv4, so ``::ffff:192.0.2.1`` and ``192.0.2.1`` are one client."""
    host = getattr(peer, "host", None) or str(peer)
    ip = normal_ip(host)
    return host if ip is None else str(ip)      # not an IP: a UNIX socket in tests


def peer_in(networks, ip):
    """True when ``ip`` (a string) lies in one of ``networks``."""
    if not networks:
        return False
    parsed = normal_ip(ip)
    return parsed is not None and any(parsed in network for network in networks)
