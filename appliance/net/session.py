"""The input side shared by the SMTP and POP3 sessions: one line at a time.

``LineSession`` is a mixin for a line protocol; it comes first among the
bases, so its ``dataReceived`` replaces LineOnlyReceiver's (stock SMTP and
POP3 handle every buffered line at once). The input goes through a
``LineFramer`` (CRLF only, bounded memory: T7) and complete lines go to
``_dispatch`` one at a time. A line whose answer is pending (a Deferred)
holds every later line until that answer is sent (T9): replies stay in
command order, and a pipelined command never runs before the one it follows
has finished. Meanwhile the input waits in the framer: past ``pause_input``
octets the transport stops reading, past ``max_pending_input`` the client is
not pipelining any more and ``_input_flood`` closes the session.

The hooks, for what differs between the protocols:

- ``_line_limit()``: the limit of the next line, CRLF included;
- ``_next_line()``: the next complete ``Line``, or None when there is none
  yet (default: ``LineFramer.next_line`` at ``_line_limit()``);
- ``_unfinished_line()``: no complete line is left; answer one that is
  already over its limit (default: nothing);
- ``_dispatch(line)``: handle one line; a Deferred when its answer is pending;
- ``_arm_timeout()``: the client's turn again (after a line, after an answer);
- ``_disarm_timeout()``: an answer is pending, the wait is ours, not the client's;
- ``_input_flood()``: more than ``max_pending_input`` buffered: answer and close;
- ``_input_held()``: the protocol itself stopped reading for a reason of
  its own (SMTP: a DATA body waiting for its file); no resume meanwhile;
- ``_reply_internal_error()``: answer a line whose handler failed;
- ``_line_too_long(octets)``: answer a line over its limit (``octets``: its
  length, or None while it is still arriving); ``_line_flood()``: close on a
  line that never ends (T7). A protocol calls ``_overlong_line(line)`` from
  ``_dispatch`` and ``_answer_overflow()`` from ``_unfinished_line``: each
  long line is answered once, when it starts to overflow or at its CRLF.

The session sets ``_closing`` when it closes: no line is handled after that.
"""

from twisted.internet import defer
from twisted.logger import Logger

from appliance.net.framing import LineFramer
from appliance.watchdog import timed

MAX_PENDING_INPUT = 1024 * 1024  # buffered while a reply is pending: not pipelining any more
PAUSE_INPUT = 64 * 1024         # buffered while a reply is pending: stop reading the socket
MAX_LINE_DISCARD = 64 * 1024    # one line longer than this: not a confused client

_log = Logger()


class LineSession:
    """Framing, one-at-a-time dispatch and flow control for a line protocol."""

    #: The protocol's name in log messages.
    protocol_label = "line"
    #: Octets buffered behind a pending answer before the transport is paused;
    #: None pauses as soon as an answer is pending.
    pause_input = PAUSE_INPUT
    #: Octets buffered behind a pending answer before ``_input_flood``.
    max_pending_input = MAX_PENDING_INPUT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._framer = LineFramer()
        self._pending = self._paused = self._draining = self._closing = False
        self._long_line_answered = False

    # -- hooks ----------------------------------------------------------------

    def _line_limit(self):
        raise NotImplementedError

    def _next_line(self):
        return self._framer.next_line(self._line_limit())

    def _unfinished_line(self):
        pass

    def _dispatch(self, line):
        raise NotImplementedError

    def _arm_timeout(self):
        pass

    def _disarm_timeout(self):
        pass

    def _input_flood(self):
        raise NotImplementedError

    def _input_held(self):
        return False

    def _reply_internal_error(self):
        raise NotImplementedError

    def _line_too_long(self, octets):
        raise NotImplementedError

    def _line_flood(self):
        raise NotImplementedError

    # -- lines over their limit (T7) -------------------------------------------

    def _overlong_line(self, line):
        """A too-long line reached its CRLF: its answer, unless it was given
        while the line overflowed."""
        if self._long_line_answered:
            self._long_line_answered = False
            return None
        return self._line_too_long(line.length + 2)

    def _answer_overflow(self):
        """No CRLF yet and already over the limit: answer at once, keep
        discarding, give up on a client that never ends the line."""
        if not self._long_line_answered:
            self._long_line_answered = True
            self._line_too_long(None)
        if not self._closing and self._framer.discarded > MAX_LINE_DISCARD:
            self._line_flood()

    # -- the input ----------------------------------------------------------------

    def dataReceived(self, data):
        """Replaces LineOnlyReceiver's: CRLF only, capped, held while pending."""
        if self._closing:
            return
        self._framer.feed(data)
        if self._pending:
            if self._framer.buffered > self.max_pending_input:
                self._input_flood()
                return
            self._pause_if_flooded()
        self._drain()

    @timed
    def _drain(self):
        """Handle complete lines until one is pending (T9) or none is left."""
        if self._draining:
            return
        self._draining = True
        try:
            while not (self._pending or self._closing):
                line = self._next_line()
                if line is None:
                    self._unfinished_line()
                    break
                try:
                    result = self._dispatch(line)
                except Exception:
                    _log.failure("{protocol} command handler failed",
                                 protocol=self.protocol_label)
                    self._reply_internal_error()
                    result = None
                self._await(result)
        finally:
            self._draining = False

    def _await(self, result):
        """Handle no more lines until a pending answer is sent (T9); replies
        stay in order. Input that arrives meanwhile waits in the framer."""
        if not isinstance(result, defer.Deferred):
            if not self._closing:
                self._arm_timeout()
            return
        self._pending = True
        self._disarm_timeout()
        result.addErrback(self._internal_error)
        result.addBoth(self._answered)
        if self._pending and not self._closing:
            self._pause_if_flooded()

    def _pause_if_flooded(self):
        """Stop reading the socket once ``pause_input`` octets wait for a
        pending answer. Not sooner: pausing and resuming cost a system call
        each, and a pipelining client sends a few commands, not a flood."""
        limit = self.pause_input
        if not self._paused and (limit is None or self._framer.buffered > limit):
            self._paused = True
            self.transport.pauseProducing()

    def _answered(self, _):
        self._pending = False
        if self._paused:
            self._paused = False
            if not self._closing and not self._input_held():
                self.transport.resumeProducing()
        if self._closing:
            return
        self._arm_timeout()
        self._drain()

    def _internal_error(self, failure):
        _log.failure("{protocol} command failed", failure, protocol=self.protocol_label)
        self._reply_internal_error()

    def _close_transport(self):
        """Close once what is written has left; no line is handled after.

        A paused transport reads again first: TLS waits for the client's
        close_notify (or its FIN), which a transport that does not read
        never sees, and the connection would linger.
        """
        self._closing = True
        if self._paused or self._input_held():
            self._paused = False
            self.transport.resumeProducing()
        self.transport.loseConnection()

    def _discard_input(self):
        """Throw away every buffered octet (after STARTTLS/STLS: T1); -> how many."""
        octets = self._framer.buffered
        self._framer = LineFramer()
        return octets
