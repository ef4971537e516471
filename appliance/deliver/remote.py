"""Outbound SMTP: one transaction per (message, destination domain).

``RemoteDelivery.deliver(envelope, message, recipients, domain)`` routes the
domain (``appliance.deliver.mx``), tries its hosts and addresses in order and
answers one ``RecipientResult`` per recipient: 2xx delivered, 4xx deferred,
5xx failed. It never raises for network or DNS trouble: a host that refuses,
times out, fails TLS or greets with an error is skipped for the next one; when
every host failed, each recipient gets a 4xx with the last error.

A connection whose transaction ended in a 2xx stays open ``IDLE_LIMIT``
seconds for the next message to the same host (MAIL straight away, as after
any completed transaction), like Postfix's connection cache: under load a
destination costs one connect, greeting and EHLO (and TLS handshake) per
burst, not per message.

The protocol itself (replies, commands, the body on the wire, TLS
contexts) is ``appliance.deliver.smtpclient``.

There are no smarthost credentials in SPEC §3, so no AUTH is sent.

The route kind (``appliance.deliver.routes``) says where a group goes:
REMOTE by MX (or smarthost), MAILBOX to an edge's ``[relay] mailbox_host``
(no MTA-STS: the operator chose that host, as for a smarthost). The rest is
the same: a mailbox host that is down defers, and the queue retries.
"""

from dataclasses import dataclass

from twisted.internet import defer, endpoints
from twisted.logger import Logger

from appliance import events
from appliance.deliver import mtasts
from appliance.deliver.mx import RoutingError
from appliance.deliver.routes import REMOTE
from appliance.deliver.smtpclient import (
    ClientFactory, HostFailure, Reply, Timeouts, default_tls_context, describe_error,
    ehlo_extensions, needs_utf8, quit_session, wire_address, wire_body)

_log = Logger(namespace="mailappliance.deliver.remote")

events.register("delivery.remote", "a remote MX answered for a recipient (or every host failed)",
                ("queue_id", "recipient", "remote_host", "remote_ip", "tls", "code", "response"))
events.register("delivery.remote.attempt", "a connection to a remote MX failed; the next is tried",
                ("queue_id", "domain", "host", "ip", "error"))

MAX_ATTEMPTS = 20          # addresses tried per delivery
# Connection reuse, as Postfix's smtp_connection_cache_time_limit and
# smtp_connection_reuse_time_limit: a connection whose transaction ended in a
# 2xx waits IDLE_LIMIT seconds for the next message to the same host, and is
# not reused once REUSE_LIMIT seconds old.
IDLE_LIMIT = 2.0
REUSE_LIMIT = 300.0
MAX_IDLE = 100             # idle connections kept in all


@dataclass
class RecipientResult:
    """What happened to one recipient.

    ``text`` is the remote reply's text (its lines joined by spaces) when
    ``from_remote``, else our own description (connection refused, DNS ...);
    ``status`` is the RFC 3463 code either way.
    """

    recipient: str
    code: int
    status: str
    text: str
    remote_host: str = ""
    tls: bool = False
    remote_ip: str = ""
    from_remote: bool = True

    @property
    def delivered(self):
        return 200 <= self.code < 300

    @property
    def deferred(self):
        return 400 <= self.code < 500

    @property
    def failed(self):
        return self.code >= 500

    @property
    def response(self):
        return f"{self.code} {self.text}"


# ---------------------------------------------------------------------------
# Delivery


