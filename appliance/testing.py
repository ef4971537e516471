"""Test doubles for the seams, shared by every test module.

- ``FakeDirectory`` / ``FakeSpool``: the Directory and Spool interfaces, each
  able to answer at once, fail, or hold its answer in an unfired Deferred so a
  test decides when (and how) it arrives.
- ``make_config``: a real ``appliance.config`` object from a few overrides.
- ``Conversation``: a protocol on a StringTransport (bytes in, bytes out);
  ``SMTPHarness``: one SMTP session on it, driven by a Clock.
- ``capture_events``: the structured events emitted inside a ``with`` block.
- ``FaultyFS``: the durable writer's FileSystem, failing (or "killed") at a
  chosen call.
"""

import contextlib
import errno
import os
import socket
import threading

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.python import failure
from zope.interface import implementer

try:
    from twisted.internet.testing import StringTransport
except ImportError:             # Twisted < 19.7 (and the old name still works on 22.4)
    from twisted.test.proto_helpers import StringTransport

from appliance import config as config_module
from appliance.address import canonical, canonical_domain
from appliance.auth.accounts import Account, BadCredentials
from appliance.durable.commit import FileSystem
from appliance import events
from appliance.events import EventCollector

__all__ = ["Conversation", "FakeAccounts", "FakeDirectory", "FakeSpool", "SMTPHarness",
           "StringTransport", "TLSStringTransport",
           "capture_events", "make_config"]


class FakeDirectory:
    """The Directory interface over a dict of address -> destinations.

    ``users`` maps an address to its destinations; an iterable of addresses
    means each one delivers to itself. ``hold=True`` makes ``resolve`` return
    an unfired Deferred, kept in ``held`` as ``(address, deferred)``;
    ``release()`` fires them with the real answers. ``error`` is raised by
    every lookup.
    """

    def __init__(self, users=(), domains=("example.test",), *, hold=False, error=None):
        if not isinstance(users, dict):
            users = {address: [address] for address in users}
        self.users = {canonical(k): [canonical(t) for t in v] for k, v in users.items()}
        self.domains = {canonical_domain(d) for d in domains}
        self.hold = hold
        self.error = error
        self.held = []
        self.lookups = []

    def is_local_domain(self, domain):
        if self.error is not None:
            raise self.error
        return canonical_domain(domain) in self.domains

    def resolve(self, address):
        self.lookups.append(address)
        if self.error is not None:
            raise self.error
        if self.hold:
            d = defer.Deferred()
            self.held.append((address, d))
            return d
        return self.answer(address)

    def is_local_user(self, address):
        return bool(self.answer(address))

    def answer(self, address):
        """Like the real resolver: the address itself, else its ``+tag``-less form."""
        key = canonical(address)
        found = self.users.get(key)
        if found is None:
            local, at, domain = key.rpartition("@")
            if "+" in local[1:]:
                found = self.users.get(f"{local[:local.index('+', 1)]}@{domain}")
        return list(found or [])

    def release(self):
        """Fire every held lookup with its real answer, oldest first."""
        held, self.held = self.held, []
        for address, d in held:
            d.callback(self.answer(address))


class FakeAccounts:
    """The IAccounts interface over a dict of address -> password.

    ``aliases`` maps an address to the other addresses it may send as.
    ``error`` fails every call with that exception (BackendUnavailable for an
    outage); ``hold=True`` keeps every answer in ``held`` until ``release()``.
    ``calls`` records ``(method, address)`` in order.
    """

    def __init__(self, passwords=None, aliases=None, *, error=None, hold=False):
        self.passwords = {canonical(k): v for k, v in (passwords or {}).items()}
        self.aliases = {canonical(k): tuple(v) for k, v in (aliases or {}).items()}
        self.error = error
        self.hold = hold
        self.held = []
        self.calls = []

    def authenticate(self, address, password):
        self.calls.append(("authenticate", address))
        key = _canonical_or_none(address)
        if self.error is None and (not password or self.passwords.get(key) != password):
            return self._answer(failure.Failure(BadCredentials("wrong password or unknown user")))
        return self._answer(self._account(key))

    def account(self, address):
        self.calls.append(("account", address))
        key = _canonical_or_none(address)
        return self._answer(self._account(key) if key in self.passwords else None)

    def _account(self, key):
        return Account(key, (key,) + self.aliases.get(key, ()))

    def _answer(self, value):
        if self.error is not None:
            value = failure.Failure(self.error)
        d = defer.Deferred()
        if self.hold:
            self.held.append((value, d))
        elif isinstance(value, failure.Failure):
            d.errback(value)
        else:
            d.callback(value)
        return d

    def release(self):
        held, self.held = self.held, []
        for value, d in held:
            (d.errback if isinstance(value, failure.Failure) else d.callback)(value)


def _canonical_or_none(address):
    try:
        return canonical(address)
    except ValueError:
        return None


