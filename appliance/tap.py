"""`twistd mailappliance`: read the config, build the service tree, start it.

This is the one place that picks the real reactor, clock and thread pools;
everything below takes them as constructor arguments.

Service tree (a MultiService stops its children in reverse order, so the
writer pool is added first and outlives the services that use it)::

    ApplianceService
      event log          JSON events to [log] events
      writer pool        the group-commit thread (spool and Maildir fsyncs)
      ldap-directory-pool  LDAP threads for recipient lookups (backend = ldap only)
      queue runner       local and remote delivery, retries, DSNs; recovery at start
      ldap-pool          LDAP threads (backend = ldap only)
      tls                certificate and JWKS loaded; SIGHUP reloads the certificate
      dkim-keys          DKIM keys made if missing, loaded (mail from our users is signed)
      inbound-checks     threads for SPF / DKIM / DMARC of MX mail (DNS, RSA block)
      defences           bans, limits, greylist state loaded (before any listener binds)
      listener mx        ESMTP on [listen] mx, STARTTLS
      listener submission, submission_alt   STARTTLS + AUTH
      listener submissions                  implicit TLS + AUTH
      listener pop3 (STLS), pop3s (implicit TLS)   POP3 over the Maildirs
      listener imap (STARTTLS), imaps (implicit TLS)   IMAP4rev1 over the Maildirs
"""

import gc
import os
import signal
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, threads
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import threadpool, usage

import appliance
from appliance import events
from appliance.access.imap.server import IMAPFactory
from appliance.access.folders import MaildirStore
from appliance.access.pop3 import POP3Factory
from appliance.auth.ldap import LdapConfigError, accounts_from_config
from appliance.auth.oauth2 import JWKSError, TokenVerifier
from appliance.auth.sasl import Mechanisms
from appliance.auth.users import UsersFile
from appliance.config import ConfigError, load
from appliance.defence.greylist import spf_checker
from appliance.defence.service import Defences, DefenceService
from appliance.defence.stages import DefencePolicy, imap_refusal, pop3_refusal, smtp_refusal
from appliance.deliver.maildir import MaildirDeliverer
from appliance.deliver.mx import ROUTE_CACHE_SECONDS, MXResolver, build_resolver
from appliance.deliver.remote import RemoteDelivery
from appliance.directory import AliasesFile, directory_from_config
from appliance.policy.checks import WORKER_THREADS, InboundChecks
from appliance.policy.dkim_sign import Signer
from appliance.policy.keys import KeyService, KeyStore
from appliance.durable.commit import GroupCommitWriter
from appliance.threads import ThreadPoolService, pool_runner
from appliance.queue.bounce import Bouncer
from appliance.queue.manager import QueueSettings
from appliance.queue.runner import QueueRunner
from appliance.queue.store import Spool
from appliance.durable.writer_process import ChildProcessFileSystem
from appliance.receive.smtp import SMTPFactory
from appliance.receive.submission import SubmissionFactory
from appliance.net.gate import Gate, GateFront
from appliance.net.tls import ServerTLS, TLSError
from appliance.policy.relay import MXPolicy, SubmissionPolicy

FSYNC_THREADS = 4       # fsyncs of one group-commit batch in flight together (in the writer child)
SWITCH_INTERVAL = 0.0005    # seconds; see makeService
EVENT_FLUSH_INTERVAL = 0.02     # seconds; see EventLogService
GC_THRESHOLD = 20000            # allocations between young-generation collections; see makeService

DEFAULT_CONFIG = "/etc/mailappliance/mailappliance.ini"

_log = Logger()


class Options(usage.Options):
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "the configuration file (INI, see SPEC section 3)"],
    ]


def fail(message, code=1):
    """End start-up with one line on stderr and a non-zero exit, no traceback.

    Written to the real stderr: by now twistd has pointed sys.stderr at its log.
    """
    sys.__stderr__.write(f"mailappliance: {message}\n")
    sys.__stderr__.flush()
    raise SystemExit(code)


