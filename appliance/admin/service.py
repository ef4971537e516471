"""What ``tap.py`` adds for administration: the SSH listener on
``[listen] admin_ssh`` and the control socket, over one ``AdminState``
(the running appliance as the command set sees it).

``admin_services(cfg, reactor, parts, ...)`` returns the services; tap adds
them after the mail listeners.
"""

import ipaddress
import os
import socket
import time

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints, task, threads

import appliance
from appliance import events
from appliance.admin import control, keys as keymod, ssh
from appliance.admin.commands import Context
from appliance.admin.suspend import Suspensions, suspensions_path
from appliance.admin.userinfo import LdapUsers
from appliance.net.gate import Gate, GateFront

events.register("admin.reloaded", "an admin reloaded users, aliases, certificate and keys",
                ("what",))

DAY = 86400


class AdminState:
    """The running appliance for the admin commands: its parts (``app``, tap's
    ``Appliance`` record), the time it started, today's message counts (from
    the event stream)."""

    def __init__(self, app, reactor, blocking=None):
        self.app = app
        self.cfg = app.config
        self.reactor = reactor
        self.blocking = blocking or threads.deferToThread
        self.started = time.time()
        self.suspensions = getattr(app, "suspensions", None) or \
            Suspensions(suspensions_path(self.cfg))
        self._day = None
        self.today = {"in": 0, "out": 0}
        # With LDAP, user list / show / Tab read the directory through its
        # recipient lookups (their pool, timeouts and deadline).
        accounts = getattr(getattr(app, "directory", None), "accounts", None)
        self.ldap_users = LdapUsers(accounts, reactor) \
            if self.cfg.auth.backend == "ldap" and accounts is not None else None

    # -- counters (an event observer: cheap, it sees every event)

    def observe(self, event):
        name = event.get("event")
        if name == "smtp.message.accepted":
            self._roll(event)
            self.today["in"] += 1
        elif name == "delivery.remote":
            code = event.get("code")
            if isinstance(code, int) and 200 <= code < 300:
                self._roll(event)
                self.today["out"] += 1

    def _roll(self, event):
        day = int(event.get("log_time", 0) // DAY)
        if day != self._day:
            self._day = day
            self.today = {"in": 0, "out": 0}

    # -- what the commands ask

    def part(self, name):
        return getattr(self.app, name, None)

    @property
    def queue(self):
        runner = self.part("runner")
        return runner.admin if runner is not None else None

    def listeners(self):
        found = []
        for name, address in self.cfg.listeners().items():
            factory = (self.part("listeners") or {}).get(name)
            connections = getattr(factory, "connections", None) if factory is not None \
                else None
            host = f"[{address.host}]" if ":" in address.host else address.host
            found.append({"name": name, "address": f"{host}:{address.port}",
                          "connections": connections})
        return found

    def status(self):
        now = time.time()
        queue = {"messages": 0, "held": 0, "deferred": 0, "oldest_age": 0.0}
        spool = self.part("spool")
        if spool is not None:
            queue.update(spool.totals())    # kept as the queue changes: O(1)
        listeners = self.listeners()
        warnings = []
        admin = self.cfg.listen.admin_ssh
        if admin is not None and not _loopback(admin.host):
            warnings.append(f"the admin shell listens on {admin.host}, not on loopback")
        if self.suspensions.list():
            warnings.append(f"{len(self.suspensions.list())} users suspended")
        alerts = []
        auditor = self.part("auditor")
        if auditor is not None and getattr(auditor, "store", None) is not None:
            from appliance.audit.alerts import describe
            alerts = [{"alert_id": a["alert_id"], "text": describe(a), "acked": a["acked"]}
                      for a in auditor.store.latest(3)]
        return {
            "alerts": alerts,
            "version": appliance.__version__, "hostname": self.cfg.server.hostname,
            "uptime": round(now - self.started, 1), "listeners": listeners,
            "connections": sum(lst["connections"] or 0 for lst in listeners),
            "queue": queue, "today": dict(self.today), "warnings": warnings,
        }

    def reload(self):
        """Re-read what can change while running; lines saying what was done."""
        done = []
        for name, label in (("users", "users"), ("aliases", "aliases")):
            watched = self.part(name)
            if watched is not None and hasattr(watched, "_entries_now"):
                watched._checked_at = None
                done.append(f"{label}: {len(watched._entries_now())} entries")
        self.suspensions._checked_at = None
        done.append(f"suspended users: {len(self.suspensions.list())}")
        tls = self.part("tls")
        if tls is not None:
            try:
                changed = tls.reload()
                done.append("certificate: " + ("reloaded" if changed else "unchanged"))
            except Exception as exc:  # noqa: BLE001 - the old one stays in use
                done.append(f"certificate: kept the old one ({exc})")
        store = self.part("dkim")
        if store is not None:
            done.append(f"dkim keys: {len(store.keys())}")
        events.emit("admin.reloaded", what=[line.split(":")[0] for line in done])
        return done

    def make_context(self, sink, identity, read_secret, confirm, interactive, audit=True):
        return Context(self.cfg, sink, users=self.part("users"),
                       aliases=self.part("aliases"),
                       directory=self.part("directory"), dkim=self.part("dkim"),
                       suspensions=self.suspensions, queue=self.queue, state=self,
                       blocking=self.blocking, identity=identity, read_secret=read_secret,
                       confirm=confirm, interactive=interactive, audit=audit,
                       clock=self.reactor, cooperate=task.cooperate,
                       ldap_users=self.ldap_users)


def _loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Observing(service.Service):
    """Keeps AdminState's counters fed while running."""

    name = "admin-state"

    def __init__(self, state):
        self.state = state

    def startService(self):
        super().startService()
        events.add_observer(self.state.observe)

    def stopService(self):
        events.remove_observer(self.state.observe)
        return super().stopService()


class ControlSocketService(StreamServerEndpointService):
    """The control socket: a stale file from an unclean stop is removed
    first (nobody answers on it); one with a live server behind stops
    start-up (two servers on one data_dir)."""

    _raiseSynchronously = True

    def __init__(self, reactor, path, factory, fail):
        super().__init__(endpoints.UNIXServerEndpoint(reactor, path, mode=0o660), factory)
        self.setName("admin-control-socket")
        self.path = path
        self.fail = fail

    def privilegedStartService(self):
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)
            else:
                self.fail(f"[admin] control_socket: a server already answers on {self.path}")
            finally:
                probe.close()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o750, exist_ok=True)
        try:
            super().privilegedStartService()
        except Exception as exc:  # noqa: BLE001 - one line, not a traceback
            self.fail(f"[admin] control_socket: cannot listen on {self.path}: {exc}")

    def stopService(self):
        d = defer.maybeDeferred(super().stopService)

        def unlink(result):
            try:
                os.unlink(self.path)
            except OSError:
                pass
            return result
        return d.addBoth(unlink)


