"""The admin SSH server on Twisted Conch: public keys only, pinned algorithms.

Stock Conch as a shell server ships holes (TWISTED-TRAPS T22,
shared/ADMIN-SHELL.md §4): 3DES, CBC, hmac-md5, SHA-1 key exchange, a 10 h
login timeout, 20 attempts, no deadline before the key exchange, one-shot
commands that exit 255. Here:

- key exchange curve25519 (and mlkem768x25519 where Twisted has it), AES-CTR,
  HMAC-SHA2, no compression, an Ed25519 host key made once (0600); the
  version string does not name Twisted;
- public keys only (``appliance.admin.keys``): no password or
  keyboard-interactive method is ever offered; SHA-1 (``ssh-rsa``)
  signatures and RSA under 2048 bits are refused;
- 20 s from connect to login, 3 failed keys per connection, at most 3
  connections per IP still logging in and 10 new ones per 10 s, the
  listeners' connection gate (deny list, bans, per-IP counts and rates)
  before any banner, a ban closing the network's open connections too;
- one ``session`` channel type, at most 4 per connection; no forwarding, no
  subsystems (sftp), no agent, no X11, no environment;
- every refused login is one ``admin.login_failed`` event, and one AUTH
  failure for the defences (``auth_failures_before_ban`` of them ban the
  network, as on the mail ports).
"""

import os
import shlex

from twisted.conch import avatar, error as conch_error, interfaces as conch_interfaces
from twisted.conch.ssh import common, connection, factory, keys, session, transport, userauth
from twisted.cred import portal
from twisted.internet import defer, error as net_error, protocol
from twisted.logger import Logger
from twisted.python import components, failure
from zope.interface import implementer

from appliance import events
from appliance.admin import keys as keymod
from appliance.admin.channel import Feed, connect_feed
from appliance.net.peer import peer_in
from appliance.admin.commands import EXIT_OK, EXIT_USAGE, Identity, Sink, dispatch
from appliance.clock import cancel

_log = Logger(namespace="mailappliance.admin")

PRE_AUTH_DEADLINE = 20.0        # seconds from connect to a successful login
MAX_AUTH_FAILURES = 3           # refused keys per connection
MAX_CHANNELS = 4                # session channels per connection
MAX_PENDING_PER_IP = 3          # connections of one IP not yet logged in
RATE_WINDOW, RATE_MAX = 10.0, 10    # new connections per IP per window

events.register("admin.login", "an admin logged in over SSH",
                ("peer_ip", "user", "key_fingerprint", "role"))
events.register("admin.logout", "an admin SSH connection ended",
                ("peer_ip", "user", "key_fingerprint", "seconds"))
events.register("admin.login_failed", "an SSH connection to the admin shell ended without "
                "a login after trying (unknown or refused key, deadline)",
                ("peer_ip", "user", "key_fingerprint", "reason", "attempts"))
events.register("admin.refused", "an SSH connection to the admin shell was refused before "
                "the banner (deny list, too many connections, rate)", ("peer_ip", "reason"))

_base = transport.SSHServerTransport
KEY_EXCHANGES = [k for k in (b"mlkem768x25519-sha256", b"curve25519-sha256",
                             b"curve25519-sha256@libssh.org")
                 if k in _base.supportedKeyExchanges]
CIPHERS = [c for c in (b"aes256-ctr", b"aes192-ctr", b"aes128-ctr")
           if c in _base.supportedCiphers]
USER_SIGNATURES = [b"ssh-ed25519", b"ecdsa-sha2-nistp256", b"ecdsa-sha2-nistp384",
                   b"ecdsa-sha2-nistp521", b"rsa-sha2-512", b"rsa-sha2-256"]
MACS = [m for m in (b"hmac-sha2-512", b"hmac-sha2-256") if m in _base.supportedMACs]


# ---------------------------------------------------------------------------
# Host key

def _host_key(data):
    try:
        return keys.Key.fromString(data)
    except keys.BadKeyError as exc:     # not a ValueError
        raise ValueError(f"not an SSH private key ({exc})") from None


