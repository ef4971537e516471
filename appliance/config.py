"""The INI configuration (SPEC §3) read into frozen, typed objects.

``load(path)`` / ``parse(text, base_dir)`` return a ``Config`` whose attributes
mirror the file: ``cfg.server.hostname``, ``cfg.limits.command_timeout`` ...
Every key has a default. Values are converted once, here, so the rest of the
code never parses a string: durations are float seconds, sizes int bytes,
lists tuples, CIDRs ``ipaddress`` networks, ``host:port`` a ``HostPort`` (or
None when empty), on/off a bool, optional paths None when empty, every other
path absolute.

Problems never stop at the first one: all of them are collected, each one line
``[section] key: why``, and raised together as ``ConfigError(problems)`` so an
operator fixes a file in one go.
"""

import configparser
import dataclasses
import difflib
import ipaddress
import os
import re
from collections import namedtuple
from urllib.parse import urlsplit

from appliance.address import is_ip

HostPort = namedtuple("HostPort", "host port")

LISTENERS = ("mx", "submission", "submissions", "submission_alt",
             "imap", "imaps", "pop3", "pop3s", "admin_ssh", "http", "https")


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` is a list of lines."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------------------
# Value converters: each takes the raw string and returns the typed value or
# raises ValueError with the "why" part of the problem line.

def _show(raw):
    """The raw value quoted for an error line (never spanning lines)."""
    return '"' + raw.replace("\\", "\\\\").replace("\n", "\\n") + '"'


def _single(raw):
    if "\n" in raw:
        raise ValueError(f"{_show(raw)} spans several lines; one value expected")
    return raw


def _items(raw):
    """Split a list on commas (and continuation lines), dropping empty items."""
    return [item.strip() for item in re.split(r"[,\n]", raw) if item.strip()]


def text(raw):
    return _single(raw)


_DURATION = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)\s*([smhd]?)$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(raw):
    """``30s``, ``5m``, ``2h``, ``5d`` or bare seconds -> float seconds."""
    match = _DURATION.match(_single(raw).strip())
    if not match:
        raise ValueError(f"{_show(raw)} is not a duration (use 30s, 5m, 2h, 5d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def positive_duration(raw):
    value = duration(raw)
    if value <= 0:
        raise ValueError(f"{_show(raw)} must be longer than zero")
    return value


def duration_list(raw):
    items = _items(raw)
    if not items:
        raise ValueError("at least one duration is needed (e.g. 1m, 5m, 1h)")
    return tuple(positive_duration(item) for item in items)


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def size(raw):
    """``25M``, ``512K``, ``1G`` (binary) or bare bytes -> int bytes, > 0."""
    match = _SIZE.match(_single(raw).strip())
    if not match:
        raise ValueError(f"{_show(raw)} is not a size (use 512K, 25M, 1G or bytes)")
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"{_show(raw)} must be larger than zero")
    return value


def integer(minimum, maximum=None):
    def convert(raw):
        try:
            value = int(_single(raw).strip())
        except ValueError:
            raise ValueError(f"{_show(raw)} is not a whole number") from None
        if value < minimum:
            raise ValueError(f"{value} is too small (at least {minimum})")
        if maximum is not None and value > maximum:
            raise ValueError(f"{value} is too large (at most {maximum})")
        return value
    convert.__name__ = "integer"
    return convert


_TRUE = ("on", "yes", "true", "1")
_FALSE = ("off", "no", "false", "0")


def boolean(raw):
    value = _single(raw).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{_show(raw)} is not on or off")


def choice(*allowed):
    def convert(raw):
        value = _single(raw).strip().lower()
        if value not in allowed:
            raise ValueError(f"{_show(raw)} is not one of: {', '.join(allowed)}")
        return value
    convert.__name__ = "choice"
    return convert


_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def _ascii_domain(name):
    """The A-label (xn--) form of a domain name, or ValueError."""
    name = name.strip().rstrip(".").lower()
    try:
        encoded = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{_show(name)} is not a valid domain name") from None
    labels = encoded.split(".")
    if len(encoded) > 253 or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"{_show(name)} is not a valid domain name")
    return encoded


def unicode_domain(name):
    """The domain as addresses are compared: lower-case, U-labels, no dot."""
    encoded = _ascii_domain(name)
    return ".".join(label.encode("ascii").decode("idna") if label.startswith("xn--")
                    else label for label in encoded.split("."))


def hostname(raw):
    """A host name as used in the banner and EHLO: ASCII, lower-case; may be empty."""
    value = _single(raw).strip()
    return _ascii_domain(value) if value else ""


def domain_list(raw):
    domains = []
    for item in _items(raw):
        domain = unicode_domain(item)
        if domain not in domains:
            domains.append(domain)
    return tuple(domains)


def _split_host_port(raw, default_port=None):
    """``host:port``, ``[v6]:port`` (and, with a default port, ``host``, ``v6``)."""
    value = raw.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{_show(raw)} is not host:port (e.g. [::1]:25)")
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, None        # a bare host, or a bare IPv6 address
    if port is None:
        if default_port is None:
            raise ValueError(f"{_show(raw)} is not host:port "
                             "(e.g. 127.0.0.1:25 or [::1]:25)")
        port = str(default_port)
    return host, port


def _port(raw, port):
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{_show(raw)} has no valid port (1..65535)")
    return int(port)


def _host(raw, host):
    """An IP address or a host name, else ValueError."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or ":" in host:
        raise ValueError(f"{_show(raw)} has no valid host")
    try:
        return _ascii_domain(host)
    except ValueError:
        raise ValueError(f"{_show(raw)} has no valid host") from None


def host_port(default_port=None):
    """``host:port`` -> HostPort, or None when empty (the listener is off)."""
    def convert(raw):
        value = _single(raw).strip()
        if not value:
            return None
        host, port = _split_host_port(value, default_port)
        return HostPort(_host(raw, host), _port(raw, port))
    convert.__name__ = "host_port"
    return convert


def nameserver_list(raw):
    """``ip`` or ``ip:port`` items (port 53 by default); host names refused."""
    servers = []
    for item in _items(raw):
        host, port = _split_host_port(item, 53)
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"{_show(item)} is not an IP address (or ip:port)") from None
        servers.append(HostPort(address, _port(item, port)))
    return tuple(servers)


def network_list(raw):
    networks = []
    for item in _items(raw):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{_show(item)} is not an IP network "
                             "(e.g. 192.0.2.0/24 or 2001:db8::/32)") from None
    return tuple(networks)


def address_list(raw):
    addresses = []
    for item in _items(raw):
        try:
            addresses.append(ipaddress.ip_address(item))
        except ValueError:
            raise ValueError(f"{_show(item)} is not an IP address") from None
    return tuple(addresses)


def http_url(raw):
    """An http:// or https:// URL with a host; empty means 'not set'."""
    value = _single(raw).strip()
    return _url(raw, value, ("http", "https")) if value else ""


def _url(raw, value, schemes):
    """``value`` when it is a URL of one of ``schemes`` with a host and a valid port."""
    parts = urlsplit(value)
    if parts.scheme.lower() not in schemes or not parts.hostname:
        raise ValueError(f"{_show(raw)} is not an {' or '.join(s + '://' for s in schemes)} URL")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{_show(raw)} has no valid port") from None
    return value


_MAIL_LOCAL = re.compile(r"^[^\s@<>()\[\],;:\"\\]+$")


def mail_target(raw):
    """A local part (of the first local domain) or an address; empty: nobody."""
    value = _single(raw).strip()
    if not value:
        return ""
    local, at, domain = value.rpartition("@") if "@" in value else (value, "", "")
    if not _MAIL_LOCAL.match(local) or not value.isprintable():
        raise ValueError(f"{_show(raw)} is not a local part or an address")
    return f"{local}@{unicode_domain(domain)}" if at else local


def path(raw):
    """A path (resolved against base_dir later); empty means 'not set'."""
    return _single(raw).strip()


def required_path(raw):
    """A path that cannot be left empty."""
    value = path(raw)
    if not value:
        raise ValueError("must be set (a file or directory path)")
    return value


def ldap_url(raw):
    value = _single(raw).strip()
    parts = urlsplit(value)
    if parts.scheme.lower() not in ("ldap", "ldaps") or not parts.hostname:
        raise ValueError(f"{_show(raw)} is not an ldap:// or ldaps:// URL")
    try:
        parts.port
    except ValueError:
        raise ValueError(f"{_show(raw)} has no valid port") from None
    return value


def https_url(raw):
    """An https:// URL with a host (the ACME directory)."""
    return _url(raw, _single(raw).strip(), ("https",))


_EMAIL = re.compile(r"^[^@\s,;<>\"]+@[^@\s,;<>\"]+$")


def email(raw):
    """A contact address (local@domain), or empty."""
    value = _single(raw).strip()
    if not value:
        return ""
    if not _EMAIL.match(value):
        raise ValueError(f"{_show(raw)} is not an e-mail address (local@domain)")
    local, _, domain = value.rpartition("@")
    try:
        return f"{local}@{_ascii_domain(domain)}"
    except ValueError:
        raise ValueError(f"{_show(raw)} is not an e-mail address (local@domain)") from None


def ldap_filter(raw):
    value = _single(raw).strip()
    if not (value.startswith("(") and value.endswith(")")) or "{address}" not in value:
        raise ValueError(f"{_show(raw)} must be an LDAP filter in parentheses "
                         "containing {address}")
    return value


_ATTRIBUTE = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")


def attribute_list(raw):
    items = _items(raw)
    for item in items:
        if not _ATTRIBUTE.match(item):
            raise ValueError(f"{_show(item)} is not an LDAP attribute name")
    if not items:
        raise ValueError("at least one attribute is needed (e.g. mail)")
    return tuple(items)


def selector(raw):
    value = _single(raw).strip().lower()
    if not value or not all(_LABEL.match(label) for label in value.split(".")):
        raise ValueError(f"{_show(raw)} is not a valid DKIM selector (letters, "
                         "digits, hyphens)")
    return value


# ---------------------------------------------------------------------------
# The schema: section -> keys, in the order of SPEC §3.

@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    default: str          # raw text, converted like a value from the file
    convert: object
    is_path: bool = False


def _keys(*keys):
    return {key.name: key for key in keys}


_PORT = integer(1, 65535)

SCHEMA = {
    "server": _keys(
        Key("hostname", "", hostname),
        Key("domains", "", domain_list),
        Key("data_dir", "./var", required_path, True),
        Key("max_message_size", "25M", size),
        Key("max_recipients", "100", integer(1)),
        Key("public_addresses", "", address_list),
    ),
    "listen": _keys(
        Key("mx", "127.0.0.1:8025", host_port()),
        Key("submission", "127.0.0.1:8587", host_port()),
        Key("submissions", "127.0.0.1:8465", host_port()),
        Key("submission_alt", "127.0.0.1:2525", host_port()),
        Key("imap", "127.0.0.1:8143", host_port()),
        Key("imaps", "127.0.0.1:8993", host_port()),
        Key("pop3", "127.0.0.1:8110", host_port()),
        Key("pop3s", "127.0.0.1:8995", host_port()),
        Key("admin_ssh", "127.0.0.1:8022", host_port()),
        Key("http", "127.0.0.1:8080", host_port()),
        Key("https", "127.0.0.1:8443", host_port()),
    ),
    "tls": _keys(
        Key("certificate", "", path, True),
        Key("private_key", "", path, True),
        Key("acme", "off", boolean),
        Key("acme_directory", "https://acme-v02.api.letsencrypt.org/directory", https_url),
        Key("acme_email", "", email),
        Key("acme_challenge", "tls-alpn-01", choice("tls-alpn-01", "http-01")),
        Key("acme_ca_file", "", path, True),
        Key("mta_sts", "testing", choice("none", "testing", "enforce")),
    ),
    "auth": _keys(
        Key("backend", "file", choice("file", "ldap")),
        Key("users_file", "./var/users", required_path, True),
        Key("ldap_url", "ldap://127.0.0.1:389", ldap_url),
        Key("ldap_bind_dn", "", text),
        Key("ldap_bind_password_file", "", path, True),
        Key("ldap_base_dn", "", text),
        Key("ldap_user_filter", "(mail={address})", ldap_filter),
        Key("ldap_address_attributes", "mail", attribute_list),
        Key("ldap_starttls", "on", boolean),
        Key("ldap_ca_file", "", path, True),
        Key("oauth2_issuer", "", text),
        Key("oauth2_audience", "", text),
        Key("oauth2_jwks_file", "", path, True),
    ),
    "relay": _keys(
        Key("trusted_networks", "", network_list),
        Key("smarthost", "", host_port(default_port=25)),
        Key("mailbox_host", "", host_port(default_port=25)),
    ),
    "dns": _keys(
        Key("nameservers", "", nameserver_list),
        Key("timeout", "5s", positive_duration),
    ),
    "outbound": _keys(
        Key("port", "25", _PORT),
        Key("tls", "opportunistic", choice("opportunistic", "required", "off")),
    ),
    "queue": _keys(
        Key("retry", "1m, 5m, 15m, 30m, 1h, 2h, 4h", duration_list),
        Key("max_age", "5d", positive_duration),
        Key("delay_warning", "4h", duration),
        Key("concurrency", "50", integer(1)),
        Key("per_domain", "5", integer(1)),
    ),
    "dkim": _keys(
        Key("selector", "mail", selector),
        Key("key_dir", "", path, True),
        Key("algorithm", "rsa-sha256", choice("rsa-sha256", "ed25519-sha256")),
    ),
    "checks": _keys(
        Key("spf", "on", choice("on", "enforce", "off")),
        Key("dkim", "on", boolean),
        Key("dmarc", "enforce", choice("enforce", "report", "off")),
        Key("greylist", "off", boolean),
        Key("greylist_delay", "5m", positive_duration),
        Key("greylist_window", "2d", positive_duration),
        Key("greylist_pass_after", "5", integer(1)),
        Key("greylist_keep", "35d", positive_duration),
    ),
    "limits": _keys(
        Key("connections_per_ip", "20", integer(1)),
        Key("messages_per_hour_per_ip", "300", integer(1)),
        Key("messages_per_hour_per_user", "500", integer(1)),
        Key("auth_failures_before_ban", "5", integer(1)),
        Key("auth_failure_window", "15m", positive_duration),
        Key("ban_time", "1h", positive_duration),
        Key("ban_time_max", "30d", positive_duration),
        Key("ipv6_prefix", "64", integer(16, 128)),
        Key("connections_per_minute_per_ip", "60", integer(1)),
        Key("junk_commands", "100", integer(1)),
        Key("allow", "", network_list),
        Key("deny", "", network_list),
        Key("command_timeout", "5m", positive_duration),
        Key("data_timeout", "10m", positive_duration),
        Key("max_errors", "20", integer(1)),
        Key("imap_idle_timeout", "30m", positive_duration),
        Key("pop3_timeout", "10m", positive_duration),
    ),
    "admin": _keys(
        Key("authorized_keys", "./var/admin_authorized_keys", required_path, True),
        Key("readonly_keys", "", path, True),
        Key("host_key", "", path, True),          # empty: <data_dir>/ssh_host_ed25519_key
        Key("idle_timeout", "15m", positive_duration),
        Key("control_socket", "", path, True),    # empty: <data_dir>/control.sock
    ),
    "log": _keys(
        Key("events", "./var/log/events.json", required_path, True),
    ),
    "audit": _keys(
        Key("enabled", "on", boolean),
        Key("window", "15m", positive_duration),
        Key("harvest_threshold", "20", integer(1)),
        Key("relay_probe_threshold", "3", integer(1)),
        Key("protocol_error_threshold", "30", integer(1)),
        Key("spray_threshold", "10", integer(1)),
        Key("account_attack_threshold", "20", integer(1)),
        Key("send_spike", "200", integer(1)),
        Key("alert_to", "postmaster", mail_target),
        Key("alert_interval", "15m", positive_duration),
        Key("webhook", "", http_url),
    ),
}


def _section_class(section, keys):
    return dataclasses.make_dataclass(
        f"{section.title().replace('_', '')}Section", list(keys),
        frozen=True, namespace={"__module__": __name__})


SECTION_CLASSES = {section: _section_class(section, keys)
                   for section, keys in SCHEMA.items()}


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration; one attribute per INI section."""

    server: object
    listen: object
    tls: object
    auth: object
    relay: object
    dns: object
    outbound: object
    queue: object
    dkim: object
    checks: object
    limits: object
    admin: object
    log: object
    audit: object
    path: str = None            # the file it came from, None for parse()

    @property
    def mta_sts_published(self):
        """True when we publish an MTA-STS policy (a mode, and https to serve it)."""
        return self.tls.mta_sts != "none" and self.listen.https is not None

    def listeners(self):
        """``{name: HostPort}`` of the enabled listeners, in SPEC order."""
        return {name: getattr(self.listen, name) for name in LISTENERS
                if getattr(self.listen, name) is not None}

    @property
    def is_edge(self):
        """True when this appliance is an edge (SPEC §7): mail for the local
        domains is relayed to ``[relay] mailbox_host``, no Maildirs here."""
        return self.relay.mailbox_host is not None

    @property
    def aliases_file(self):
        """Where the aliases live: ``<data_dir>/aliases``."""
        return os.path.join(self.server.data_dir, "aliases")


# ---------------------------------------------------------------------------
# Reading.

def _read_ini(text):
    """configparser -> {section: {key: raw}}, or ConfigError for syntax."""
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";",),
        comment_prefixes=("#", ";"), empty_lines_in_values=False, strict=True,
        default_section="\x00no default section")    # [DEFAULT] is just unknown
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise ConfigError(_syntax_problems(exc, text.splitlines())) from None
    return {section: dict(parser.items(section)) for section in parser.sections()}


def _syntax_problems(exc, lines):
    """One line per syntax error (configparser reports all unparsable lines
    at once, the other errors one at a time)."""
    def line(number):
        return repr(lines[number - 1].strip()) if 0 < number <= len(lines) else "?"
    if isinstance(exc, configparser.DuplicateOptionError):
        return [f"[{exc.section}] {exc.option}: set twice (line {exc.lineno})"]
    if isinstance(exc, configparser.DuplicateSectionError):
        return [f"[{exc.section}]: section appears twice (line {exc.lineno})"]
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return [f"line {exc.lineno}: {line(exc.lineno)} comes before any "
                "[section] header"]
    if isinstance(exc, configparser.ParsingError):
        return [f"line {number}: cannot parse {line(number)} (expected key = value)"
                for number, _ in exc.errors]
    return [f"cannot parse: {str(exc).splitlines()[0]}"]


def _unknown(name, known, what):
    close = difflib.get_close_matches(name, known, n=1)
    hint = f' (did you mean "{close[0]}"?)' if close else ""
    return f"unknown {what}{hint}"


def _structure_problems(raw):
    problems = []
    for section, values in raw.items():
        if section not in SCHEMA:
            problems.append(f"[{section}]: "
                            + _unknown(section, list(SCHEMA), "section"))
            continue
        for key in values:
            if key not in SCHEMA[section]:
                problems.append(f"[{section}] {key}: "
                                + _unknown(key, list(SCHEMA[section]), "key"))
    return problems


def _resolve(value, base_dir):
    if not value:
        return None
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


def _convert_section(section, values, base_dir, problems):
    converted = {}
    for key in SCHEMA[section].values():
        raw = values.get(key.name, key.default)
        try:
            value = key.convert(raw)
        except ValueError as exc:
            problems.append(f"[{section}] {key.name}: {exc}")
            value = None
        if key.is_path:
            value = _resolve(value, base_dir)
        converted[key.name] = value
    return converted


def _cross_problems(values):
    """Checks that involve more than one key (skipping keys already wrong)."""
    problems = []
    server, auth, tls = values["server"], values["auth"], values["tls"]
    if server["hostname"] == "":
        problems.append("[server] hostname: must be set (the banner and EHLO name)")
    if server["domains"] == ():
        problems.append("[server] domains: at least one local domain is needed")
    if auth["backend"] == "ldap" and not auth["ldap_base_dn"]:
        problems.append("[auth] ldap_base_dn: must be set when backend = ldap")
    if bool(auth["ldap_bind_dn"]) != bool(auth["ldap_bind_password_file"]):
        problems.append("[auth] ldap_bind_dn: ldap_bind_dn and "
                        "ldap_bind_password_file go together (set both or neither)")
    oauth = ("oauth2_issuer", "oauth2_audience", "oauth2_jwks_file")
    if any(auth[k] for k in oauth) and not all(auth[k] for k in oauth):
        missing = ", ".join(k for k in oauth if not auth[k])
        problems.append(f"[auth] {missing.split(', ')[0]}: oauth2_issuer, "
                        f"oauth2_audience and oauth2_jwks_file go together "
                        f"(missing: {missing})")
    if bool(tls["certificate"]) != bool(tls["private_key"]):
        missing = "private_key" if tls["certificate"] else "certificate"
        problems.append(f"[tls] {missing}: certificate and private_key go "
                        "together (set both, or neither for a self-signed one)")
    problems.extend(_listener_clashes(values["listen"]))
    problems.extend(_defence_problems(values["checks"], values["limits"]))
    problems.extend(_acme_problems(server, tls, values["listen"]))
    return problems


def _defence_problems(checks, limits):
    """Greylisting and ban times that contradict each other."""
    problems = []
    delay, window = checks["greylist_delay"], checks["greylist_window"]
    if delay is not None and window is not None and window <= delay:
        problems.append("[checks] greylist_window: must be longer than greylist_delay "
                        "(a retry after the delay must still fall inside the window)")
    keep = checks["greylist_keep"]
    if keep is not None and window is not None and keep < window:
        problems.append("[checks] greylist_keep: must be at least greylist_window")
    ban, ban_max = limits["ban_time"], limits["ban_time_max"]
    if ban is not None and ban_max is not None and ban_max < ban:
        problems.append("[limits] ban_time_max: must be at least ban_time")
    return problems


def _acme_problems(server, tls, listen):
    """ACME and MTA-STS need the web listener that answers for them."""
    problems = []
    if tls["acme"]:
        if tls["certificate"]:
            problems.append("[tls] acme: acme = on and a certificate file exclude each "
                            "other (leave certificate and private_key empty)")
        if server["hostname"] and is_ip(server["hostname"]):
            problems.append("[tls] acme: the hostname must be a DNS name for ACME, "
                            f"not the address {server['hostname']}")
        needed = "https" if tls["acme_challenge"] == "tls-alpn-01" else "http"
        if tls["acme_challenge"] and listen[needed] is None:
            problems.append(f"[tls] acme_challenge: {tls['acme_challenge']} is answered "
                            f"on [listen] {needed}, which is empty")
    return problems


def _listener_clashes(listen):
    problems, seen = [], {}
    for name in LISTENERS:
        address = listen[name]
        if address is None:
            continue
        if address in seen:
            problems.append(f"[listen] {name}: {_format_host_port(address)} is "
                            f"already used by {seen[address]}")
        else:
            seen[address] = name
    return problems


MAILBOX_LISTENERS = ("imap", "imaps", "pop3", "pop3s")


def _edge_problems(raw_listen, values):
    """An edge (``[relay] mailbox_host`` set) has no mailboxes: its IMAP and
    POP3 listeners are off. Left at their defaults they are simply not
    started; set in the file they are a problem (an operator who wrote
    ``imap = ...`` expects it to serve mail, and it cannot). Its own SMTP
    listener as the mailbox host would be a loop."""
    mailbox_host = values["relay"]["mailbox_host"]
    if mailbox_host is None:
        return []
    problems = []
    listen = values["listen"]
    for name in MAILBOX_LISTENERS:
        if name in raw_listen and listen[name] is not None:
            problems.append(f"[listen] {name}: this appliance is an edge ([relay] "
                            "mailbox_host is set) and has no mailboxes to serve; "
                            f"leave {name} empty (IMAP/POP3 run on the mailbox host)")
        listen[name] = None
    for name in ("mx", "submission", "submissions", "submission_alt"):
        if listen[name] == mailbox_host:
            problems.append(f"[relay] mailbox_host: {_format_host_port(mailbox_host)} is "
                            f"this appliance's own [listen] {name} (mail would loop)")
    return problems


def _format_host_port(address):
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}"


def parse(text, base_dir=None, path=None):
    """Parse INI ``text``; relative paths are resolved against ``base_dir``
    (default: the current directory, where twistd runs)."""
    base_dir = os.path.abspath(base_dir if base_dir is not None else os.getcwd())
    raw = _read_ini(text)
    problems = _structure_problems(raw)
    values = {section: _convert_section(section, raw.get(section, {}),
                                        base_dir, problems)
              for section in SCHEMA}
    if values["dkim"]["key_dir"] is None and values["server"]["data_dir"]:
        values["dkim"]["key_dir"] = os.path.join(values["server"]["data_dir"], "dkim")
    for key, name in (("host_key", "ssh_host_ed25519_key"), ("control_socket", "control.sock")):
        if values["admin"][key] is None and values["server"]["data_dir"]:
            values["admin"][key] = os.path.join(values["server"]["data_dir"], name)
    problems.extend(_cross_problems(values))
    problems.extend(_edge_problems(raw.get("listen", {}), values))
    if problems:
        raise ConfigError(problems)
    sections = {name: SECTION_CLASSES[name](**values[name]) for name in SCHEMA}
    return Config(path=path, **sections)


def load(path, base_dir=None):
    """Read and parse the file at ``path``; every failure is a ConfigError."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    return parse(text, base_dir=base_dir, path=os.path.abspath(path))
