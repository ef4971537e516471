"""``mailappliance audit LOGFILE... [--json]``: the rules over event logs, offline.

The files (plain or gzip, told apart by their first bytes) are replayed in
the order of their first event's time (so ``events.json*`` in shell order,
``events.json`` before ``events.json.1``, still replays oldest first), each
line through the same ``Engine`` and the same ``Settings`` the live auditor
builds from the config: the same events give the same findings.

Speed: a line's event name is read from its start (our writer puts ``ts``
and ``event`` first); lines of events no rule reads are skipped without a
JSON parse. A line in another shape is parsed whole; a line that is not a
JSON object is counted as unreadable and skipped (a log cut mid-line).
"""

import dataclasses
import datetime
import json
import re
import zlib

from appliance.audit.rules import Engine, Settings

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
_HEAD = re.compile(rb'\{"ts": (-?[0-9][0-9.eE+-]*), "event": "([^"\\]*)"')


class ReplayError(Exception):
    """A log file that cannot be read; the text names it (one line)."""


@dataclasses.dataclass
class Report:
    findings: list
    files: list
    lines: int = 0                  # non-empty lines read
    unreadable: int = 0             # lines that were not a JSON object with event and ts

    def to_json(self):
        return {"findings": [f.to_json() for f in self.findings], "files": self.files,
                "lines": self.lines, "unreadable": self.unreadable}


def _chunks_plain(handle):
    while True:
        block = handle.read(CHUNK)
        if not block:
            return
        yield block


def _chunks_gzip(handle):
    """Decompressed blocks of a gzip file (several members, as cat a.gz b.gz makes)."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    while True:
        block = handle.read(CHUNK)
        if not block:
            break
        data = inflate.decompress(block)
        while inflate.unused_data:
            rest = inflate.unused_data
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            data += inflate.decompress(rest)
        if data:
            yield data
    tail = inflate.flush()
    if tail:
        yield tail


def _blocks(path):
    """``path`` (gzip or plain) in blocks of whole lines (bytes ending in a newline,
    except perhaps the very last one)."""
    with open(path, "rb") as handle:
        gz = handle.read(2) == GZIP_MAGIC
        handle.seek(0)
        rest = b""
        for block in (_chunks_gzip(handle) if gz else _chunks_plain(handle)):
            data = rest + block if rest else block
            cut = data.rfind(b"\n") + 1
            rest = data[cut:]
            if cut:
                yield data[:cut]
        if rest:
            yield rest + b"\n"


def _lines(path):
    """The lines of ``path`` (bytes, no newline), gzip or plain."""
    for block in _blocks(path):
        lines = block.split(b"\n")
        lines.pop()
        yield from lines


def _first_ts(path):
    """The ``ts`` of the first readable line (for ordering the files), or None."""
    try:
        for line in _lines(path):
            record = _parse(line)
            if record is not None:
                return record["ts"]
    except (OSError, zlib.error, EOFError):
        return None
    return None


def _parse(line):
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if (isinstance(record, dict) and isinstance(record.get("event"), str)
            and isinstance(record.get("ts"), (int, float))):
        return record
    return None


def order(paths):
    """``paths`` oldest first (by their first event); unreadable ones keep their place last."""
    keyed = [(_first_ts(p), i, p) for i, p in enumerate(paths)]
    return [p for ts, i, p in sorted(keyed, key=lambda k: (k[0] is None,
                                                           k[0] or 0, k[1]))]


def _wanted_lines(names):
    """A regex finding, in a block with a newline put in front, the lines of
    events in ``names`` written in our writer's form."""
    alternatives = b"|".join(re.escape(n.encode("utf-8")) for n in sorted(names))
    return re.compile(rb'\n(\{"ts": -?[0-9][0-9.eE+-]*, "event": "(?:' + alternatives +
                      rb')"[^\n]*)')


# Records of these events whose line ends like this are of no rule's interest
# (an unauthenticated message: no account to count a send spike for).
_NOTHING_TO_COUNT = {b"smtp.message.accepted": b', "account": ""}'}


class _Replayer:
    def __init__(self, engine):
        self.engine = engine
        self.wanted = {name.encode("utf-8") for name in engine.events}
        self.find = _wanted_lines(engine.events).finditer
        self.lines = 0
        self.unreadable = 0

    def block(self, block):
        """Feed the records of one block of whole lines."""
        count = block.count(b"\n")
        ours = block.count(b'\n{"ts": ') + block.startswith(b'{"ts": ')
        if ours != count:
            return self._line_by_line(block)     # blank lines or another writer's form
        self.lines += count
        feed, skip = self.engine.feed, _NOTHING_TO_COUNT
        for match in self.find(b"\n" + block):
            line = match.group(1)
            name = line[line.index(b'"event": "') + 10:]
            name = name[:name.index(b'"')]
            if name in skip and line.endswith(skip[name]):
                continue
            self._take(line, feed)
        return None

    def _line_by_line(self, block):
        head, wanted, feed = _HEAD.match, self.wanted, self.engine.feed
        lines = block.split(b"\n")
        lines.pop()
        for line in lines:
            if not line or line.isspace():
                continue
            self.lines += 1
            match = head(line)
            if match is not None and match.group(2) not in wanted:
                continue
            self._take(line, feed)

    def _take(self, line, feed):
        record = _parse(line)
        if record is None:
            self.unreadable += 1
        else:
            feed(record)


def replay(paths, settings, sort=True):
    """Feed every file through a new Engine; the Report of its findings.
    A file that cannot be read is a ReplayError naming it."""
    findings = []
    replayer = _Replayer(Engine(settings, findings.append))
    paths = order(paths) if sort else list(paths)
    for path in paths:
        try:
            for block in _blocks(path):
                replayer.block(block)
        except OSError as exc:
            raise ReplayError(f"{path}: {exc.strerror or exc}") from None
        except (zlib.error, EOFError) as exc:
            raise ReplayError(f"{path}: not a readable gzip file ({exc})") from None
    return Report(findings, [str(p) for p in paths], replayer.lines, replayer.unreadable)


# -- output


def _when(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")


def _duration(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def table(report):
    """The findings as text lines (a header, one line each, a summary)."""
    rows = [("TIME (UTC)", "RULE", "NETWORK / ACCOUNT", "COUNT", "WINDOW", "ACTION", "DETAIL")]
    for f in report.findings:
        rows.append((_when(f.ts), f.rule, f.peer_ip or f.account or "-", str(f.count),
                     _duration(f.window), f.action, f.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    out = []
    for row in rows:
        cells = [row[i].rjust(widths[i]) if i == 3 else row[i].ljust(widths[i])
                 for i in range(6)]
        out.append("  ".join(cells + [row[6]]).rstrip())
    out.append(f"{len(report.findings)} finding(s) in {report.lines} event line(s) of "
               f"{len(report.files)} file(s)"
               + (f"; {report.unreadable} unreadable line(s) skipped"
                  if report.unreadable else ""))
    return out


def run(cfg, paths, as_json, out):
    """The CLI command's work: replay ``paths`` with ``cfg``'s rules; print
    with ``out(line)``. Returns the Report."""
    report = replay(paths, Settings.from_config(cfg))
    if as_json:
        out(json.dumps(report.to_json(), ensure_ascii=False))
    else:
        for line in table(report):
            out(line)
    return report
