"""appliance.net.session: one line at a time, held behind a pending answer (T9)."""

from twisted.internet import defer, protocol

from appliance.net.session import (MAX_LINE_DISCARD, MAX_PENDING_INPUT, PAUSE_INPUT,
                                       LineSession)
from appliance.testing import StringTransport


class Echo(LineSession, protocol.Protocol):
    """Answers every line with ``ok <line>``; a line in ``answers`` is answered
    when its Deferred fires. ``FAIL`` makes the handler raise, ``QUIT`` closes.
    ``calls`` records the hooks that ran, in order."""

    protocol_label = "test"

    def __init__(self):
        super().__init__()
        self.answers = {}
        self.handled = []
        self.calls = []

    def _line_limit(self):
        return 512

    def _dispatch(self, line):
        if line.too_long:
            return self._overlong_line(line)
        self.handled.append(line.data)
        if line.data == b"FAIL":
            raise RuntimeError("handler bug")
        if line.data == b"QUIT":
            self._closing = True
            self.transport.loseConnection()
            return None
        answer = self.answers.pop(line.data, None)
        if answer is None:
            self.say(b"ok " + line.data)
            return None
        answer.addCallback(lambda _: self.say(b"ok " + line.data))
        return answer

    def _unfinished_line(self):
        self.calls.append("unfinished")
        if self._framer.overflowing:
            self._answer_overflow()

    def _line_too_long(self, octets):
        self.say(b"too long" if octets is None else b"too long: %d" % octets)

    def _line_flood(self):
        self.say(b"line flood")
        self._close_transport()

    def _arm_timeout(self):
        self.calls.append("arm")

    def _disarm_timeout(self):
        self.calls.append("disarm")

    def _input_flood(self):
        self.calls.append("flood")
        self.say(b"flood")
        self._close_transport()

    def _reply_internal_error(self):
        self.say(b"error")

    def say(self, text):
        if not self._closing:       # as the real sessions' reply()
            self.transport.write(text + b"\r\n")


def connected(session=None):
    session = session or Echo()
    session.makeConnection(StringTransport())
    return session


def said(session):
    """The lines written since the last call."""
    out = session.transport.value()
    session.transport.clear()
    return [line.decode() for line in out.split(b"\r\n")[:-1]]


def test_lines_are_handled_in_order_and_a_partial_line_waits_for_crlf():
    s = connected()
    s.dataReceived(b"one\r\ntwo\r\nthr")
    assert said(s) == ["ok one", "ok two"]
    s.dataReceived(b"ee\r")
    assert said(s) == []
    s.dataReceived(b"\nfour\r\n")
    assert said(s) == ["ok three", "ok four"]
    assert s.handled == [b"one", b"two", b"three", b"four"]
    # The client's timer again after every line; "unfinished" when none is left.
    assert s.calls == ["arm", "arm", "unfinished", "unfinished", "arm", "arm", "unfinished"]


def test_a_pending_answer_holds_the_later_lines_t9():
    s = connected()
    d = s.answers[b"WAIT"] = defer.Deferred()
    s.dataReceived(b"A\r\nWAIT\r\nB\r\nC\r\n")
    assert said(s) == ["ok A"]
    assert s.handled == [b"A", b"WAIT"]
    assert s.calls == ["arm", "disarm"]         # the wait is the server's now
    s.dataReceived(b"D\r\n")                    # still held
    assert s.handled == [b"A", b"WAIT"] and said(s) == []
    d.callback(None)
    assert said(s) == ["ok WAIT", "ok B", "ok C", "ok D"]
    assert s.handled == [b"A", b"WAIT", b"B", b"C", b"D"]
    assert s.calls[2:] == ["arm", "arm", "arm", "arm", "unfinished"]


def test_pending_answers_one_after_another():
    s = connected()
    first = s.answers[b"W1"] = defer.Deferred()
    second = s.answers[b"W2"] = defer.Deferred()
    s.dataReceived(b"W1\r\nW2\r\nB\r\n")
    first.callback(None)
    assert said(s) == ["ok W1"] and s.handled == [b"W1", b"W2"]
    second.callback(None)
    assert said(s) == ["ok W2", "ok B"] and s.handled == [b"W1", b"W2", b"B"]


def test_an_answer_that_has_already_fired_holds_nothing():
    s = connected()
    s.answers[b"X"] = defer.succeed(None)
    s.dataReceived(b"A\r\nX\r\nB\r\n")
    assert said(s) == ["ok A", "ok X", "ok B"]
    assert s.handled == [b"A", b"X", b"B"]      # each once: no second drain inside the first
    assert s.transport.producerState == "producing"


def test_the_transport_pauses_only_past_pause_input_and_resumes_on_the_answer():
    s = connected()
    d = s.answers[b"WAIT"] = defer.Deferred()
    s.dataReceived(b"WAIT\r\n" + b"NOOP\r\n" * 10)
    assert s.transport.producerState == "producing"   # a few pipelined lines: keep reading
    more = PAUSE_INPUT // 6
    s.dataReceived(b"NOOP\r\n" * more)
    assert s._framer.buffered > PAUSE_INPUT
    assert s.transport.producerState == "paused"
    s.dataReceived(b"NOOP\r\n")                # paused once, stays paused
    assert s.transport.producerState == "paused" and s.handled == [b"WAIT"]
    d.callback(None)
    assert s.transport.producerState == "producing"
    assert s.handled == [b"WAIT"] + [b"NOOP"] * (10 + more + 1)
    assert said(s) == ["ok WAIT"] + ["ok NOOP"] * (10 + more + 1)


