"""SMTP line framing and DATA assembly, with no I/O and bounded memory.

Lines end with CRLF and nothing else (RFC 5321 §2.3.8). A bare CR or LF is
part of the line it sits in and is reported, never taken for a line end: that
is what keeps ``\\n.\\n`` and friends from ending DATA (SMTP smuggling).

A line longer than the caller's limit is reported as too long; its excess is
discarded as it arrives, so a client that never sends CRLF costs at most one
limit's worth of buffer (TWISTED-TRAPS T7), and a long line inside DATA does
not end DATA (T8).
"""

from collections import namedtuple

CRLF = b"\r\n"

#: ``data``: the line without CRLF (empty when too long); ``length``: its
#: octets without CRLF, discarded ones included; ``too_long``: over the
#: limit; ``bare``: holds a bare CR or LF.
Line = namedtuple("Line", "data length too_long bare")


def _has_bare(chunk):
    return b"\r" in chunk or b"\n" in chunk


class LineFramer:
    """Cuts a byte stream into CRLF-terminated lines, one at a time.

    ``next_line(limit)`` takes the limit of the line it returns (CRLF
    included), so the caller can change it between lines: 512 for commands,
    1000 for text lines in DATA.
    """

    def __init__(self):
        self._buffer = bytearray()
        self._discarded = 0     # octets of the current line already thrown away
        self._bare = False      # the thrown-away part held a bare CR or LF

    def feed(self, data):
        self._buffer += data

    @property
    def buffered(self):
        """Octets waiting in the buffer."""
        return len(self._buffer)

    @property
    def overflowing(self):
        """The current, unfinished line is already over its limit."""
        return self._discarded > 0

    @property
    def discarded(self):
        return self._discarded

    def next_line(self, limit):
        """The next complete line, or None when no CRLF has arrived yet."""
        end = self._buffer.find(CRLF)
        if end < 0:
            self._trim(limit)
            return None
        data = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        length = self._discarded + end
        too_long = length + 2 > limit
        bare = self._bare or _has_bare(data)
        self._discarded, self._bare = 0, False
        return Line(b"" if too_long else data, length, too_long, bare)

    def take_body(self, body, limit):
        """Move every complete DATA line into ``body`` at once, as one block.

        True when the final ``.`` line came, False when more input is needed,
        None when a line must go through ``next_line`` and ``DataBody.add``
        one at a time: a bare CR or LF, a line over ``limit`` or an overlong
        line being discarded (the block would not be refused the same way).
        The common message costs a few scans of the buffer instead of a
        method call per line.
        """
        if self._discarded or body.slow:
            return None
        buffer = self._buffer
        if buffer.startswith(b".\r\n"):
            del buffer[:3]
            return True
        end = buffer.find(b"\r\n.\r\n")
        done = end >= 0
        end = end + 2 if done else buffer.rfind(CRLF) + 2
        if end < 2:                              # not even one complete line
            self._trim(limit)
            return False
        block = bytes(buffer[:end])
        crlf = block.count(CRLF)
        if block.count(b"\r") != crlf or block.count(b"\n") != crlf or \
                max(map(len, block.split(CRLF))) + 2 > limit:
            body.slow = True                     # this message goes line by line
            return None
        del buffer[:end + 3 if done else end]
        body.add_block(block)
        if not done:
            self._trim(limit)
        return done

    def _trim(self, limit):
        """Drop what can no longer fit in the current line.

        A trailing CR stays: it may be the first half of the CRLF.
        """
        keep = 1 if self._buffer.endswith(b"\r") else 0
        excess = len(self._buffer) - keep
        if excess <= 0 or (not self.overflowing and excess <= limit - 2):
            return
        self._bare = self._bare or _has_bare(self._buffer[:excess])
        self._discarded += excess
        del self._buffer[:excess]


class _InMemory:
    """The default sink of a DataBody: the lines in a list."""

    def __init__(self):
        self._parts = []

    def write(self, data):
        self._parts.append(data)

    def drop(self):
        self._parts = []

    def message(self):
        return b"".join(self._parts)


class DataBody:
    """The DATA body as it arrives: dot-unstuffed lines, size and faults.

    The lines go to ``sink`` as they come (``write(data)``: whole lines with
    their CRLF), by default a list in memory; the SMTP server's sink keeps a
    big body in the spool's file instead (``appliance.queue.incoming``).
    Stops keeping lines as soon as the message cannot be accepted (bare CR
    or LF, a line too long, over ``max_size``: ``sink.drop()``) but keeps
    counting until the final dot, so the reply comes after the whole body,
    in step with the client.
    """

    def __init__(self, max_size, sink=None):
        self.max_size = max_size
        self.size = 0
        self.bare = self.too_long = False
        self.slow = False       # LineFramer.take_body found a line it must not take whole
        self.sink = sink if sink is not None else _InMemory()
        self._dropped = False

    def add(self, line):
        """Take one line; True when it is the final ``.``."""
        if line.data == b"." and not line.too_long:
            return True
        stuffed = line.data.startswith(b".")
        self.size += line.length - stuffed + 2
        self.bare = self.bare or line.bare
        self.too_long = self.too_long or line.too_long
        self._keep((line.data[1:] if stuffed else line.data) + CRLF)
        return False

    def add_block(self, block):
        """Take complete lines (CRLF-terminated, none bare, none too long, no
        final ``.``) in one go: as ``add`` would, line by line."""
        unstuffed = block.replace(b"\r\n.", b"\r\n")
        if unstuffed.startswith(b"."):
            unstuffed = unstuffed[1:]
        self.size += len(unstuffed)
        self._keep(unstuffed)

    def _keep(self, data):
        if self.fault is None:
            self.sink.write(data)
        elif not self._dropped:
            self._dropped = True
            self.sink.drop()

    @property
    def fault(self):
        """Why the message must be refused: bare_cr_lf, long_line, too_big or None."""
        if self.bare:
            return "bare_cr_lf"
        if self.too_long:
            return "long_line"
        if self.size > self.max_size:
            return "too_big"
        return None

    def message(self):
        """The body with CRLF line ends, as it will be stored (a sink in memory)."""
        return self.sink.message()