class EventLogService(service.Service):
    """Writes our structured events to ``[log] events`` while running."""

    name = "event-log"

    def __init__(self, path, reactor):
        self.path = path
        self.reactor = reactor
        self.observer = None
        self._flushed_at = 0.0

    def privilegedStartService(self):
        # Opened before twistd drops privileges: /var/log may need root.
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
            self.observer = events.JsonEventFile(self.path, self._call_soon)
        except OSError as exc:
            fail(f"[log] events: cannot open {self.path}: {exc.strerror or exc}")
        events.add_observer(self.observer)
        super().privilegedStartService()

    def _call_soon(self, f):
        # At most one write per EVENT_FLUSH_INTERVAL under load (each is a
        # system call on the reactor thread); at once after a quiet spell.
        delay = max(0.0, self._flushed_at + EVENT_FLUSH_INTERVAL - self.reactor.seconds())
        self.reactor.callLater(delay, self._flush, f)

    def _flush(self, f):
        self._flushed_at = self.reactor.seconds()
        f()

    def stopService(self):
        super().stopService()
        if self.observer is not None:
            events.remove_observer(self.observer)
            self.observer.close()
            self.observer = None


class Listener(StreamServerEndpointService):
    """A listening port that turns a bind failure into one clear line."""

    _raiseSynchronously = True

    def __init__(self, name, address, endpoint, factory):
        super().__init__(endpoint, factory)
        self.setName(f"listener-{name}")
        self.listener_name = name
        self.address = address

    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except Exception as exc:  # CannotListenError and friends
            events.emit("listener.failed", name=self.listener_name,
                        address=self.address, error=_reason(exc))
            fail(f"cannot listen for {self.listener_name} on {self.address}: {_reason(exc)}")
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        events.emit("listener.started", name=self.listener_name, address=self.address)
        _log.info("listening for {name} on {address}", name=self.listener_name,
                  address=self.address)
        return port


def _reason(exc):
    """The human part of a socket or OS error."""
    inner = getattr(exc, "socketError", None) or exc
    return getattr(inner, "strerror", None) or str(inner) or type(exc).__name__


def server_endpoint(reactor, address):
    """A TCP endpoint for a HostPort; IPv6 hosts get a TCP6 endpoint."""
    if ":" in address.host:
        return endpoints.TCP6ServerEndpoint(reactor, address.port, interface=address.host)
    return endpoints.TCP4ServerEndpoint(reactor, address.port, interface=address.host)


def format_address(address):
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}"


class ApplianceService(service.MultiService):
    """The whole server; ``parts`` exposes the objects for the admin shell and tests."""

    def __init__(self, config, parts):
        super().__init__()
        self.config = config
        self.parts = parts

    def privilegedStartService(self):
        _check_tls_files(self.config)
        super().privilegedStartService()

    def startService(self):
        super().startService()
        cfg = self.config
        events.emit("config.loaded", path=cfg.path, domains=list(cfg.server.domains),
                    hostname=cfg.server.hostname)
        events.emit("server.started", version=appliance.__version__)

    def stopService(self):
        d = super().stopService()
        events.emit("server.stopped")
        return d


def _check_tls_files(cfg):
    """A configured certificate or key that cannot be read stops start-up now."""
    for key in ("certificate", "private_key"):
        path = getattr(cfg.tls, key)
        if path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                fail(f"[tls] {key}: cannot read {path}: {exc.strerror or exc}")


class TLSService(service.Service):
    """Loads the certificate, key and JWKS before privileges are dropped and
    before any listener binds (an unusable one stops start-up with one
    line); while running, SIGHUP reloads the certificate (renewals)."""

    name = "tls"

    def __init__(self, reactor, parts):
        self._reactor = reactor
        self._parts = parts
        self._previous = None

    def privilegedStartService(self):
        try:
            self._parts["tls"].load()
        except TLSError as exc:
            fail(f"[tls] certificate: {exc}")
        if self._parts.get("oauth2") is not None:
            try:
                self._parts["oauth2"].load()
            except JWKSError as exc:
                fail(f"[auth] oauth2_jwks_file: {exc}")
        super().privilegedStartService()

    def startService(self):
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self):
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()

    def _hangup(self, signum, frame):
        # The handler runs between bytecodes: hand the work to the reactor.
        self._reactor.callFromThread(self._reload_logged)

    def _reload_logged(self):
        _log.info("SIGHUP: reloading the TLS certificate")
        try:
            self._parts["tls"].reload()
        except Exception:
            _log.failure("reload on SIGHUP failed")


def _front(parts, name, factory, implicit, words):
    """What a listener binds: the gate in front of ``factory`` (TLS around it
    for ``implicit``), so a refused client costs no session and, on an
    implicit-TLS port, no TLS state or handshake (it is closed at once)."""
    if implicit:
        factory = TLSMemoryBIOFactory(parts["tls"], False, factory)
    return GateFront(parts["gate"], factory, name, None if implicit else words)