def test_input_up_to_pause_input_does_not_pause():
    s = connected()
    s.answers[b"WAIT"] = defer.Deferred()
    s.dataReceived(b"WAIT\r\n")
    s.dataReceived(b"x" * (PAUSE_INPUT - 2) + b"\r\n")   # exactly PAUSE_INPUT buffered
    assert s._framer.buffered == PAUSE_INPUT
    assert s.transport.producerState == "producing"
    s.dataReceived(b"y")
    assert s.transport.producerState == "paused"


def test_pause_input_none_pauses_as_soon_as_an_answer_is_pending():
    """The POP3 session's setting."""
    s = Echo()
    s.pause_input = None
    connected(s)
    d = s.answers[b"WAIT"] = defer.Deferred()
    s.dataReceived(b"WAIT\r\n")
    assert s.transport.producerState == "paused"
    d.callback(None)
    assert s.transport.producerState == "producing"


def test_a_flood_behind_a_pending_answer_closes_the_session():
    s = connected()
    d = s.answers[b"WAIT"] = defer.Deferred()
    s.dataReceived(b"WAIT\r\n")
    chunk = b"NOOP\r\n" * 10_000
    sent = 0
    while not s.transport.disconnecting:
        s.dataReceived(chunk)
        sent += len(chunk)
    assert MAX_PENDING_INPUT < sent <= MAX_PENDING_INPUT + len(chunk)
    assert s.calls.count("flood") == 1 and said(s) == ["flood"]
    s.dataReceived(b"NOOP\r\n")                 # closing: ignored
    d.callback(None)                            # late answer: no resume, no more lines
    assert s.handled == [b"WAIT"] and said(s) == []
    assert s.transport.producerState == "producing"     # read again to see the close


def test_input_without_a_pending_answer_is_never_a_flood():
    s = connected()
    s.dataReceived(b"NOOP\r\n" * (MAX_PENDING_INPUT // 6 + 10))
    assert "flood" not in s.calls and not s.transport.disconnecting
    assert len(s.handled) == MAX_PENDING_INPUT // 6 + 10


def test_a_failing_handler_is_answered_and_the_next_line_handled():
    s = connected()
    s.dataReceived(b"FAIL\r\nB\r\n")
    assert said(s) == ["error", "ok B"]


def test_a_failed_answer_is_answered_and_the_next_line_handled():
    s = connected()
    d = s.answers[b"WAIT"] = defer.Deferred()
    s.dataReceived(b"WAIT\r\nB\r\n")
    d.errback(RuntimeError("backend bug"))
    assert said(s) == ["error", "ok B"]
    assert d.called and d.result is None        # handled: no unhandled error in GC


def test_no_line_is_handled_once_the_session_closes():
    s = connected()
    s.dataReceived(b"A\r\nQUIT\r\nB\r\n")
    s.dataReceived(b"C\r\n")
    assert s.handled == [b"A", b"QUIT"] and said(s) == ["ok A"]


def test_next_line_hook_decides_how_input_is_taken():
    """A subclass can take input another way (SMTP: whole DATA blocks)."""

    class Upper(Echo):
        def _next_line(self):
            line = super()._next_line()
            return line and line._replace(data=line.data.upper())

    s = connected(Upper())
    s.dataReceived(b"a\r\nb\r\n")
    assert said(s) == ["ok A", "ok B"]


def test_discard_input_empties_the_buffer():
    s = connected()
    s.answers[b"WAIT"] = defer.Deferred()
    s.dataReceived(b"WAIT\r\nB\r\nC")
    assert s._discard_input() == len(b"B\r\nC")
    assert s._framer.buffered == 0


def test_a_paused_session_reads_again_as_it_closes():
    """TLS waits for the client's close_notify: a transport that stays paused
    would never see it."""
    s = connected()
    s.answers[b"slow"] = defer.Deferred()
    s.dataReceived(b"slow\r\n" + b"x" * (PAUSE_INPUT + 10))
    assert s.transport.producerState == "paused"
    s._close_transport()
    assert s.transport.producerState == "producing" and s.transport.disconnecting


def test_a_long_line_is_answered_once_whether_it_overflows_or_ends_first():
    s = connected()
    s.dataReceived(b"x" * 600)                  # over 512, no CRLF yet: answered now
    assert said(s) == ["too long"]
    s.dataReceived(b"x" * 100 + b"\r\nnext\r\n")  # its CRLF: not answered twice
    assert said(s) == ["ok next"]
    s.dataReceived(b"y" * 600 + b"\r\n")       # arrives whole: answered at its CRLF
    assert said(s) == ["too long: 602"]


def test_a_line_that_never_ends_closes_the_session():
    s = connected()
    s.dataReceived(b"x" * 600)
    chunk = b"x" * 8192
    for _ in range(MAX_LINE_DISCARD // len(chunk) + 2):
        if s.transport.disconnecting:
            break
        s.dataReceived(chunk)
    assert said(s) == ["too long", "line flood"] and s.transport.disconnecting
