"""Client addresses: the one normal form every listener, limit and check uses."""

import functools

from appliance.address import normal_ip

# Every connection and every check asks for the same few client addresses:
# their normal forms are remembered (ipaddress objects are immutable).
_CACHED = 4096


def peer_ip(peer):
    """The peer's IP as a string (a Twisted address or a string); IPv4-mapped
    IPv6 as plain IPv4, so ``::ffff:192.0.2.1`` and ``192.0.2.1`` are one client."""
    host = getattr(peer, "host", None) or str(peer)
    return _ip_text(host) if isinstance(host, str) else _text_of(host)


@functools.lru_cache(maxsize=_CACHED)
def _ip_text(host):
    return _text_of(host)


def _text_of(host):
    ip = normal_ip(host)
    return host if ip is None else str(ip)      # not an IP: a UNIX socket in tests


def peer_in(networks, ip):
    """True when ``ip`` (a string) lies in one of ``networks``."""
    if not networks:
        return False
    parsed = _parsed(ip) if isinstance(ip, str) else normal_ip(ip)
    return parsed is not None and any(parsed in network for network in networks)


@functools.lru_cache(maxsize=_CACHED)
def _parsed(text):
    return normal_ip(text)