def _submission_listeners(cfg, reactor, top, parts, directory, spool, users):
    """submission and submission_alt (STARTTLS), submissions (implicit TLS)."""
    try:
        accounts, ldap_service = accounts_from_config(cfg, users, directory, reactor)
    except LdapConfigError as exc:
        fail(str(exc))
    if ldap_service is not None:
        ldap_service.setServiceParent(top)     # before the listeners: stops after them
    parts["accounts"] = accounts
    parts["oauth2"] = TokenVerifier.from_config(cfg)
    mechanisms = Mechanisms(accounts, parts["oauth2"])
    for name in ("submission", "submissions", "submission_alt"):
        address = getattr(cfg.listen, name)
        if address is None:
            continue
        implicit = name == "submissions"
        policy = DefencePolicy(SubmissionPolicy(cfg, directory), parts["defences"])
        factory = SubmissionFactory(cfg, directory, spool, reactor, name, mechanisms,
                                    parts["tls"], implicit_tls=implicit, policy=policy,
                                    gate=parts["gate"])
        factory.signer = parts["signer"]
        parts[name] = factory
        Listener(name, format_address(address), server_endpoint(reactor, address),
                 _front(parts, name, factory, implicit, smtp_refusal)).setServiceParent(top)


def _mail_store(cfg, parts):
    """The one MaildirStore that IMAP and POP3 share (their folder objects,
    UID lists and the POP3 maildrop lock live in it)."""
    if "mailstore" not in parts:
        parts["mailstore"] = MaildirStore(os.path.join(cfg.server.data_dir, "mail"),
                                          threads.deferToThread,
                                          hostname=cfg.server.hostname)
    return parts["mailstore"]


def _pop3_listeners(cfg, reactor, top, parts):
    """pop3 (STLS) and pop3s (implicit TLS), after the accounts are built."""
    mechanisms = Mechanisms(parts["accounts"], parts["oauth2"])
    for name in ("pop3", "pop3s"):
        address = getattr(cfg.listen, name)
        if address is None:
            continue
        implicit = name == "pop3s"
        factory = POP3Factory(cfg, _mail_store(cfg, parts), mechanisms, reactor, name,
                              tls=parts["tls"], implicit_tls=implicit, gate=parts["gate"])
        parts[name] = factory
        Listener(name, format_address(address), server_endpoint(reactor, address),
                 _front(parts, name, factory, implicit, pop3_refusal)).setServiceParent(top)


def _imap_listeners(cfg, reactor, top, parts):
    """imap (STARTTLS) and imaps (implicit TLS), after the accounts are built."""
    mechanisms = Mechanisms(parts["accounts"], parts["oauth2"])
    for name in ("imap", "imaps"):
        address = getattr(cfg.listen, name)
        if address is None:
            continue
        implicit = name == "imaps"
        factory = IMAPFactory(cfg, _mail_store(cfg, parts), parts["accounts"], mechanisms,
                              parts["tls"], reactor, name, implicit_tls=implicit,
                              gate=parts["gate"])
        parts[name] = factory
        Listener(name, format_address(address), server_endpoint(reactor, address),
                 _front(parts, name, factory, implicit, imap_refusal)).setServiceParent(top)


def _queue_manager(cfg, reactor, spool, directory, deliverer, resolver):
    """The queue runner with remote delivery (MX routing + SMTP client) and DSNs."""
    routes = MXResolver(cfg, resolver=resolver, clock=reactor, cache_seconds=ROUTE_CACHE_SECONDS)
    remote = RemoteDelivery(cfg, routes, reactor)
    return QueueRunner(spool, directory, deliverer, reactor,
                       settings=QueueSettings.from_config(cfg), remote=remote,
                       bouncer=Bouncer.from_config(cfg, spool, reactor))


