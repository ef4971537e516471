"""The interactive admin shell (a terminal: ``ssh -t``) and the line shell
(no terminal: ``ssh -T host < script``).

The terminal shell is ``recvline.HistoricRecvLine`` with what a network
device's CLI has: a prompt, line editing and history (arrows), Tab
completion of command words and live values (queue ids, users, aliases,
domains, selectors; a second Tab lists them), ``?`` anywhere lists what may
come next, ``help COMMAND``, Ctrl-C (drop the line, or stop a running
command such as ``log tail --follow``), Ctrl-D on an empty line and
``exit``/``quit``, Ctrl-L to redraw. It never resets or clears the admin's
screen (stock recvline does on connect and on every resize). Passwords are
read with a no-echo prompt, twice, and never enter the history.

The line shell reads lines and runs them strictly one after the other,
prints no prompt, and at EOF ends with the exit code of the last command.

Both end the session after ``[admin] idle_timeout`` without input while no
command runs.
"""

import shlex

from twisted.conch import recvline
from twisted.conch.insults import insults
from twisted.internet import defer, error as net_error
from twisted.python import failure

from appliance.admin import commands
from appliance.admin.commands import EXIT_OK, EXIT_USAGE, Sink, dispatch
from appliance.admin.output import safe
from appliance.admin.channel import Feed, connect_feed
from appliance.clock import cancel

PROMPT = b"mailappliance> "
MAX_LINE = 16 * 1024
CTRL_C, CTRL_D, CTRL_L = b"\x03", b"\x04", b"\x0c"


def start_pty_shell(pp, adm_session, realm, pty):
    _term, cols, rows = pty
    server = insults.ServerProtocol(PtyShell, adm_session, realm)
    connect_feed(pp, server)
    shell = server.terminalProtocol
    shell.pp = pp
    shell.resized(cols, rows)
    return shell


def start_line_shell(pp, adm_session, realm):
    shell = LineShell(pp, adm_session, realm)
    connect_feed(pp, Feed(shell.data))
    return shell


def _split(text):
    try:
        return shlex.split(text)
    except ValueError:
        return None


class _Idle:
    """One timer for ``[admin] idle_timeout``: ``touch()`` on input, paused
    while a command runs."""

    def __init__(self, clock, timeout, expire):
        self.clock, self.timeout, self.expire = clock, timeout, expire
        self.call = None

    def touch(self):
        self.stop()
        if self.timeout:
            self.call = self.clock.callLater(self.timeout, self._fire)

    def stop(self):
        self.call = cancel(self.call)

    def _fire(self):
        self.call = None
        self.expire()


