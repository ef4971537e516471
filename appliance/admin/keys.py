"""Admin keys: OpenSSH ``authorized_keys`` files with their options, and the
checker that lets a key in (or not).

Twisted's own reader (``twisted.conch.checkers.readAuthorizedKeyFile``)
silently drops every line that carries options: a ``from="..."`` key would
neither work nor be restricted. This one reads ``[options] keytype base64
[comment]`` like sshd and honours:

- ``from="pattern-list"``: IPs, CIDRs, ``*``/``?`` wildcards, ``!`` negation;
- ``expiry-time="YYYYMMDD[HHMM[SS]][Z]"``: the key stops working then;
- ``restrict`` and ``no-pty``: commands only, no interactive terminal;
- ``command="..."``: a forced command, run instead of the one asked for.

Forwarding, agent, X11, environment and the like are always off here, so
those options are accepted and change nothing. A line with an option this
reader does not know (or ``cert-authority``) is skipped with a warning: a
restriction we cannot enforce must not become no restriction.

Roles: a key in ``[admin] authorized_keys`` is ``admin``; one in
``[admin] readonly_keys`` is ``read`` (if it is in both, ``read`` wins).
The files are read again at every login attempt, so edits need no restart.
"""

import calendar
import dataclasses
import fnmatch
import ipaddress
import re
import time

from twisted.conch import error
from twisted.conch.ssh import common, keys
from twisted.cred import checkers
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from appliance.admin.commands import ADMIN, READ

_log = Logger(namespace="mailappliance.admin")

KEY_TYPES = {
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
}
MOOT_OPTIONS = {
    "no-port-forwarding", "no-agent-forwarding", "no-x11-forwarding", "no-user-rc",
    "port-forwarding", "agent-forwarding", "x11-forwarding", "user-rc", "pty",
    "permitopen", "permitlisten", "environment", "tunnel", "principals",
    "no-touch-required", "touch-required", "verify-required",
}
MIN_RSA_BITS = 2048
SHA1_SIGNATURES = (b"ssh-rsa", b"ssh-dss")


class KeyFileError(ValueError):
    """A line that cannot be used (the text says why)."""


@dataclasses.dataclass(frozen=True)
class AuthorizedKey:
    """One usable line: the key's blob and fingerprint, its role and options."""

    blob: bytes
    fingerprint: str            # "SHA256:..." as ssh-keygen -l shows it
    role: str
    comment: str = ""
    source: str = ""            # path:line
    from_patterns: tuple = ()
    expires: float = None       # Unix time
    no_pty: bool = False
    command: str = None

    def allows_peer(self, ip):
        return not self.from_patterns or match_from(self.from_patterns, ip)

    def expired(self, now):
        return self.expires is not None and now >= self.expires


def fingerprint(blob):
    """``SHA256:<base64 without padding>``, as OpenSSH prints it."""
    key = keys.Key.fromString(blob)
    return "SHA256:" + key.fingerprint(keys.FingerprintFormats.SHA256_BASE64).rstrip("=")


def split_options(text):
    """``(options, rest)``: the leading option list of a line, split on
    commas outside double quotes (``\\"`` escapes a quote), and the rest."""
    options, current, quoted, i = [], [], False, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and quoted and i + 1 < len(text) and text[i + 1] == '"':
            current.append('"')
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == ",":
            options.append("".join(current))
            current = []
        elif not quoted and ch in " \t":
            break
        else:
            current.append(ch)
        i += 1
    if quoted:
        raise KeyFileError("unterminated quote in the options")
    options.append("".join(current))
    return options, text[i:].strip()


def _option(raw):
    name, eq, value = raw.partition("=")
    return name.strip().lower(), (value if eq else None)


_EXPIRY = re.compile(r"(\d{8})(\d{4})?(\d{2})?(Z)?", re.I)


def parse_expiry(value):
    match = _EXPIRY.fullmatch(value.strip())
    if not match:
        raise KeyFileError(f"expiry-time {value!r} is not YYYYMMDD[HHMM[SS]]")
    digits = match.group(1) + (match.group(2) or "0000") + (match.group(3) or "00")
    try:
        parts = time.strptime(digits, "%Y%m%d%H%M%S")
    except ValueError:
        raise KeyFileError(f"expiry-time {value!r} is not a date") from None
    return float(calendar.timegm(parts) if match.group(4) else time.mktime(parts))


def match_from(patterns, ip):
    """sshd's from= rule: a matching ``!pattern`` refuses, else one match admits."""
    allowed = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _matches(pattern[1:] if negated else pattern, ip):
            if negated:
                return False
            allowed = True
    return allowed


def _matches(pattern, ip):
    if "/" in pattern:
        try:
            return ipaddress.ip_address(ip) in ipaddress.ip_network(pattern, strict=False)
        except ValueError:
            return False
    return fnmatch.fnmatchcase(ip.lower(), pattern.lower())