def admin_services(app, reactor, blocking, listener, fail):
    """The admin services for ``app`` (tap's Appliance record): the state
    observer, the control socket and (when ``[listen] admin_ssh`` is set) the
    SSH listener behind the appliance's one gate (``GateFront``), made with tap's
    ``listener(name, HostPort, factory)``; ``blocking(f, *args)`` runs the
    commands' file, key and hash work on a pool; ``fail(message)`` ends
    start-up."""
    cfg = app.config
    state = AdminState(app, reactor, blocking)
    app.admin = state
    gate = getattr(app, "gate", None)
    services = [_Observing(state),
                ControlSocketService(reactor, control.default_path(cfg),
                                     control.ControlFactory(state.make_context), fail)]
    address = cfg.listen.admin_ssh
    if address is not None:
        try:
            host_key = ssh.ensure_host_key(cfg.admin.host_key)
        except (OSError, ValueError) as exc:
            fail(f"[admin] host_key: cannot use {cfg.admin.host_key}: "
                 f"{getattr(exc, 'strerror', None) or exc}")
        factory = ssh.AdminFactory(host_key, keymod.key_files(cfg), state.make_context,
                                   reactor, lambda files: blocking(keymod.read_keys, files),
                                   gate=gate if gate is not None else Gate(cfg.limits),
                                   idle_timeout=cfg.admin.idle_timeout)
        app.listeners["admin_ssh"] = factory
        # The gate's front door, as on the mail ports: a banned or denied
        # client is closed at connect (plain close: SSH has no refusal words).
        services.append(listener("admin_ssh", address,
                                 GateFront(factory.gate, factory, "admin_ssh")))
    return services
