"""Client network keys: what the defences count, limit, greylist and ban.

IPv4 clients are keyed per address (/32) for limits and bans and per /24 for
greylisting; IPv6 clients per ``[limits] ipv6_prefix`` for everything (an
attacker owns a whole /64). An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``)
is the IPv4 address: it must not slip past an IPv4 ban.

Keys are network strings (``192.0.2.1/32``, ``2001:db8::/64``); a peer that
is not an IP (a UNIX socket in tests) is keyed by its text as given.
"""

import functools
import ipaddress

from appliance.address import normal_ip as normalise   # the one IP normal form

GREYLIST_IPV4_PREFIX = 24


@functools.lru_cache(maxsize=8192)
def network_for(ip, ipv4_prefix, ipv6_prefix):
    """The ``ip_network`` of ``ip`` at the given prefixes, or None."""
    address = normalise(ip)
    if address is None:
        return None
    prefix = ipv4_prefix if address.version == 4 else ipv6_prefix
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


def client_key(ip, ipv6_prefix):
    """The key for limits and bans: IPv4 /32, IPv6 /ipv6_prefix."""
    network = network_for(ip, 32, ipv6_prefix)
    return str(ip) if network is None else network.with_prefixlen


class ClientCounter:
    """What the defences that count clients share (``Bans``, ``AuthGuard``,
    ``Rates``): the shared ``state``, the ``[limits]`` section, the
    ``exempt`` networks (allow + trusted, never limited) and ``key_of(ip)``,
    the client's network key."""

    def __init__(self, state, limits, exempt, clock=None):
        self.state = state
        self.limits = limits
        self.exempt = exempt
        self.clock = clock
        self.ipv6_prefix = limits.ipv6_prefix

    def key_of(self, ip):
        return client_key(ip, self.ipv6_prefix)


def greylist_key(ip, ipv6_prefix):
    """The key for greylisting: IPv4 /24, IPv6 /ipv6_prefix."""
    network = network_for(ip, GREYLIST_IPV4_PREFIX, ipv6_prefix)
    return str(ip) if network is None else network.with_prefixlen


def parse_network(text):
    """``192.0.2.1``, ``192.0.2.0/24``, ``2001:db8::/48``, ``::ffff:192.0.2.1``
    -> an ``ip_network`` (host bits cleared); ValueError when it is none."""
    text = str(text).strip()
    if "/" not in text:
        address = normalise(text)
        if address is None:
            raise ValueError(f"{text!r} is not an IP address or network")
        return ipaddress.ip_network(address)
    address, _, prefix = text.partition("/")
    base = normalise(address)
    if base is None or not prefix.isdigit():
        raise ValueError(f"{text!r} is not an IP network")
    plen = int(prefix)
    if base.version == 4 and ipaddress.ip_address(address.strip("[]")).version == 6:
        plen -= 96              # ::ffff:192.0.2.0/120 is 192.0.2.0/24
    try:
        return ipaddress.ip_network(f"{base}/{plen}", strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP network") from None


class Networks:
    """A fixed list of networks (``allow``, ``trusted_networks``, ``deny``)
    asked per client address; answers are cached."""

    def __init__(self, networks):
        self.networks = tuple(networks)
        self.contains = functools.lru_cache(maxsize=8192)(self._contains)

    def _contains(self, ip):
        if not self.networks:
            return False
        address = normalise(ip)
        return address is not None and any(
            address.version == n.version and address in n for n in self.networks)

    def overlaps(self, network):
        """True when ``network`` (an ip_network) lies inside one of ours."""
        return any(network.version == n.version and network.subnet_of(n)
                   for n in self.networks)

    def __bool__(self):
        return bool(self.networks)