def ensure_host_key(path):
    """The Ed25519 host key at ``path`` (a Conch Key), made once if missing:
    OpenSSH format, mode 0600, written with O_EXCL and fsynced. A file that
    holds no key is ValueError (it is never replaced: the fingerprint the
    admins trust would change)."""
    try:
        with open(path, "rb") as handle:
            return _host_key(handle.read())
    except FileNotFoundError:
        pass
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    private = ed25519.Ed25519PrivateKey.generate()
    data = private.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.OpenSSH,
                                 serialization.NoEncryption())
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:         # made meanwhile by someone else: use theirs
        with open(path, "rb") as handle:
            return _host_key(handle.read())
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return keys.Key.fromString(data)


# ---------------------------------------------------------------------------
# Transport, user auth, connection

class AdminTransport(transport.SSHServerTransport):
    supportedKeyExchanges = KEY_EXCHANGES
    supportedCiphers = CIPHERS
    supportedMACs = MACS
    supportedCompressions = [b"none"]
    ourVersionString = b"SSH-2.0-mailappliance"

    peer_ip = ""
    logged_in = None            # the AdminAvatarId once a key was accepted
    _deadline = None

    def connectionMade(self):
        self.peer_ip = self.transport.getPeer().host
        self.refusals = []          # (reason, fingerprint, user) of refused keys
        self.started = self.factory.clock.seconds()
        self._deadline = self.factory.clock.callLater(PRE_AUTH_DEADLINE, self._too_slow)
        super().connectionMade()

    def sendExtInfo(self, extensions):
        # Conch announces its host key types as server-sig-algs; clients read
        # it as the user-key signatures we take (RFC 8308 3.1): without
        # rsa-sha2-* there, OpenSSH finds "no mutual signature algorithm"
        # for an RSA key (and would fall back to SHA-1 elsewhere).
        extensions = [(name, b",".join(USER_SIGNATURES) if name == b"server-sig-algs"
                       else value) for name, value in extensions]
        return super().sendExtInfo(extensions)

    def defence_close(self):
        """A ban of this client's network: end the connection at once."""
        if self.transport is not None:
            self.transport.abortConnection()

    def receiveError(self, reasonCode, description):
        # A client's DISCONNECT (every `exit`): Conch logs it as an error.
        self._log.debug("client disconnected: {code} {why!r}", code=reasonCode,
                        why=description)

    def _too_slow(self):
        self._deadline = None
        if self.logged_in is None:
            self.refusals.append(("pre-auth deadline", "", ""))
            self.transport.abortConnection()

    def authenticated(self, avatar_id):
        self.logged_in = avatar_id
        self._deadline = cancel(self._deadline)
        self.factory.logged_in(self)
        events.emit("admin.login", peer_ip=self.peer_ip, user=avatar_id.user,
                    key_fingerprint=avatar_id.key.fingerprint, role=avatar_id.key.role)

    def connectionLost(self, reason):
        self._deadline = cancel(self._deadline)
        try:
            super().connectionLost(reason)
        finally:
            self.factory.closed(self)
            if self.logged_in is not None:
                events.emit("admin.logout", peer_ip=self.peer_ip, user=self.logged_in.user,
                            key_fingerprint=self.logged_in.key.fingerprint,
                            seconds=round(self.factory.clock.seconds() - self.started, 1))
            elif self.refusals:
                why, fp, user = next((r for r in reversed(self.refusals) if r[1]),
                                     self.refusals[-1])
                offered = next((f for _, f, _ in reversed(self.refusals) if f), fp)
                named = next((u for _, _, u in reversed(self.refusals) if u), user)
                events.emit("admin.login_failed", peer_ip=self.peer_ip, user=named,
                            key_fingerprint=offered, reason=why,
                            attempts=sum(1 for r in self.refusals if r[1]))
                self.factory.login_failed(self, named)