class PtyShell(recvline.HistoricRecvLine):
    ps = (PROMPT, b"... ")

    def __init__(self, adm_session, realm):
        super().__init__()
        self.adm_session = adm_session
        self.realm = realm
        self.pp = None
        self.width, self.height = 80, 24
        self.ctx = None             # the Context of the command running
        self.asking = None          # (Deferred, secret?) of a prompt in progress
        self.last_rc = EXIT_OK
        self._tabbed = False
        self._ended = False

    # -- screen

    def connectionMade(self):
        super().connectionMade()
        self.keyHandlers[CTRL_C] = self.handle_INT
        self.keyHandlers[CTRL_D] = self.handle_EOF
        self.keyHandlers[CTRL_L] = self.handle_FF
        self.idle = _Idle(self.realm.clock, self.realm.idle_timeout, self._idle_out)
        self.idle.touch()
        commands.prepare_completion(self._context_for_completion())

    def initializeScreen(self):
        # No terminal reset (stock recvline wipes the admin's screen).
        who = self.adm_session.identity("pty")
        self._write(f"mailappliance admin shell; key {who.fingerprint} ({who.role}). "
                    "help, ? and Tab show the commands; exit or Ctrl-D leaves.\n")
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def resized(self, cols, rows):
        self.width, self.height = cols, rows

    def terminalSize(self, width, height):
        self.resized(width, height)       # no clearing, no redraw

    def _write(self, text):
        self.terminal.write(text.replace("\r", "").replace("\n", "\r\n").encode("utf-8"))

    def _out(self, line):
        self._write(line + "\n")

    # -- keys

    def keystrokeReceived(self, keyID, modifier):
        self.idle.touch()
        if self.ctx is not None and self.asking is None:
            if keyID == CTRL_C:         # stop the running command
                self._cancel_running()
            return
        if keyID == b"?" and self.asking is None:
            self._question_mark()
            return
        if keyID != self.terminal.TAB:
            self._tabbed = False
        if isinstance(keyID, bytes) and len(keyID) == 1 and keyID >= b"\x80":
            self.characterReceived(keyID, False)     # UTF-8 bytes of an IDN address
            return
        super().keystrokeReceived(keyID, modifier)

    def characterReceived(self, ch, moreCharactersComing):
        if len(self.lineBuffer) >= MAX_LINE:
            return
        if self.asking is not None and self.asking[1]:
            self.lineBuffer.insert(self.lineBufferIndex, ch)   # no echo: a password
            self.lineBufferIndex += 1
            return
        super().characterReceived(ch, moreCharactersComing)

    def handle_RETURN(self):
        if self.asking is not None:
            line = b"".join(self.lineBuffer)
            self.lineBuffer, self.lineBufferIndex = [], 0
            self.terminal.nextLine()
            d, _secret = self.asking
            self.asking = None
            d.callback(line.decode("utf-8", "replace"))
            return
        return super().handle_RETURN()

    def handle_INT(self):
        if self.asking is not None:
            d, _ = self.asking
            self.asking = None
            self.lineBuffer, self.lineBufferIndex = [], 0
            self.terminal.nextLine()
            d.errback(defer.CancelledError())
            return
        self.lineBuffer, self.lineBufferIndex = [], 0
        self._write("^C\n")
        self.terminal.write(self.ps[self.pn])

    def handle_EOF(self):
        if self.lineBuffer or self.asking is not None:
            return
        self._write("\n")
        self.end(self.last_rc)

    def handle_FF(self):
        self.terminal.eraseDisplay()
        self.terminal.cursorHome()
        self.drawInputLine()

    def handle_TAB(self):
        before = b"".join(self.lineBuffer[:self.lineBufferIndex]).decode("utf-8", "replace")
        words = before.split()
        partial = "" if before.endswith(" ") or not before else words.pop()
        candidates = commands.complete(self._context_for_completion(), words, partial)
        if not candidates:
            return
        common = _common_prefix(candidates)
        add = common[len(partial):]
        if len(candidates) == 1:
            add += " "
        if add:
            for ch in add.encode("utf-8"):
                self.characterReceived(bytes([ch]), False)
            self._tabbed = False
            return
        if self._tabbed or len(candidates) > 1:
            self._write("\n" + "  ".join(safe(c) for c in candidates[:200]) + "\n")
            self.drawInputLine()
        self._tabbed = True

    def _question_mark(self):
        before = b"".join(self.lineBuffer[:self.lineBufferIndex]).decode("utf-8", "replace")
        words = before.split()
        self._write("?\n")
        ctx = self._context_for_completion()
        partial = "" if before.endswith(" ") or not before else words.pop()
        try:
            cmd, _rest = commands.resolve(words + ([partial] if partial else []))
        except (LookupError, commands.UsageError):
            cmd = None
        if cmd is not None and len(cmd.words) >= len(words) + (1 if partial else 0):
            self._out(f"  {cmd.usage()}")
            self._out(f"    {cmd.summary}")
        else:
            shown = commands.complete(ctx, words, partial)
            for word in shown:
                found = commands.COMMANDS.get(tuple(words + [word]))
                if found is None:
                    found = next((c for c in commands.ORDER if c.words[0] == word
                                  and not words), None)
                    text = f"  {word}" + (f"  ({found.words[0]} ...)" if found else "")
                else:
                    text = f"  {word:<12} {found.summary}"
                self._out(text)
        self.drawInputLine()

    def _context_for_completion(self):
        return self.realm.make_context(Sink(lambda _: None, lambda _: None),
                                       self.adm_session.identity("pty"), None, None, True,
                                       audit=False)

    # -- lines

    def lineReceived(self, line):
        text = line.decode("utf-8", "replace").strip()
        if not text:
            self.terminal.write(self.ps[self.pn])
            return
        if text in ("exit", "quit", "logout"):
            self.end(self.last_rc)
            return
        argv = _split(text)
        if argv is None:
            self._out("error: unbalanced quotes")
            self.last_rc = EXIT_USAGE
            self.terminal.write(self.ps[self.pn])
            return
        if argv == ["?"]:
            argv = ["help"]
        sink = Sink(self._out, self._out, self.width)
        self.ctx = self.realm.make_context(sink, self.adm_session.identity("pty"),
                                           self._secret, self._confirm, True)
        self.idle.stop()
        d = dispatch(argv, self.ctx)
        d.addCallback(self._done)

    def _done(self, rc):
        self.ctx = None
        self.last_rc = rc
        if self._ended:
            return
        self.idle.touch()
        self.terminal.write(self.ps[self.pn])

    def _cancel_running(self):
        ctx = self.ctx
        if ctx is not None and not ctx.cancelled.called:
            self._write("^C\n")
            ctx.cancelled.callback(None)

    def _ask(self, prompt, secret):
        d = defer.Deferred()
        self.asking = (d, secret)
        self._write(prompt)
        return d

    @defer.inlineCallbacks
    def _secret(self, prompt):
        first = yield self._ask(prompt, True)
        again = yield self._ask(prompt.replace(":", " (again):", 1), True)
        if first != again:
            raise commands.Failed("the two passwords differ")
        return first

    def _confirm(self, question):
        d = self._ask(question, False)
        d.addCallback(lambda answer: answer.strip().lower() in ("y", "yes"))
        return d

    # -- the end

    def _idle_out(self):
        if self.ctx is None and not self._ended:
            self._write("\nidle too long: bye\n")
            self.end(EXIT_OK)

    def end(self, rc):
        if self._ended:
            return
        self._ended = True
        self.idle.stop()
        _end_session(self.pp, rc)

    def closed(self):
        self._ended = True
        self.idle.stop()
        if self.ctx is not None and not self.ctx.cancelled.called:
            self.ctx.cancelled.callback(None)
        if self.asking is not None:
            d, _ = self.asking
            self.asking = None
            d.errback(defer.CancelledError())

    def connectionLost(self, reason):
        self.closed()