def build(cfg, reactor):
    """The service tree for ``cfg``; nothing is bound or started yet."""
    data_dir = cfg.server.data_dir
    writer_pool = threadpool.ThreadPool(minthreads=1, maxthreads=1, name="group-commit")
    # The writes and fsyncs of each batch run in a child process (its own GIL):
    # see appliance.durable.writer_process.
    files = ChildProcessFileSystem(os.path.join(data_dir, "queue.lock"), FSYNC_THREADS,
                                   reactor=reactor)
    writer = GroupCommitWriter(pool_runner(reactor, writer_pool), files)

    def read_in_thread(f, *args):
        return threads.deferToThread(f, *args)

    spool = Spool(os.path.join(data_dir, "queue"), writer, read_in_thread, reactor,
                  spare=os.path.join(data_dir, "queue.spare"))
    users = UsersFile(cfg.auth.users_file)
    aliases = AliasesFile(os.path.join(data_dir, "aliases"))
    try:
        directory, directory_service = directory_from_config(cfg, users, aliases, reactor)
    except LdapConfigError as exc:
        fail(str(exc))
    deliverer = MaildirDeliverer(os.path.join(data_dir, "mail"), writer, cfg.server.hostname)
    resolver = build_resolver(cfg)      # one for MX routing and the inbound checks
    runner = _queue_manager(cfg, reactor, spool, directory, deliverer, resolver)

    parts = dict(writer=writer, spool=spool, users=users, aliases=aliases,
                 directory=directory, runner=runner)
    top = ApplianceService(cfg, parts)
    EventLogService(cfg.log.events, reactor).setServiceParent(top)
    ThreadPoolService(writer_pool, drain=writer.drain, helpers=files).setServiceParent(top)
    if directory_service is not None:   # LDAP lookups: stops after the runner and listeners
        directory_service.setServiceParent(top)
    runner.setServiceParent(top)
    parts["tls"] = ServerTLS.from_config(cfg)
    TLSService(reactor, parts).setServiceParent(top)
    parts["dkim"] = KeyStore.from_config(cfg)
    KeyService(parts["dkim"], cfg.server.domains, fail).setServiceParent(top)
    parts["signer"] = Signer(cfg, parts["dkim"], threads.deferToThread)
    checks_pool = threadpool.ThreadPool(minthreads=0, maxthreads=WORKER_THREADS,
                                        name="inbound-checks")
    ThreadPoolService(checks_pool).setServiceParent(top)    # before the MX: outlives it
    parts["checks"] = InboundChecks(cfg, resolver, pool_runner(reactor, checks_pool))
    # Bans, limits, greylisting: loaded before the listeners open, one gate
    # for all of them. Greylisting asks SPF (retries from a sender's pool)
    # only when SPF checks are on.
    spf = spf_checker(parts["checks"]) if cfg.checks.spf != "off" else None
    parts["defences"] = Defences.from_config(cfg, reactor, threads.deferToThread, spf)
    DefenceService(parts["defences"], reactor).setServiceParent(top)
    parts["gate"] = Gate(cfg.limits, parts["defences"])

    if cfg.listen.mx is not None:
        factory = SMTPFactory(cfg, directory, spool, reactor, listener="mx",
                              tls=parts["tls"], gate=parts["gate"],
                              policy=DefencePolicy(MXPolicy(cfg, directory),
                                                   parts["defences"]))
        factory.signer = parts["signer"]        # trusted networks' mail
        factory.checks = parts["checks"]        # everyone else's: SPF, DKIM, DMARC
        parts["mx"] = factory
        Listener("mx", format_address(cfg.listen.mx), server_endpoint(reactor, cfg.listen.mx),
                 _front(parts, "mx", factory, False, smtp_refusal)).setServiceParent(top)
    _submission_listeners(cfg, reactor, top, parts, directory, spool, users)
    _pop3_listeners(cfg, reactor, top, parts)
    _imap_listeners(cfg, reactor, top, parts)
    return top


def makeService(options):
    try:
        cfg = load(options["config"])
    except ConfigError as exc:
        # One line per problem, the first names the file.
        lines = "\n".join(f"mailappliance: {p}" for p in exc.problems)
        print(lines, file=sys.stderr)
        raise SystemExit(2)
    from twisted.internet import reactor
    # The group-commit writer and its fsync threads give the GIL away at every
    # system call and must win it back from a busy reactor thread: with the
    # default 5 ms switch interval a batch's calls queue behind it. A short
    # interval keeps commits (and the 250s waiting on them) moving.
    sys.setswitchinterval(SWITCH_INTERVAL)
    # Every message makes thousands of short-lived containers (Deferreds,
    # events, lines): with the default threshold of 700 the cyclic collector
    # ran every few messages and walked everything built at start-up too.
    # Start-up objects are frozen out of its way once running, and the young
    # generation is collected every GC_THRESHOLD allocations (measured: about
    # a tenth less CPU per message under load).
    gc.set_threshold(GC_THRESHOLD, 10, 10)
    reactor.callWhenRunning(gc.freeze)
    return build(cfg, reactor)
