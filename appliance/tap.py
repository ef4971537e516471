"""`twistd mailappliance`: read the config, build the service tree, start it.

This is the one place that picks the real reactor, clock and thread pools;
everything below takes them as constructor arguments.

Service tree (a MultiService stops its children in reverse order, so each
thread pool is added before the services that use it and outlives them)::

    ApplianceService          its ``appliance`` (an ``Appliance``) holds the parts
      event log               JSON events to [log] events
      pool-group-commit       the spool's batches (fsyncs in the writer child)
      pool-spool-read, pool-spool-incoming, pool-password-hash, pool-dns   (POOLS below)
      pool-ldap-directory     LDAP recipient lookups (backend = ldap only)
      queue runner            local and remote delivery, retries, DSNs; recovery at start
      pool-defence-state, defences   bans, limits, greylist state loaded (before any listener)
      pool-redis              [state] backend = redis: shared state written and heard
      auditor, queue-watch    the live IDS over the event stream ([audit] enabled)
      tls                     certificate and JWKS loaded; SIGHUP reloads the certificate
      dkim-keys               DKIM keys made if missing, loaded
      pool-dkim-sign, pool-inbound-checks, pool-ldap, pool-maildir
      listener mx             ESMTP on [listen] mx, STARTTLS
      listener submission, submission_alt   STARTTLS + AUTH
      listener submissions                  implicit TLS + AUTH
      listener pop3 (STLS), pop3s, imap (STARTTLS), imaps   over the Maildirs
                              (none on an edge: [relay] mailbox_host, SPEC §7)
      acme-pool, acme         ACME client (acme = on): certificates into the tls service
      listener http, https    MTA-STS policy, client autoconfig, ACME challenges (appliance.web)
      admin-state, admin-control-socket, listener admin_ssh   the admin shell (appliance.admin)

Every listener's factory gets the one ``Gate`` (appliance.net.gate), which asks the
defences (appliance.defence): a client's connections are counted, and refused, across
all of them; bans, rates and greylisting reach every listener at once.
"""

import gc
import os
import signal
import sys
from dataclasses import dataclass, field

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

import appliance
from appliance import events
from appliance.access.imap.server import IMAPFactory
from appliance.access.folders import MaildirStore
from appliance.access.pop3 import POP3Factory
from appliance.admin.service import admin_services
from appliance.admin.suspend import SuspendableAccounts, Suspensions, suspensions_path
from appliance.audit.service import AuditService, QueueWatch
from appliance.auth.ldap import POOL_SIZE as LDAP_POOL_SIZE, LdapConfigError, accounts_from_config
from appliance.auth.oauth2 import JWKSError, TokenVerifier
from appliance.auth.sasl import Mechanisms
from appliance.auth.users import UsersFile
from appliance.config import ConfigError, load
from appliance.deliver.maildir import MaildirDeliverer
from appliance.deliver.mtasts import MTASTSPolicies
from appliance.deliver.mx import ROUTE_CACHE_SECONDS, MXResolver, build_resolver
from appliance.deliver.remote import RemoteDelivery
from appliance.deliver.routes import Routing
from appliance.directory import AliasesFile, directory_from_config
from appliance.policy.checks import WORKER_THREADS, InboundChecks
from appliance.policy.dkim_sign import Signer
from appliance.policy.keys import KeyService, KeyStore
from appliance.policy.pipeline import Pipeline
from appliance.defence.greylist import spf_checker
from appliance.defence.bans import AuditorBans
from appliance.defence.redis_state import StateConfigError
from appliance.defence.service import Defences, DefenceService
from appliance.defence.stages import DefenceStage, imap_refusal, pop3_refusal, smtp_refusal
from appliance.durable.commit import GroupCommitWriter
from appliance.threads import ThreadPoolService, new_pool, pool_runner
from appliance.queue.bounce import Bouncer
from appliance.queue.manager import QueueSettings
from appliance.queue.runner import QueueRunner
from appliance.queue.store import Spool
from appliance.durable.writer_process import ChildProcessFileSystem
from appliance.receive.smtp import SMTPFactory
from appliance.receive.submission import SubmissionFactory
from appliance.net.gate import Gate, GateFront
from appliance.net.tls import ServerTLS, TLSError
from appliance.watchdog import ReactorWatchdog
from appliance.web import services as web_services

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
    """The whole server; ``appliance`` (an ``Appliance``) holds its parts."""

    appliance = None

    def __init__(self, config):
        super().__init__()
        self.config = config

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

    def __init__(self, reactor, app):
        self._reactor = reactor
        self._app = app
        self._previous = None

    def privilegedStartService(self):
        try:
            self._app.tls.load()
        except TLSError as exc:
            fail(f"[tls] certificate: {exc}")
        if self._app.oauth2 is not None:
            try:
                self._app.oauth2.load()
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
            self._app.tls.reload()
        except Exception:
            _log.failure("reload on SIGHUP failed")


