"""All the defences built from the configuration, and the service that
loads their state before the listeners open.

``Defences.from_config(cfg, clock, run_in_thread)`` is the one object the
listeners share (through the gate): ``admission``, ``bans``, ``auth``,
``rates``, ``greylist`` and ``state`` are its parts, and the few methods
below are what the protocols call.
"""

import os
import time

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from appliance import events
from appliance.defence.admission import Admission
from appliance.defence.authfail import LOGINS, AuthGuard
from appliance.defence.bans import BANS, OFFENCES, Bans
from appliance.defence.greylist import NETWORKS, PENDING, TRIPLETS, Greylist
from appliance.defence.junk import JunkCounter
from appliance.defence.network import Networks
from appliance.defence.rates import Rates
from appliance.defence.state import LocalState

EXPIRE_INTERVAL = 10.0      # seconds between sweeps of expired state (ban expiry events)
PERSISTENT = (BANS, OFFENCES, LOGINS, TRIPLETS, NETWORKS, PENDING)

_log = Logger()

events.register("defence.state.loaded", "the defence state (bans, greylist...) was read at "
                "start; counts per map, seconds it took", ("counts", "seconds"))


class Defences:
    """See the module doc. ``state``: an ``IDefenceState`` (default: a
    ``LocalState`` in ``directory``); ``spf``: ``greylist.spf_checker(...)``
    or None."""

    def __init__(self, config, clock, state=None, directory=None, run_in_thread=None,
                 spf=None):
        limits = config.limits
        self.config = config
        self.clock = clock
        self.exempt = Networks(tuple(limits.allow) + tuple(config.relay.trusted_networks))
        self.deny = Networks(limits.deny)
        if state is None:
            kwargs = {} if run_in_thread is None else {"run_in_thread": run_in_thread}
            state = LocalState(directory, clock, persistent=PERSISTENT, **kwargs)
        self.state = state
        self.bans = Bans(state, clock, limits, self.exempt)
        self.auth = AuthGuard(state, clock, self.bans, limits, self.exempt)
        self.rates = Rates(state, limits, self.exempt)
        self.greylist = Greylist(state, clock, config.checks, limits, self.exempt, spf)
        self.admission = Admission(limits, self.bans, self.rates, self.deny, self.exempt,
                                   clock)

    @classmethod
    def from_config(cls, config, clock, run_in_thread=None, spf=None, shared_run=None):
        """The server's: state persisted in ``<data_dir>/defence``; with
        ``[state] backend = redis`` that is the replica of the state shared
        through Redis, whose work runs in ``shared_run`` (the ``redis`` pool)."""
        directory = os.path.join(config.server.data_dir, "defence")
        state = None
        backend = getattr(config, "state", None)
        if backend is not None and backend.backend == "redis":
            from appliance.defence.redis_state import shared_state
            kwargs = {} if run_in_thread is None else {"run_in_thread": run_in_thread}
            local = LocalState(directory, clock, persistent=PERSISTENT, **kwargs)
            state = shared_state(config, local, clock, shared_run, shared=PERSISTENT)
        return cls(config, clock, state=state, directory=directory,
                   run_in_thread=run_in_thread, spf=spf)

    def load(self):
        """Read the persisted state (before the listeners open)."""
        started = time.monotonic()
        counts = self.state.load() if hasattr(self.state, "load") else {}
        self.bans.reindex()
        seconds = round(time.monotonic() - started, 3)
        events.emit("defence.state.loaded", counts=counts, seconds=seconds)
        return counts

    # -- what the protocols call ---------------------------------------------------

    def mail_allowed(self, ip, user=None):
        """MAIL: count one transaction of authenticated ``user`` (per user)
        or of unauthenticated client ``ip`` (per network); False: 451 4.7.1."""
        if user:
            return self.rates.message_from_user(user, ip)
        return self.rates.message_from_ip(ip)

    def auth_failed(self, ip, account="", fingerprint=None, ticket=None):
        """A failed AUTH/LOGIN/USER+PASS; -> the Ban it caused, or None.

        Call it before answering the failure. A ban closes the network's
        other open sessions at once; the session of ``ticket`` (the caller's,
        from ``admission.admit``) is spared: it answers the failure, then
        closes itself with its protocol's words when a Ban came back.
        """
        self.admission.sparing = ticket
        try:
            return self.auth.failure(ip, account, fingerprint)
        finally:
            self.admission.sparing = None

    def auth_succeeded(self, ip, account):
        self.auth.success(ip, account)

    def junk_counter(self, key=""):
        return JunkCounter(self.config.limits.junk_commands, key)


class DefenceService(service.Service):
    """Loads the defence state before the listeners bind (it is added to the
    service tree before them), sweeps expired entries while running (ban
    expiry events), writes everything out at stop."""

    name = "defences"
    _sweep = None               # the LoopingCall that expires entries, while running

    def __init__(self, defences, clock):
        self.defences = defences
        self.clock = clock

    def privilegedStartService(self):
        self.defences.load()
        super().privilegedStartService()

    def startService(self):
        super().startService()
        if hasattr(self.defences.state, "start"):
            self.defences.state.start()     # shared state: connects in the background
        self._sweep = task.LoopingCall(self.defences.state.expire)
        self._sweep.clock = self.clock
        self._sweep.start(EXPIRE_INTERVAL, now=False).addErrback(
            lambda f: _log.failure("defence state sweep stopped", f))

    def stopService(self):
        super().stopService()
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None
        state = self.defences.state
        d = defer.maybeDeferred(state.stop) if hasattr(state, "stop") else defer.succeed(None)
        d.addCallback(lambda _: state.flush())
        return d