class FakeSpool:
    """The Spool interface, in memory.

    ``accepted`` lists ``(envelope, message)`` that were acknowledged.
    ``hold=True`` keeps each accept pending in ``held`` until ``release()``
    (success) or ``fail()``; ``error`` fails every accept with that exception.
    ``space`` is what ``space_available`` answers. ``body_dir``: bodies
    too big for memory go to files there (``body_file``), written through
    ``body_runner`` (default: at once).
    """

    def __init__(self, *, space=True, hold=False, error=None, body_dir=None,
                 body_runner=None):
        self.space = space
        self.hold = hold
        self.error = error
        self.accepted = []
        self.held = []
        self.space_queries = []
        self.body_dir = body_dir
        self.body_runner = body_runner
        self.body_files = []

    def body_file(self, on_drain=None):
        if self.body_dir is None:
            return None
        from appliance.queue.incoming import BodyFile
        from appliance.threads import synchronous_runner
        path = os.path.join(self.body_dir, f"incoming.{len(self.body_files)}.tmp")
        body = BodyFile(path, self.body_runner or synchronous_runner, on_drain)
        self.body_files.append(body)
        return body

    def space_available(self, size):
        self.space_queries.append(size)
        return self.space

    def accept(self, envelope, message):
        if self.error is not None:
            return defer.fail(self.error)
        d = defer.Deferred()
        if self.hold:
            self.held.append((envelope, message, d))
            return d
        self._commit(envelope, message, d)
        return d

    def _commit(self, envelope, message, d):
        self.accepted.append((envelope, message))
        d.callback(envelope.queue_id)

    def release(self):
        held, self.held = self.held, []
        for envelope, message, d in held:
            self._commit(envelope, message, d)

    def fail(self, error=None):
        """Fail every held accept (default: disk full)."""
        error = error or OSError(errno.ENOSPC, "No space left on device")
        held, self.held = self.held, []
        for _envelope, _message, d in held:
            d.errback(failure.Failure(error))


_BASE_CONFIG = {
    "server": {"hostname": "mx.example.test", "domains": "example.test, example.org"},
}


class Crash(BaseException):
    """A simulated kill -9: nothing after it runs, not even cleanup."""


class FaultyFS(FileSystem):
    """A FileSystem that fails at the ``at``-th of its ``MUTATING`` calls
    (0-based; with ``only``, of that method's calls) and at every call after:
    with OSError(``error``), or, without ``error``, with ``Crash`` (then
    ``crashed`` is set and every later call, of any mutating method, crashes)."""

    MUTATING = ("open_new", "write_all", "fsync", "close", "rename", "unlink", "fsync_dir",
                "mkdir", "link")

    def __init__(self, at=None, error=None, only=None):
        self.at, self.error, self.only = at, error, only
        self.count = 0
        self.crashed = False

    def __getattribute__(self, name):
        method = super().__getattribute__(name)
        if name not in FaultyFS.MUTATING:
            return method

        def wrapped(*args):
            self._step(name)
            return method(*args)
        return wrapped

    def _step(self, name):
        if self.crashed:
            raise Crash()
        if self.only is not None and name != self.only:
            return
        if self.at is not None and self.count == self.at:
            if self.error is None:
                self.crashed = True
                raise Crash()
            raise OSError(self.error, os.strerror(self.error))
        self.count += 1


def clock_at(seconds):
    """A ``task.Clock`` whose time is ``seconds`` (a Unix time)."""
    clock = Clock()
    clock.advance(seconds)
    return clock


def make_config(base_dir="/nonexistent/mailappliance-test", **sections):
    """A real Config: the minimal file plus ``section={key: value}`` overrides."""
    merged = {name: dict(keys) for name, keys in _BASE_CONFIG.items()}
    for name, keys in sections.items():
        merged.setdefault(name, {}).update(keys)
    text = "".join(f"[{name}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())
                   for name, keys in merged.items())
    return config_module.parse(text, base_dir=base_dir)


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):
    """A StringTransport that can "start TLS": it records the connection
    creator and what was written before, as a real transport would switch
    to TLS after flushing those bytes."""

    tls = None
    written_before_tls = b""

    def startTLS(self, contextFactory, normal=True):
        self.tls = contextFactory
        self.written_before_tls = self.value()


class Conversation:
    """A protocol under test, connected to a StringTransport (``transport``).

    ``send`` feeds it bytes (str is encoded as UTF-8); ``output`` returns the
    bytes it wrote since the last call, ``lines`` those as text lines (CRLF
    ends a line); ``closed``: it closed the connection; ``lose``: the
    connection ends (as the reactor would report it).
    """

    def __init__(self, protocol, transport):
        self.protocol = protocol
        self.transport = transport
        self._seen = 0
        protocol.makeConnection(transport)

    def send(self, data):
        self.protocol.dataReceived(data.encode("utf-8") if isinstance(data, str) else data)

    def output(self):
        """Bytes written since the last call."""
        value = self.transport.value()
        new, self._seen = value[self._seen:], len(value)
        return new

    def lines(self):
        return self.output().decode("utf-8").split("\r\n")[:-1]

    @property
    def closed(self):
        return self.transport.disconnecting or self.transport.disconnected

    def lose(self, reason=None):
        self.protocol.connectionLost(failure.Failure(reason or ConnectionDone()))