class AdminUserAuth(userauth.SSHUserAuthServer):
    """Public keys from the admin key files, checked for this peer."""

    attemptsBeforeDisconnect = MAX_AUTH_FAILURES - 1    # Conch disconnects on the one after
    loginTimeout = PRE_AUTH_DEADLINE

    def serviceStarted(self):
        super().serviceStarted()
        admin = self.transport.factory
        self.portal = portal.Portal(admin.realm, [keymod.KeyChecker(
            admin.key_files, self.transport.peer_ip, admin.read_keys, admin.clock)])

    def _ebBadAuth(self, reason):
        user = self.user.decode("utf-8", "replace") if isinstance(self.user, bytes) \
            else str(self.user or "")
        if reason.check(keymod.Refused):
            self.transport.refusals.append((reason.value.reason, reason.value.fingerprint,
                                            user))
        elif not reason.check(conch_error.IgnoreAuthentication):
            why = "no key offered" if self.method == b"none" else \
                f"method {self.method.decode('ascii', 'replace')} refused"
            self.transport.refusals.append((why, "", user))
        return super()._ebBadAuth(reason)

    def _cbFinishedAuth(self, result):
        interface, avatar_obj, logout = result
        self.transport.authenticated(avatar_obj.avatar_id)
        return super()._cbFinishedAuth(result)


class AdminConnection(connection.SSHConnection):
    """Only ``session`` channels, at most MAX_CHANNELS; anything else (port
    forwarding, agent, X11) is refused with one packet, no traceback."""

    def ssh_CHANNEL_OPEN(self, packet):
        channel_type, rest = common.getNS(packet)
        if channel_type != b"session" or len(self.channels) >= MAX_CHANNELS:
            sender = int.from_bytes(rest[:4], "big")
            why = b"only session channels" if channel_type != b"session" \
                else b"too many sessions"
            self.transport.sendPacket(
                connection.MSG_CHANNEL_OPEN_FAILURE,
                sender.to_bytes(4, "big")
                + connection.OPEN_ADMINISTRATIVELY_PROHIBITED.to_bytes(4, "big")
                + common.NS(why) + common.NS(b""))
            return
        return super().ssh_CHANNEL_OPEN(packet)

    def ssh_GLOBAL_REQUEST(self, packet):
        # tcpip-forward and friends: always "no" (ConchUser answers 0 for
        # unknown requests; this also keeps the avatar out of it).
        _name, rest = common.getNS(packet)
        if rest[:1] == b"\x01":
            self.transport.sendPacket(connection.MSG_REQUEST_FAILURE, b"")


# ---------------------------------------------------------------------------
# Realm, avatar, session channel

@implementer(portal.IRealm)
class AdminRealm:
    def __init__(self, make_context, clock, idle_timeout):
        self.make_context = make_context
        self.clock = clock
        self.idle_timeout = idle_timeout

    def requestAvatar(self, avatar_id, mind, *interfaces):
        if conch_interfaces.IConchUser not in interfaces:
            raise NotImplementedError("only SSH users")
        user = AdminAvatar(avatar_id, self)
        return conch_interfaces.IConchUser, user, user.logout


class AdminSSHSession(session.SSHSession):
    """A session channel without subsystems, environment or (for ``restrict``
    / ``no-pty`` keys) a terminal."""

    def request_pty_req(self, data):
        if self.avatar.avatar_id.key.no_pty:
            return 0
        return super().request_pty_req(data)

    def request_subsystem(self, data):
        return 0

    def request_env(self, data):
        return 0


class AdminAvatar(avatar.ConchUser):
    def __init__(self, avatar_id, realm):
        super().__init__()
        self.avatar_id = avatar_id
        self.realm = realm
        self.channelLookup = {b"session": AdminSSHSession}
        self.subsystemLookup = {}

    def identity(self, mode, peer_ip):
        key = self.avatar_id.key
        return Identity(user=self.avatar_id.user, fingerprint=key.fingerprint,
                        role=key.role, peer_ip=peer_ip, mode=mode, comment=key.comment)

    def gotGlobalRequest(self, requestType, data):
        return 0

    def logout(self):
        pass


