"""`twistd mailappliance`: read the config, build the service tree, start it.

This is the one place that picks the real reactor, clock and thread pools;
everything below takes them as constructor arguments.

Service tree (a MultiService stops its children in reverse order, so the
writer pool is added first and outlives the services that use it)::

    ApplianceService
      event log          JSON events to [log] events
      writer pool        the group-commit thread (spool and Maildir fsyncs)
      queue runner       local delivery of spooled mail, recovery at start
      listener mx        ESMTP on [listen] mx
"""

import os
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, threads
from twisted.logger import Logger, globalLogPublisher
from twisted.python import threadpool, usage

import appliance
from appliance import events
from appliance.auth.users import UsersFile
from appliance.config import ConfigError, load
from appliance.deliver.maildir import MaildirDeliverer
from appliance.directory import AliasesFile, Directory
from appliance.queue.commit import GroupCommitWriter, ThreadPoolService, pool_runner
from appliance.queue.runner import QueueRunner
from appliance.queue.store import Spool
from appliance.receive.smtp import SMTPFactory

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

    def __init__(self, path):
        self.path = path
        self.observer = None

    def privilegedStartService(self):
        # Opened before twistd drops privileges: /var/log may need root.
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
            self.observer = events.JsonEventFile(self.path)
        except OSError as exc:
            fail(f"[log] events: cannot open {self.path}: {exc.strerror or exc}")
        globalLogPublisher.addObserver(self.observer)
        super().privilegedStartService()

    def stopService(self):
        super().stopService()
        if self.observer is not None:
            globalLogPublisher.removeObserver(self.observer)
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


def build(cfg, reactor):
    """The service tree for ``cfg``; nothing is bound or started yet."""
    data_dir = cfg.server.data_dir
    writer_pool = threadpool.ThreadPool(minthreads=1, maxthreads=1, name="group-commit")
    writer = GroupCommitWriter(pool_runner(reactor, writer_pool))

    def read_in_thread(f, *args):
        return threads.deferToThread(f, *args)

    spool = Spool(os.path.join(data_dir, "queue"), writer, read_in_thread, reactor)
    users = UsersFile(cfg.auth.users_file)
    aliases = AliasesFile(os.path.join(data_dir, "aliases"))
    directory = Directory(cfg, users, aliases)
    deliverer = MaildirDeliverer(os.path.join(data_dir, "mail"), writer, cfg.server.hostname)
    runner = QueueRunner(spool, directory, deliverer, reactor)

    parts = dict(writer=writer, spool=spool, users=users, aliases=aliases,
                 directory=directory, runner=runner)
    top = ApplianceService(cfg, parts)
    EventLogService(cfg.log.events).setServiceParent(top)
    ThreadPoolService(writer_pool, drain=writer.drain).setServiceParent(top)
    runner.setServiceParent(top)

    if cfg.listen.mx is not None:
        factory = SMTPFactory(cfg, directory, spool, reactor, listener="mx")
        parts["mx"] = factory
        Listener("mx", format_address(cfg.listen.mx),
                 server_endpoint(reactor, cfg.listen.mx), factory).setServiceParent(top)
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
    return build(cfg, reactor)