class SMTPHarness(Conversation):
    """One SMTP session of ``factory`` on a StringTransport (a Conversation).

    ``replies`` returns the reply lines written since the last call; ``codes``
    the codes of the complete replies among them. The factory is built from
    the other arguments unless given, so several harnesses can share one
    factory. ``transport_class`` is ``TLSStringTransport`` for STARTTLS tests.
    """

    def __init__(self, factory=None, *, config=None, directory=None, spool=None,
                 clock=None, peer="192.0.2.10", port=40000, listener="mx",
                 transport_class=StringTransport):
        if factory is None:
            from appliance.receive.smtp import SMTPFactory
            factory = SMTPFactory(config or make_config(),
                                  directory if directory is not None else FakeDirectory(),
                                  spool if spool is not None else FakeSpool(),
                                  clock or Clock(), listener)
        self.factory = factory
        self.clock = factory.clock
        address_class = IPv6Address if ":" in peer else IPv4Address
        address = address_class("TCP", peer, port)
        super().__init__(factory.buildProtocol(address), transport_class(peerAddress=address))

    def replies(self):
        return self.output().decode("utf-8").splitlines()

    def codes(self):
        return [int(line[:3]) for line in self.replies() if line[3:4] == " "]


def make_jwks(path, kid="k1"):
    """A new P-256 signing key, its public half written to ``path`` as a JWKS
    (the ``[auth] oauth2_jwks_file``); returns the private key."""
    import json

    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = kid
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"keys": [jwk]}, handle)
    return key


def oauth2_issuer(directory, issuer, audience):
    """(a loaded TokenVerifier, its signing key): an identity provider whose
    JWKS is written under ``directory``."""
    from appliance.auth.oauth2 import TokenVerifier
    path = os.path.join(str(directory), "jwks.json")
    key = make_jwks(path, "k1")
    verifier = TokenVerifier(issuer, audience, path)
    verifier.load()
    return verifier, key


class HandRunner:
    """A ``run_in_thread`` the test runs by hand (the test is the thread pool).

    Each call waits in ``calls`` (also ``held``) until ``step()`` runs the
    oldest, ``run_all()`` those waiting now, or ``release()`` all of them and
    whatever they queue in turn. With ``hold`` False calls run at once. A
    call's exception, even a BaseException (a simulated kill), fails its
    Deferred. ``count`` is how many calls were made.
    """

    def __init__(self, hold=True):
        self.hold = hold
        self.calls = []
        self.count = 0

    @property
    def held(self):
        return self.calls

    def __call__(self, f, *args):
        self.count += 1
        d = defer.Deferred()
        if self.hold:
            self.calls.append((f, args, d))
        else:
            self._run(f, args, d)
        return d

    @staticmethod
    def _run(f, args, d):
        try:
            result = f(*args)
        except BaseException as error:  # noqa: BLE001 - hand every failure to the Deferred
            d.errback(failure.Failure(error))
        else:
            if isinstance(result, defer.Deferred):
                result.chainDeferred(d)
            else:
                d.callback(result)

    def step(self):
        f, args, d = self.calls.pop(0)
        self._run(f, args, d)

    def run_all(self):
        calls, self.calls = self.calls, []
        for f, args, d in calls:
            self._run(f, args, d)

    def release(self):
        while self.calls:
            self.step()


class CountingRunner(HandRunner):
    """A synchronous ``run_in_thread`` that counts its calls (``count``)."""

    def __init__(self):
        super().__init__(hold=False)


def thread_recorder(function):
    """(recording, threads): ``recording`` calls ``function`` and first appends
    the thread it runs on to ``threads`` (what ran where, for a test that a
    step runs off the reactor thread)."""
    threads = []

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return function(*args, **kwargs)
    return recording, threads


@contextlib.contextmanager
def capture_events():
    """Collect our structured events emitted inside the block."""
    collector = EventCollector(size=100_000)
    events.add_observer(collector)
    try:
        yield collector
    finally:
        events.remove_observer(collector)


def free_ports(count, host="127.0.0.1"):
    """``count`` distinct TCP ports free on ``host`` right now.

    All sockets stay bound until every port is picked, so no port repeats.
    """
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def outcome(d):
    """The result (or Failure) of a Deferred that has already fired."""
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def value_of(d):
    """The result of a fired Deferred; its exception raised if it failed."""
    result = outcome(d)
    if isinstance(result, failure.Failure):
        result.raiseException()
    return result


def error_of(d):
    """The exception a fired Deferred failed with."""
    result = outcome(d)
    assert isinstance(result, failure.Failure), f"expected a failure, got {result!r}"
    return result.value