@implementer(conch_interfaces.ISession)
class AdminSession:
    """The ISession of an AdminAvatar: pty, shell and exec on one channel."""

    def __init__(self, user):
        self.user = user
        self.pty = None             # (term, cols, rows) after pty-req
        self.shell = None
        self.running = None         # the Context of a one-shot command
        self._stdin = b""
        self._stdin_eof = False
        self._secret_waiting = None

    def _peer(self):
        try:
            return self.user.conn.transport.peer_ip
        except AttributeError:
            return ""

    # -- pty and shell

    def getPty(self, term, windowSize, modes):
        rows, cols = windowSize[0], windowSize[1]
        self.pty = (term, cols or 80, rows or 24)

    def windowChanged(self, newWindowSize):
        rows, cols = newWindowSize[0], newWindowSize[1]
        if self.pty is not None:
            self.pty = (self.pty[0], cols or 80, rows or 24)
        if self.shell is not None and hasattr(self.shell, "resized"):
            self.shell.resized(cols or 80, rows or 24)

    def openShell(self, pp):
        from appliance.admin import shell as shellmod
        realm = self.user.realm
        key = self.user.avatar_id.key
        if key.command is not None:
            # A forced command: the shell runs it once, as a one-shot would.
            self.execCommand(pp, key.command.encode("utf-8"))
            return
        if self.pty is not None:
            self.shell = shellmod.start_pty_shell(pp, self, realm, self.pty)
        else:
            self.shell = shellmod.start_line_shell(pp, self, realm)

    def identity(self, mode):
        return self.user.identity(mode, self._peer())

    # -- exec

    def execCommand(self, pp, command):
        connect_feed(pp, Feed(self._exec_input))
        key = self.user.avatar_id.key
        text = (key.command if key.command is not None
                else command.decode("utf-8", "replace"))
        realm = self.user.realm
        sink = Sink(lambda line: pp.outReceived((line + "\n").encode("utf-8")),
                    lambda line: pp.errReceived((line + "\n").encode("utf-8")))
        ctx = realm.make_context(sink, self.identity("exec"), self._exec_secret, None, False)
        self.running = ctx
        try:
            argv = shlex.split(text)
        except ValueError as exc:
            pp.errReceived(f"error: {exc}\n".encode("utf-8"))
            self._end(pp, EXIT_USAGE)
            return
        if not argv:
            pp.errReceived(b"error: no command (try: help)\n")
            self._end(pp, EXIT_USAGE)
            return
        d = dispatch(argv, ctx)
        d.addCallback(lambda rc: self._end(pp, rc))

    def _exec_input(self, data):
        self._stdin += data
        self._offer_secret()

    def _exec_secret(self, prompt):
        self._secret_waiting = defer.Deferred()
        d = self._secret_waiting
        self._offer_secret()
        return d

    def _offer_secret(self):
        if self._secret_waiting is None:
            return
        if b"\n" in self._stdin or self._stdin_eof:
            line, _, self._stdin = self._stdin.partition(b"\n")
            d, self._secret_waiting = self._secret_waiting, None
            d.callback(line.rstrip(b"\r").decode("utf-8", "replace"))

    def _end(self, pp, rc):
        self.running = None
        if rc == EXIT_OK:
            reason = net_error.ProcessDone(None)
        else:
            reason = net_error.ProcessTerminated(exitCode=rc)
        pp.processEnded(failure.Failure(reason))

    # -- channel end

    def eofReceived(self):
        self._stdin_eof = True
        self._offer_secret()
        if self.shell is not None and hasattr(self.shell, "eof"):
            self.shell.eof()

    def closed(self):
        if self.running is not None and not self.running.cancelled.called:
            self.running.cancelled.callback(None)
        if self._secret_waiting is not None:
            d, self._secret_waiting = self._secret_waiting, None
            d.errback(defer.CancelledError())
        if self.shell is not None and hasattr(self.shell, "closed"):
            self.shell.closed()


components.registerAdapter(AdminSession, AdminAvatar, conch_interfaces.ISession)


# ---------------------------------------------------------------------------
# The factory