# Threads for each kind of blocking work (appliance.threads): a pool each, so
# one kind cannot starve another (a bcrypt storm, Maildir reads, DKIM RSA).
POOLS = {
    "group-commit": 1,          # the spool's batches (their fsyncs run in the writer child)
    "spool-read": 4,            # spool entries read back for delivery
    "spool-incoming": 4,        # DATA bodies too big for memory, written as they arrive
    "maildir": 8,               # IMAP and POP3 folder work
    "password-hash": 4,         # bcrypt / argon2 of the users file
    "dkim-sign": 2,             # RSA / Ed25519 signatures of our users' mail
    "dns": 8,                   # MX lookups (dnspython blocks)
    "mta-sts": 2,               # recipients' MTA-STS policies: DNS, then an HTTPS fetch
    "admin": 2,                 # admin commands' file, key and hash work
    "audit": 1,                 # the auditor's alerts and holds, written durably
    "inbound-checks": WORKER_THREADS,   # SPF / DKIM / DMARC of MX mail
    "ldap": LDAP_POOL_SIZE,             # logins (backend = ldap)
    "ldap-directory": LDAP_POOL_SIZE,   # recipient lookups (backend = ldap)
    "defence-state": 1,         # durable writes of bans and greylist (appliance.defence)
    "redis": 2,                 # [state] backend = redis: one writer, one subscriber
}


class Pools:
    """The appliance's thread pools, made on first use: ``run(name)`` is the
    ``run_in_thread`` over pool ``name``; each pool's service joins ``top``
    when made (so it outlives the services added after it)."""

    def __init__(self, reactor, top):
        self._reactor = reactor
        self._top = top
        self.pools = {}

    def pool(self, name, drain=None, helpers=None):
        """The ThreadPool ``name``, made with its service on first use."""
        if name not in self.pools:
            threads = POOLS[name]
            pool = new_pool(name, threads, minthreads=1 if threads == 1 else 0)
            ThreadPoolService(pool, drain=drain, helpers=helpers).setServiceParent(self._top)
            self.pools[name] = pool
        return self.pools[name]

    def run(self, name):
        return pool_runner(self._reactor, self.pool(name))


@dataclass
class Appliance:
    """The running appliance: each long-lived part by name, for the admin
    commands and the tests (``ApplianceService.appliance``)."""

    config: object
    gate: Gate
    writer: GroupCommitWriter
    spool: Spool
    users: UsersFile
    aliases: AliasesFile
    directory: object
    runner: QueueRunner
    tls: ServerTLS = None
    oauth2: TokenVerifier = None
    dkim: KeyStore = None
    signer: Signer = None
    checks: InboundChecks = None
    accounts: object = None
    mailstore: MaildirStore = None
    defences: Defences = None   # bans, limits, greylisting (``gate.defences``)
    listeners: dict = field(default_factory=dict)     # name -> protocol factory (or web site)
    acme: object = None                               # the ACME client (acme = on)
    challenges: object = None                         # ACME challenges being answered
    bans: object = None         # the defences' ban service (ban(network, reason=, rule=))
    auditor: AuditService = None
    suspensions: Suspensions = None     # suspended users (appliance.admin.suspend)
    admin: object = None                # appliance.admin.service.AdminState


def _listen(top, reactor, name, address, factory, words, tls=None):
    """A listener for ``factory`` on ``address``; with ``tls``, implicit TLS.
    The gate stands in front (``GateFront``): a refused client costs no
    session, and no TLS state or handshake; ``words(verdict)`` is the
    protocol's refusal, an implicit-TLS port just closes."""
    wrapped = TLSMemoryBIOFactory(tls, False, factory) if tls is not None else factory
    front = GateFront(factory.gate, wrapped, name, None if tls is not None else words)
    Listener(name, format_address(address), server_endpoint(reactor, address),
             front).setServiceParent(top)