class RemoteDelivery:
    """Delivers messages to remote domains; see the module docstring.

    ``resolver``: an ``MXResolver``; ``reactor``: clock and TCP connector;
    ``tls_context_factory(hostname, verify) -> connection creator``;
    ``timeouts``: a ``Timeouts``; ``connect(ip, port, factory, timeout)``
    replaces the reactor's TCP connect (tests). ``mta_sts``: an
    ``mtasts.MTASTSPolicies`` to honour recipients' MTA-STS policies (RFC 8461).
    """

    mta_sts = None

    def __init__(self, config, resolver, reactor, tls_context_factory=None,
                 timeouts=None, connect=None):
        self.config = config
        self.resolver = resolver
        self.reactor = reactor
        self.tls_context_factory = tls_context_factory or default_tls_context
        self.timeouts = timeouts or Timeouts()
        self._connect = connect or self._tcp_connect
        self.tls_mode = config.outbound.tls
        self.helo_name = config.server.hostname or "localhost"
        self._idle = {}            # (host, ip, port) -> [(proto, expiry DelayedCall)]
        self._stopped = False

    def _tcp_connect(self, ip, port, factory, timeout):
        endpoint_class = endpoints.TCP6ClientEndpoint if ":" in ip \
            else endpoints.TCP4ClientEndpoint
        return endpoint_class(self.reactor, ip, port, timeout=timeout).connect(factory)

    # -- the public face -----------------------------------------------------

    def deliver(self, envelope, message, recipients, domain, kind=REMOTE):
        """Deferred[list[RecipientResult]], one per recipient, in order;
        ``kind``: the route kind of the group (``appliance.deliver.routes``)."""
        if not recipients:
            return defer.succeed([])
        d = self._deliver(envelope, message, list(recipients), domain, kind)
        d.addErrback(self._internal_error, envelope, recipients)
        return d

    def _internal_error(self, failure, envelope, recipients):
        # A bug must not lose the message: defer it like a network error.
        _log.failure("remote delivery of {queue_id} failed", failure,
                     queue_id=envelope.queue_id)
        results = [RecipientResult(r, 451, "4.3.0", "internal error in remote delivery",
                                   from_remote=False) for r in recipients]
        self._report(envelope, results)
        return results

    @defer.inlineCallbacks
    def _deliver(self, envelope, message, recipients, domain, kind=REMOTE):
        try:
            route = yield (self.resolver.resolve(domain) if kind == REMOTE
                           else self.resolver.resolve(domain, kind))
        except RoutingError as e:
            results = [RecipientResult(r, e.code, e.status, e.text, from_remote=False)
                       for r in recipients]
            self._report(envelope, results)
            return results
        body = wire_body(message)
        addresses, verified = route.addresses(), False
        if self.mta_sts is not None and not route.relay_host:
            policy = self.mta_sts.known(domain)
            if policy is mtasts.ASK:
                policy = yield self.mta_sts.policy_for(domain)
            addresses, verified = mtasts.restrict(policy, addresses, envelope.queue_id, domain)
        last = HostFailure("4.4.1", f"no address to try for {domain}")
        if verified and not addresses:
            last = HostFailure("4.7.5", f"no MX host of {domain} is listed in its MTA-STS "
                                        "policy")
        host = ip = ""
        for host, ip in addresses[:MAX_ATTEMPTS]:
            try:
                replies, tls = yield self._attempt(envelope, body, len(message),
                                                   recipients, host, ip, route.port, verified)
            except HostFailure as failure:
                last = failure
                events.emit("delivery.remote.attempt", queue_id=envelope.queue_id,
                            domain=domain, host=host, ip=ip, error=failure.text)
                continue
            results = [RecipientResult(r, replies[r].code, replies[r].status,
                                       replies[r].text, host, tls, ip,
                                       from_remote=not replies[r].local)
                       for r in recipients]
            self._report(envelope, results)
            return results
        results = [RecipientResult(r, last.code, last.status, last.text, host, False, ip,
                                   from_remote=False) for r in recipients]
        self._report(envelope, results)
        return results

    @staticmethod
    def _report(envelope, results):
        for result in results:
            events.emit("delivery.remote", queue_id=envelope.queue_id,
                        recipient=result.recipient, remote_host=result.remote_host,
                        remote_ip=result.remote_ip, tls=result.tls, code=result.code,
                        response=result.response)

    # -- one host ------------------------------------------------------------

    @defer.inlineCallbacks
    def _attempt(self, envelope, body, size, recipients, host, ip, port, verified=False):
        """``({recipient: Reply}, tls)`` from this host, or raise HostFailure.

        An idle connection to the host from an earlier message is used first;
        if it turns out closed before answering anything, a new one is made.
        ``verified``: STARTTLS with a verified certificate is required (MTA-STS).
        """
        key = (host, ip, port, verified)
        proto = self._take_idle(key)
        if proto is not None:
            answered = proto.replies
            try:
                replies = yield from self._transaction(proto, envelope, body, size,
                                                       recipients, proto.extensions)
            except HostFailure:
                proto.abort()
                if proto.replies != answered:
                    raise
            else:
                self._done_with(key, proto, replies)
                return replies, proto.tls
        peer = f"{host}[{ip}]" if host != ip else f"[{ip}]"
        factory = ClientFactory(self.reactor, peer)
        try:
            proto = yield self._connect(ip, port, factory, self.timeouts.connect)
        except Exception as e:        # refused, timed out, unreachable ...
            raise HostFailure("4.4.1", f"connect to {peer}:{port}: {describe_error(e)}") from None
        proto.opened_at = self.reactor.seconds()
        try:
            replies = yield self._converse(proto, envelope, body, size, recipients, host,
                                           verified)
        except Exception:
            proto.abort()
            raise
        self._done_with(key, proto, replies)
        return replies, proto.tls

    # -- idle connections ----------------------------------------------------

    def _done_with(self, key, proto, replies):
        """Keep the connection for the next message to this host, or QUIT.

        Kept only after a transaction that ended in a 2xx to the end of data
        (a positive reply for some recipient): the session is then back at
        its start, ready for MAIL.
        """
        if (not self._stopped and proto.usable
                and any(reply.positive for reply in replies.values())
                and self.reactor.seconds() - proto.opened_at < REUSE_LIMIT
                and sum(map(len, self._idle.values())) < MAX_IDLE):
            timer = self.reactor.callLater(IDLE_LIMIT, self._expire, key, proto)
            self._idle.setdefault(key, []).append((proto, timer))
            proto.on_lost = lambda: self._forget_idle(key, proto)
            return
        quit_session(proto)

    def _take_idle(self, key):
        """The most recently used idle connection to ``key``, or None."""
        idle = self._idle.get(key)
        while idle:
            proto, timer = idle.pop()
            if timer.active():
                timer.cancel()
            proto.on_lost = None
            if proto.usable:
                if not idle:
                    del self._idle[key]
                return proto
            proto.abort()
        self._idle.pop(key, None)
        return None

    def _forget_idle(self, key, proto):
        """The peer closed an idle connection (or it failed): drop it."""
        idle = self._idle.get(key, [])
        for n, (cached, timer) in enumerate(idle):
            if cached is proto:
                del idle[n]
                if timer.active():
                    timer.cancel()
                break
        if not idle:
            self._idle.pop(key, None)

    def _expire(self, key, proto):
        self._forget_idle(key, proto)
        quit_session(proto)

    def stop(self):
        """QUIT every idle connection and keep none from now on (shutdown).

        The Deferred fires once they are all closed."""
        self._stopped = True
        idle, self._idle = self._idle, {}
        gone = []
        for entries in idle.values():
            for proto, timer in entries:
                if timer.active():
                    timer.cancel()
                gone.append(quit_session(proto))
        return defer.DeferredList(gone)

    @defer.inlineCallbacks
    def _converse(self, proto, envelope, body, size, recipients, host, verified=False):
        t = self.timeouts
        greeting = yield proto.expect(t.greeting, "receiving the initial server greeting")
        if not greeting.positive:
            raise HostFailure.from_reply(greeting, f"host {proto.peer_name} refused to talk "
                                                   "to me")
        extensions = yield self._hello(proto)
        extensions = proto.extensions = yield self._tls(proto, extensions, host, verified)
        replies = yield from self._transaction(proto, envelope, body, size, recipients,
                                               extensions)
        return replies

    @defer.inlineCallbacks
    def _hello(self, proto):
        """EHLO (HELO after a 5xx): ``{KEYWORD: argument}`` of the extensions."""
        t = self.timeouts
        proto.command(f"EHLO {self.helo_name}")
        reply = yield proto.expect(t.command, "sending EHLO")
        if reply.positive:
            return ehlo_extensions(reply)
        if reply.code >= 500:
            proto.command(f"HELO {self.helo_name}")
            reply = yield proto.expect(t.command, "sending HELO")
            if reply.positive:
                return {}
        raise HostFailure.from_reply(reply, f"host {proto.peer_name} refused HELO/EHLO")

    @defer.inlineCallbacks
    def _tls(self, proto, extensions, host, verified=False):
        """STARTTLS per ``[outbound] tls`` (or required and verified: MTA-STS);
        the extensions of the session to use."""
        required = self.tls_mode == "required" or verified
        if self.tls_mode == "off" and not verified:
            return extensions
        if "STARTTLS" not in extensions:
            if required:
                raise HostFailure("4.7.4", "TLS is required, but was not offered by host "
                                           f"{proto.peer_name}")
            return extensions
        proto.command("STARTTLS")
        reply = yield proto.expect(self.timeouts.command, "sending STARTTLS")
        if reply.code != 220:
            if required:
                raise HostFailure.from_reply(reply, f"host {proto.peer_name} refused STARTTLS")
            return extensions
        try:
            creator = self.tls_context_factory(host, required)
            proto.start_tls(creator)       # drops whatever followed the 220 (T13)
        except Exception as e:
            raise HostFailure("4.7.5", f"cannot start TLS with {proto.peer_name}: "
                                       f"{describe_error(e)}") from None
        # The first reply under TLS proves the handshake (and, when required,
        # the certificate check) succeeded; a failure is a lost connection.
        try:
            extensions = yield self._hello(proto)
        except HostFailure as failure:
            if failure.status == "4.4.2":
                raise HostFailure("4.7.5", f"TLS with {proto.peer_name} failed: "
                                           f"{failure.text}") from None
            raise
        proto.tls = True
        return extensions

    # _transaction, _pipelined and _lockstep are steps of the conversation's
    # generator (``yield from``), not inlineCallbacks of their own: a Deferred
    # and a generator driver fewer for each message.

    def _transaction(self, proto, envelope, body, size, recipients, extensions):
        """MAIL, RCPT..., DATA, body: ``{recipient: Reply}`` for all recipients."""
        t = self.timeouts
        replies = _refused_before_mail(proto, envelope, size, recipients, extensions)
        sendable = [r for r in recipients if r not in replies]
        if not sendable:
            return replies
        utf8 = "SMTPUTF8" in extensions
        mail = self._mail_command(envelope, size, sendable, extensions)
        rcpts = [f"RCPT TO:{wire_address(r, utf8)}" for r in sendable]
        if "PIPELINING" in extensions:
            mail_reply, rcpt_replies, data_reply = yield from self._pipelined(proto, mail,
                                                                              rcpts)
        else:
            mail_reply, rcpt_replies, data_reply = yield from self._lockstep(proto, mail, rcpts)
        if not mail_reply.positive:
            if mail_reply.code < 500:
                raise HostFailure.from_reply(mail_reply,
                                             f"host {proto.peer_name} said at MAIL FROM")
            replies.update({r: mail_reply for r in sendable})
            return replies
        replies.update(zip(sendable, rcpt_replies))
        accepted = [r for r, reply in zip(sendable, rcpt_replies) if reply.positive]
        if not accepted:
            if data_reply is not None and data_reply.code == 354:
                # RFC 2920 §3.1: end the DATA the server invited, with nothing in it.
                yield proto.send_body(b"", t.data_block)
                yield proto.expect(t.data_end, "sending the end of an empty DATA")
            return replies
        if data_reply.code == 354:
            yield proto.send_body(body, t.data_block)
            final = yield proto.expect(t.data_end, "sending the end of data")
        elif data_reply.code >= 400:
            final = data_reply
        else:
            final = Reply(451, [f"4.5.0 unexpected reply to DATA from {proto.peer_name}: "
                                f"{data_reply}"], local=True)
        replies.update({r: final for r in accepted})
        return replies

    def _mail_command(self, envelope, size, sendable, extensions):
        utf8 = "SMTPUTF8" in extensions
        mail = f"MAIL FROM:{wire_address(envelope.sender, utf8)}"
        if "SIZE" in extensions:
            mail += f" SIZE={size}"
        if "8BITMIME" in extensions and envelope.params.get("BODY") == "8BITMIME":
            mail += " BODY=8BITMIME"
        if utf8 and (envelope.params.get("SMTPUTF8") or
                     any(needs_utf8(a) for a in [envelope.sender] + sendable)):
            mail += " SMTPUTF8"
        return mail

    def _pipelined(self, proto, mail, rcpts):
        """RFC 2920: every command in one go, then the replies in order."""
        t = self.timeouts
        proto.command(mail, *rcpts, "DATA")
        mail_reply = yield proto.expect(t.command, "sending MAIL FROM")
        rcpt_replies = []
        for _line in rcpts:
            rcpt_replies.append((yield proto.expect(t.command, "sending RCPT TO")))
        data_reply = yield proto.expect(t.data_init, "sending DATA")
        return mail_reply, rcpt_replies, data_reply

    def _lockstep(self, proto, mail, rcpts):
        """One command, one reply; DATA only when a recipient was accepted."""
        t = self.timeouts
        proto.command(mail)
        mail_reply = yield proto.expect(t.command, "sending MAIL FROM")
        if not mail_reply.positive:
            return mail_reply, [], None
        rcpt_replies = []
        for line in rcpts:
            proto.command(line)
            rcpt_replies.append((yield proto.expect(t.command, "sending RCPT TO")))
        data_reply = None
        if any(reply.positive for reply in rcpt_replies):
            proto.command("DATA")
            data_reply = yield proto.expect(t.data_init, "sending DATA")
        return mail_reply, rcpt_replies, data_reply


def _refused_before_mail(proto, envelope, size, recipients, extensions):
    """``{recipient: Reply}`` for those this host cannot take at all (SIZE, SMTPUTF8)."""
    limit = extensions.get("SIZE", "")
    if limit.isdigit() and 0 < int(limit) < size:
        reply = Reply(552, [f"5.3.4 message size {size} exceeds the limit {limit} "
                            f"of {proto.peer_name}"], local=True)
        return {r: reply for r in recipients}
    if "SMTPUTF8" in extensions:
        return {}
    if needs_utf8(envelope.sender):
        return {r: _no_utf8(proto) for r in recipients}
    return {r: _no_utf8(proto) for r in recipients if needs_utf8(r)}


def _no_utf8(proto):
    return Reply(553, [f"5.6.7 SMTPUTF8 is required, but was not offered by host "
                       f"{proto.peer_name}"], local=True)