class AdminFactory(factory.SSHFactory):
    """``make_context(sink, identity, read_secret, confirm, interactive)``
    builds a command Context; ``gate`` is the listeners' Gate (or
    None); ``read_keys(files) -> Deferred[list]`` reads the key files."""

    protocol = AdminTransport
    listener = "admin_ssh"      # the gate's name for it (defence.refused events)

    def __init__(self, host_key, key_files, make_context, clock, read_keys,
                 gate=None, idle_timeout=900.0):
        self.publicKeys = {b"ssh-ed25519": host_key.public()}
        self.privateKeys = {b"ssh-ed25519": host_key}
        self.key_files = key_files
        self.clock = clock
        self.read_keys = read_keys
        self.gate = gate
        self.realm = AdminRealm(make_context, clock, idle_timeout)
        # SSHUserAuthServer lists the methods from the factory's portal: one
        # public-key checker, so "publickey" is all it ever offers. Each
        # connection gets its own checker (it knows the peer) in serviceStarted.
        self.portal = portal.Portal(self.realm, [keymod.KeyChecker(
            key_files, None, read_keys, clock)])
        self.services = {b"ssh-userauth": AdminUserAuth, b"ssh-connection": AdminConnection}
        self.transports = set()     # the live connections
        self._pending = {}          # ip -> connections not yet logged in
        self._recent = {}           # ip -> connection times within RATE_WINDOW
        self._gated = set()

    def getPrimes(self):
        return None                 # no DH group exchange (it is not offered anyway)

    def buildProtocol(self, addr):
        ip = getattr(addr, "host", "")
        # Not SSHFactory.buildProtocol: it logs "no moduli file" on every
        # connection and derives lists this class pins anyway. Built first:
        # the gate keeps its ticket (released in ``closed``).
        t = protocol.Factory.buildProtocol(self, addr)
        why = self._refusal(ip, t)
        if why is not None:
            events.emit("admin.refused", peer_ip=ip, reason=why)
            return None
        self.transports.add(t)
        t.supportedPublicKeys = [b"ssh-ed25519"]
        t.supportedKeyExchanges = KEY_EXCHANGES
        return t

    def _refusal(self, ip, session=None):
        if self.gate is not None and peer_in(self.gate.limits.allow, ip) and \
                not peer_in(self.gate.limits.deny, ip):
            return self._admitted(ip, None)       # [limits] allow: never limited
        now = self.clock.seconds()
        recent = [t for t in self._recent.get(ip, ()) if now - t < RATE_WINDOW]
        if len(recent) >= RATE_MAX:
            self._recent[ip] = recent
            return "rate"
        if self._pending.get(ip, 0) >= MAX_PENDING_PER_IP:
            return "pending"
        if self.gate is not None:
            verdict = self.gate.admit(ip, session)
            if verdict is not None:
                return str(verdict)
        recent.append(now)
        self._recent[ip] = recent
        return self._admitted(ip, None)

    def _admitted(self, ip, verdict):
        self._pending[ip] = self._pending.get(ip, 0) + 1
        return verdict

    def logged_in(self, t):
        self._unpend(t.peer_ip)

    @property
    def connections(self):
        return len(self.transports)

    def closed(self, t):
        self.transports.discard(t)
        if t.logged_in is None:
            self._unpend(t.peer_ip)
        if self.gate is not None:
            self.gate.release(t.peer_ip, t)
        stale = [ip for ip, times in self._recent.items()
                 if not times or self.clock.seconds() - times[-1] >= RATE_WINDOW]
        for ip in stale:
            del self._recent[ip]

    def login_failed(self, t, user):
        """A connection ended without a login: one failure toward a ban
        (``Defences.auth_failed``; nothing without the defences)."""
        defences = getattr(self.gate, "defences", None)
        if defences is not None:
            defences.auth_failed(t.peer_ip, user, None, getattr(t, "defence_ticket", None))

    def _unpend(self, ip):
        left = self._pending.get(ip, 0) - 1
        if left > 0:
            self._pending[ip] = left
        else:
            self._pending.pop(ip, None)
