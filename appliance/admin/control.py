"""The control socket: ``mailappliance COMMAND`` on the machine itself.

A UNIX stream socket (``[admin] control_socket``, default
``<data_dir>/control.sock``, mode 0660: the server's user and group) that
speaks JSON lines. The client sends one request::

    {"argv": ["queue", "list"], "width": 120, "interactive": true}

and the server answers with lines ``{"out": TEXT}`` and ``{"err": TEXT}`` as
the command writes them, ``{"ask": QUESTION}`` or ``{"secret": PROMPT}`` when
it needs an answer (the client replies ``{"answer": TEXT}``), and last
``{"rc": N}``; then it closes. Whoever may open the socket is an admin; the
peer's uid (SO_PEERCRED) names them in the ``admin.command`` event.
"""

import json
import os
import pwd
import socket
import struct

from twisted.internet import defer, protocol
from twisted.protocols.basic import LineOnlyReceiver

from appliance.admin.commands import (EXIT_FAILED, Identity, Sink, dispatch)

MAX_REQUEST = 64 * 1024


def peer_user(transport):
    """The user name (or uid) of the process at the other end of a UNIX socket."""
    try:
        sock = transport.getHandle()
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
    except (AttributeError, OSError):
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class ControlProtocol(LineOnlyReceiver):
    """One request, one command, then close."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_REQUEST

    def __init__(self, make_context):
        self.make_context = make_context
        self.ctx = None
        self._waiting = None        # the Deferred of an ask/secret
        self._closed = False

    def lineReceived(self, line):
        try:
            message = json.loads(line.decode("utf-8"))
            if not isinstance(message, dict):
                raise ValueError("not an object")
        except (UnicodeDecodeError, ValueError):
            self._send({"err": "error: bad request"})
            self._send({"rc": EXIT_FAILED})
            self.transport.loseConnection()
            return
        if self.ctx is None:
            self._start(message)
        elif self._waiting is not None and "answer" in message:
            d, self._waiting = self._waiting, None
            d.callback(str(message["answer"]))

    def lineLengthExceeded(self, line):
        self.transport.loseConnection()

    def _start(self, message):
        argv = message.get("argv")
        if not isinstance(argv, list) or not all(isinstance(w, str) for w in argv):
            self._send({"err": "error: bad request"})
            self._send({"rc": EXIT_FAILED})
            self.transport.loseConnection()
            return
        width = message.get("width")
        sink = Sink(lambda text: self._send({"out": text}),
                    lambda text: self._send({"err": text}),
                    width if isinstance(width, int) and width > 20 else None)
        identity = Identity(user=peer_user(self.transport), mode="socket")
        interactive = bool(message.get("interactive"))
        self.ctx = self.make_context(sink, identity, self._secret if interactive else None,
                                     self._ask, interactive)
        d = dispatch(argv, self.ctx)
        d.addCallback(self._finished)

    def _ask(self, question):
        return self._question("ask", question).addCallback(
            lambda answer: answer.strip().lower() in ("y", "yes"))

    def _secret(self, prompt):
        return self._question("secret", prompt)

    def _question(self, kind, text):
        self._waiting = defer.Deferred()
        self._send({kind: text})
        return self._waiting

    def _finished(self, rc):
        self._send({"rc": rc})
        self.transport.loseConnection()

    def _send(self, message):
        if not self._closed:
            self.sendLine(json.dumps(message).encode("utf-8"))

    def connectionLost(self, reason):
        self._closed = True
        if self.ctx is not None and not self.ctx.cancelled.called:
            self.ctx.cancelled.callback(None)
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.errback(defer.CancelledError())


class ControlFactory(protocol.ServerFactory):
    def __init__(self, make_context):
        self.make_context = make_context

    def buildProtocol(self, addr):
        p = ControlProtocol(self.make_context)
        p.factory = self
        return p


# ---------------------------------------------------------------------------
# The client (the `mailappliance` command; plain sockets, no reactor)

class NotRunning(Exception):
    """No server answers on the control socket."""


def call(path, argv, out, err, width=None, ask=None, secret=None, timeout=None):
    """Run ``argv`` on the server behind ``path``; ``out(line)``/``err(line)``
    get its output as it comes, ``ask(question) -> str`` and ``secret(prompt)
    -> str`` answer its questions (None: not interactive). Returns the exit code."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise NotRunning(f"the server is not running (no answer on {path}: "
                         f"{exc.strerror})") from None
    except OSError as exc:
        sock.close()
        raise NotRunning(f"cannot reach the server on {path}: {exc.strerror or exc}") from None
    with sock:
        request = {"argv": list(argv), "width": width,
                   "interactive": ask is not None}
        sock.sendall(json.dumps(request).encode("utf-8") + b"\n")
        reader = sock.makefile("rb")
        for raw in reader:
            try:
                message = json.loads(raw.decode("utf-8"))
            except ValueError:
                continue
            if "out" in message:
                out(message["out"])
            elif "err" in message:
                err(message["err"])
            elif "ask" in message or "secret" in message:
                answer = ""
                if "ask" in message and ask is not None:
                    answer = ask(message["ask"])
                elif "secret" in message and secret is not None:
                    answer = secret(message["secret"])
                sock.sendall(json.dumps({"answer": answer}).encode("utf-8") + b"\n")
            elif "rc" in message:
                return int(message["rc"])
    raise NotRunning("the server closed the control socket without an answer")


def default_path(cfg):
    return cfg.admin.control_socket or os.path.join(cfg.server.data_dir, "control.sock")