def _smtp_listeners(app, reactor, top, mechanisms):
    """mx; submission and submission_alt (STARTTLS), submissions (implicit TLS)."""
    cfg = app.config
    trusted = cfg.relay.trusted_networks
    if cfg.listen.mx is not None:
        factory = SMTPFactory(cfg, app.directory, app.runner, reactor, listener="mx",
                              tls=app.tls, gate=app.gate)
        # Trusted networks' mail is signed, everyone else's checked: one pipeline.
        factory.pipeline = Pipeline(factory.policy, trusted, checks=app.checks,
                                    signer=app.signer, stages=[DefenceStage(app.defences)])
        app.listeners["mx"] = factory
        _listen(top, reactor, "mx", cfg.listen.mx, factory, smtp_refusal)
    for name in ("submission", "submissions", "submission_alt"):
        address = getattr(cfg.listen, name)
        if address is None:
            continue
        implicit = name == "submissions"
        factory = SubmissionFactory(cfg, app.directory, app.runner, reactor, name, mechanisms,
                                    app.tls, implicit_tls=implicit, gate=app.gate)
        factory.pipeline = Pipeline(factory.policy, trusted, signer=app.signer,
                                    stages=[DefenceStage(app.defences)])
        app.listeners[name] = factory
        _listen(top, reactor, name, address, factory, smtp_refusal,
                app.tls if implicit else None)


def _access_listeners(app, reactor, top, mechanisms, pools):
    """pop3 (STLS), pop3s, imap (STARTTLS), imaps, over one MaildirStore
    (its folder objects, UID lists and the POP3 maildrop lock are shared).
    An edge has no mailboxes: none of them (config.py turned them off)."""
    cfg = app.config
    if cfg.is_edge:
        return
    app.mailstore = MaildirStore(os.path.join(cfg.server.data_dir, "mail"), pools.run("maildir"),
                                 hostname=cfg.server.hostname)
    for name in ("pop3", "pop3s", "imap", "imaps"):
        address = getattr(cfg.listen, name)
        if address is None:
            continue
        implicit = name.endswith("s")
        if name.startswith("pop3"):
            factory = POP3Factory(cfg, app.mailstore, mechanisms, reactor, name, tls=app.tls,
                                  implicit_tls=implicit, gate=app.gate)
            words = pop3_refusal
        else:
            factory = IMAPFactory(cfg, app.mailstore, app.accounts, mechanisms, app.tls,
                                  reactor, name, implicit_tls=implicit, gate=app.gate)
            words = imap_refusal
        app.listeners[name] = factory
        _listen(top, reactor, name, address, factory, words, app.tls if implicit else None)


def _queue_manager(cfg, reactor, spool, directory, deliverer, resolver, pools):
    """The queue runner with remote delivery (MX routing + SMTP client) and DSNs."""
    routes = MXResolver(cfg, run_in_thread=pools.run("dns"), resolver=resolver, clock=reactor,
                        cache_seconds=ROUTE_CACHE_SECONDS)
    remote = RemoteDelivery(cfg, routes, reactor)
    remote.mta_sts = MTASTSPolicies(resolver, pools.run("mta-sts"), reactor)     # RFC 8461
    runner = QueueRunner(spool, directory, deliverer, reactor,
                         settings=QueueSettings.from_config(cfg), remote=remote,
                         routing=Routing.from_config(cfg, directory))     # edge: SPEC §7
    runner.bouncer = Bouncer.from_config(cfg, runner, reactor)     # DSNs queue like any mail
    return runner


def _ldap_pool(cfg, name):
    """The LDAP pool ``name`` when the backend is LDAP (closed by its owner), else None."""
    return new_pool(name, POOLS[name]) if cfg.auth.backend == "ldap" else None


def _auditor(app, reactor, top, pools):
    """The live auditor ([audit] enabled): before the listeners, so it sees
    their first events and stops after them. Bans go to ``app.bans`` (the
    defences' ban service) when there is one; without it each ban is an
    ``audit.action_skipped`` event and the alert still goes out."""
    cfg = app.config
    if not cfg.audit.enabled:
        return
    app.auditor = AuditService.from_config(cfg, reactor, spool=app.spool, runner=app.runner,
                                           bans=app.bans, write=pools.run("audit"))
    app.auditor.setServiceParent(top)
    if cfg.state.backend == "redis":
        app.auditor.share(app.defences.state)   # alerts of every appliance (SPEC §7)
    QueueWatch(app.spool, cfg.queue.delay_warning, reactor).setServiceParent(top)