class LineShell:
    """``ssh -T host < script``: each line a command, in order; no prompt."""

    def __init__(self, pp, adm_session, realm):
        self.pp = pp
        self.adm_session = adm_session
        self.realm = realm
        self.buffer = b""
        self.lines = []
        self.ctx = None
        self.last_rc = EXIT_OK
        self.at_eof = False
        self._ended = False
        self.idle = _Idle(realm.clock, realm.idle_timeout, self._idle_out)
        self.idle.touch()

    def data(self, data):
        self.idle.touch()
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            self.lines.append(line.rstrip(b"\r"))
        if len(self.buffer) > MAX_LINE:
            self.buffer = b""
            self._err("error: line too long")
        self._next()

    def eof(self):
        if self.buffer.strip():
            self.lines.append(self.buffer)
        self.buffer = b""
        self.at_eof = True
        self._next()

    def _err(self, line):
        self.pp.errReceived((line + "\n").encode("utf-8"))

    def _next(self):
        while self.ctx is None and self.lines and not self._ended:
            text = self.lines.pop(0).decode("utf-8", "replace").strip()
            if not text or text.startswith("#"):
                continue
            if text in ("exit", "quit"):
                self._finish()
                return
            argv = _split(text)
            if argv is None:
                self._err("error: unbalanced quotes")
                self.last_rc = EXIT_USAGE
                continue
            sink = Sink(lambda line: self.pp.outReceived((line + "\n").encode("utf-8")),
                        self._err)
            self.ctx = self.realm.make_context(sink, self.adm_session.identity("shell"),
                                               self._secret, None, False)
            self.idle.stop()
            dispatch(argv, self.ctx).addCallback(self._done)
            return
        if self.ctx is None and self.at_eof and not self.lines:
            self._finish()

    def _secret(self, prompt):
        # The next line of the script is the password (and not a command).
        if self.lines:
            return self.lines.pop(0).decode("utf-8", "replace")
        raise commands.Failed("no password line after the command")

    def _done(self, rc):
        self.ctx = None
        self.last_rc = rc
        if not self._ended:
            self.idle.touch()
        self._next()

    def _finish(self):
        if not self._ended:
            self._ended = True
            self.idle.stop()
            _end_session(self.pp, self.last_rc)

    def _idle_out(self):
        if self.ctx is None:
            self._err("error: idle too long")
            self._finish()

    def closed(self):
        self._ended = True
        self.idle.stop()
        if self.ctx is not None and not self.ctx.cancelled.called:
            self.ctx.cancelled.callback(None)


def _end_session(pp, rc):
    """exit-status, then close the channel (without it ssh exits 255)."""
    reason = net_error.ProcessDone(None) if rc == EXIT_OK else \
        net_error.ProcessTerminated(exitCode=rc)
    try:
        pp.processEnded(failure.Failure(reason))
    except Exception:  # noqa: BLE001 - the channel is already gone
        pass


def _common_prefix(words):
    first = min(words)
    last = max(words)
    for i, ch in enumerate(first):
        if i >= len(last) or last[i] != ch:
            return first[:i]
    return first