def parse_line(line, role, source=""):
    """An AuthorizedKey for one line, None for a blank or comment line,
    KeyFileError for one that cannot be used."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    first = text.split(None, 1)[0]
    options = []
    if first not in KEY_TYPES:
        options, text = split_options(text)
    fields = text.split(None, 2)
    if len(fields) < 2 or fields[0] not in KEY_TYPES:
        raise KeyFileError("no key type and key")
    try:
        key = keys.Key.fromString(f"{fields[0]} {fields[1]}".encode("ascii"))
    except (keys.BadKeyError, ValueError, UnicodeEncodeError) as exc:
        raise KeyFileError(f"bad key ({exc})") from None
    if key.type() == "RSA" and key.size() < MIN_RSA_BITS:
        raise KeyFileError(f"RSA key of {key.size()} bits (at least {MIN_RSA_BITS})")
    if key.type() == "DSA":
        raise KeyFileError("DSA keys are not accepted")
    found = {"from_patterns": (), "expires": None, "no_pty": False, "command": None}
    for raw in options:
        name, value = _option(raw)
        if name == "from" and value is not None:
            found["from_patterns"] = tuple(p.strip() for p in value.split(",") if p.strip())
        elif name == "expiry-time" and value is not None:
            found["expires"] = parse_expiry(value)
        elif name in ("restrict", "no-pty"):
            found["no_pty"] = True
        elif name == "command" and value is not None:
            found["command"] = value
        elif name in MOOT_OPTIONS:
            continue
        else:
            raise KeyFileError(f"option {name!r} is not supported")
    blob = key.blob()
    return AuthorizedKey(blob, fingerprint(blob), role, fields[2] if len(fields) > 2 else "",
                         source, **found)


def read_keys(files):
    """Every usable key of ``files`` (``[(path, role)]``); bad lines are
    logged and skipped, a missing file has no keys."""
    found = []
    for path, role in files:
        if not path:
            continue
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            continue
        except OSError as exc:
            _log.warn("cannot read {path}: {why}", path=path, why=exc.strerror or str(exc))
            continue
        for number, line in enumerate(lines, 1):
            try:
                parsed = parse_line(line, role, f"{path}:{number}")
            except KeyFileError as exc:
                _log.warn("{path}:{line}: {why}; line skipped", path=path, line=number,
                          why=str(exc))
                continue
            if parsed is not None:
                found.append(parsed)
    return found


def key_files(cfg):
    return [(cfg.admin.authorized_keys, ADMIN), (cfg.admin.readonly_keys, READ)]


def find(found, blob):
    """The entry for ``blob``: the read-only one if the key is listed twice."""
    matches = [k for k in found if k.blob == blob]
    if not matches:
        return None
    reads = [k for k in matches if k.role == READ]
    return reads[0] if reads else matches[0]


@dataclasses.dataclass(frozen=True)
class AdminAvatarId:
    """What a successful login yields: the user name sent and the key."""

    user: str
    key: AuthorizedKey


class Refused(UnauthorizedLogin):
    """A key refused; ``reason`` is a short word for the event, ``fingerprint``
    the key offered (empty if it could not be parsed)."""

    def __init__(self, reason, fingerprint=""):
        super().__init__(reason)
        self.reason = reason
        self.fingerprint = fingerprint


@implementer(checkers.ICredentialsChecker)
class KeyChecker:
    """Public keys from the admin key files, for one connection from ``peer_ip``.

    ``read(files) -> Deferred[list of AuthorizedKey]`` reads the files (a
    thread in the server); ``clock`` gives ``seconds()`` for expiry-time.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, files, peer_ip, read, clock):
        self.files = files
        self.peer_ip = peer_ip
        self.read = read
        self.clock = clock

    def requestAvatarId(self, credentials):
        algorithm = credentials.algName
        try:
            offered = fingerprint(credentials.blob)
        except (keys.BadKeyError, ValueError):
            return defer.fail(Refused("bad key"))
        if algorithm in SHA1_SIGNATURES:
            return defer.fail(Refused("sha1 signature", offered))
        d = self.read(self.files)
        d.addCallback(self._check, credentials, offered)
        return d

    def _check(self, found, credentials, offered):
        entry = find(found, credentials.blob)
        if entry is None:
            raise Refused("unknown key", offered)
        if entry.expired(self.clock.seconds()):
            raise Refused("key expired", offered)
        if not entry.allows_peer(self.peer_ip):
            raise Refused("from= refused", offered)
        if credentials.signature is None:
            raise error.ValidPublicKey()
        signed_with = common.getNS(credentials.signature)[0]
        if signed_with in SHA1_SIGNATURES or signed_with != credentials.algName:
            raise Refused("sha1 signature", offered)
        key = keys.Key.fromString(credentials.blob)
        if not key.verify(credentials.signature, credentials.sigData):
            raise Refused("bad signature", offered)
        user = credentials.username.decode("utf-8", "replace") \
            if isinstance(credentials.username, bytes) else str(credentials.username)
        return AdminAvatarId(user, entry)