def build(cfg, reactor):
    """The service tree for ``cfg``; nothing is bound or started yet."""
    data_dir = cfg.server.data_dir
    top = ApplianceService(cfg)
    EventLogService(cfg.log.events, reactor).setServiceParent(top)
    ReactorWatchdog(reactor).setServiceParent(top)
    pools = Pools(reactor, top)
    # The writes and fsyncs of each batch run in a child process (its own GIL):
    # see appliance.durable.writer_process. Its pool is the first one made, so
    # it stops last, after every service that commits through it.
    files = ChildProcessFileSystem(os.path.join(data_dir, "queue.lock"), FSYNC_THREADS,
                                   reactor=reactor)
    commit_pool = pools.pool("group-commit", drain=lambda: writer.drain(), helpers=files)
    writer = GroupCommitWriter(pool_runner(reactor, commit_pool), files)
    spool = Spool(os.path.join(data_dir, "queue"), writer, pools.run("spool-read"), reactor,
                  spare=os.path.join(data_dir, "queue.spare"),
                  incoming=pools.run("spool-incoming"))
    users = UsersFile(cfg.auth.users_file, run_in_thread=pools.run("password-hash"))
    aliases = AliasesFile(os.path.join(data_dir, "aliases"))
    try:
        directory, directory_service = directory_from_config(
            cfg, users, aliases, reactor, _ldap_pool(cfg, "ldap-directory"))
    except LdapConfigError as exc:
        fail(str(exc))
    if directory_service is not None:   # LDAP lookups: stops after the runner and listeners
        directory_service.setServiceParent(top)
    # An edge ([relay] mailbox_host) relays the local domains: no Maildirs.
    deliverer = None if cfg.is_edge else MaildirDeliverer(
        os.path.join(data_dir, "mail"), writer, cfg.server.hostname)
    resolver = build_resolver(cfg)      # one for MX routing and the inbound checks
    runner = _queue_manager(cfg, reactor, spool, directory, deliverer, resolver, pools)
    app = top.appliance = Appliance(cfg, Gate(cfg.limits), writer, spool, users, aliases,
                                    directory, runner)
    runner.setServiceParent(top)
    # Bans, limits, greylisting: their state is loaded before any listener
    # binds; the one gate asks them; the auditor bans through them.
    if cfg.state.backend == "redis":
        # The pool stops once the shared state has written what it holds.
        pools.pool("redis", drain=lambda: app.defences.state.stop())
    try:
        app.defences = Defences.from_config(
            cfg, reactor, pools.run("defence-state"),
            shared_run=pools.run("redis") if cfg.state.backend == "redis" else None)
    except StateConfigError as exc:
        fail(str(exc))
    DefenceService(app.defences, reactor).setServiceParent(top)
    app.gate.defences = app.defences
    app.bans = AuditorBans(app.defences.bans)   # AUTH brute force is banned in-process
    _auditor(app, reactor, top, pools)
    app.tls = ServerTLS.from_config(cfg)
    app.oauth2 = TokenVerifier.from_config(cfg)
    TLSService(reactor, app).setServiceParent(top)
    app.dkim = KeyStore.from_config(cfg)
    KeyService(app.dkim, cfg.server.domains, fail).setServiceParent(top)
    app.signer = Signer(cfg, app.dkim, pools.run("dkim-sign"))
    app.checks = InboundChecks(cfg, resolver, pools.run("inbound-checks"))
    if cfg.checks.spf != "off":
        # Greylisting passes a retry from another host of the sender's pool
        # when SPF authorises it: asked only when SPF checks are on.
        app.defences.greylist.spf = spf_checker(app.checks)
    try:
        app.accounts, ldap_service = accounts_from_config(cfg, users, directory, reactor,
                                                          _ldap_pool(cfg, "ldap"))
    except LdapConfigError as exc:
        fail(str(exc))
    if ldap_service is not None:
        ldap_service.setServiceParent(top)     # before the listeners: stops after them
    app.suspensions = Suspensions(suspensions_path(cfg))
    app.accounts = SuspendableAccounts(app.accounts, app.suspensions)   # user suspend
    mechanisms = Mechanisms(app.accounts, app.oauth2)
    _smtp_listeners(app, reactor, top, mechanisms)
    _access_listeners(app, reactor, top, mechanisms, pools)

    def listener(name, address, factory):
        return Listener(name, format_address(address), server_endpoint(reactor, address),
                        factory)
    for web_service in web_services(cfg, reactor, app, listener):     # SPEC §8
        web_service.setServiceParent(top)
    for admin in admin_services(app, reactor, pools.run("admin"), listener, fail):
        admin.setServiceParent(top)     # control socket, SSH shell (SPEC §5)
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
