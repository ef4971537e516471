"""Structured events: one stable name per thing that happens.

Every protocol step calls ``emit(name, **fields)``. The event is a
``twisted.logger`` event published on ``publisher``, a LogPublisher of its
own: ``JsonEventFile`` writes the stream to ``[log] events``, one JSON object a
line, and the auditor, the admin shell's ``log tail`` and the tests observe the
same publisher. Only events registered with ``text_log=True`` (start, stop,
failures an operator must see) are echoed to the global text log: formatting
every protocol step as text cost a third of the server's CPU under load.

``EVENTS`` is the catalogue: name -> (description, field names). ``emit``
refuses names that are not in it, so the catalogue (and docs/events.md, which a
test keeps in step with it) always lists every event the code can write.
"""

import json
import time

from twisted.logger import ILogObserver, LogLevel, LogPublisher, Logger, globalLogPublisher
from zope.interface import implementer

NAMESPACE = "mailappliance"
BUFFER_BYTES = 64 * 1024    # the event file's write buffer (flushed sooner by call_soon)

publisher = LogPublisher()
_log = Logger(namespace=NAMESPACE, observer=publisher)

# Names echoed to the global (text) log as "name key=value ...".
TEXT_LOG = {"config.loaded", "listener.started", "listener.failed", "server.started",
            "server.stopped"}

EVENTS = {
    # server life
    "config.loaded": ("configuration read and validated", ("path", "domains", "hostname")),
    "listener.started": ("a listener is bound", ("name", "address")),
    "listener.failed": ("a listener could not be bound", ("name", "address", "error")),
    "server.started": ("all services started", ("version",)),
    "server.stopped": ("the server stopped", ()),
}


def register(name, description, fields, text_log=False):
    """Add an event to the catalogue (for modules that own their events).

    ``text_log``: also show it in twistd's text log (rare, notable events).
    """
    EVENTS[name] = (description, tuple(fields))
    if text_log:
        TEXT_LOG.add(name)


def add_observer(observer):
    publisher.addObserver(observer)


def remove_observer(observer):
    publisher.removeObserver(observer)


def emit(name, /, **fields):
    """Emit the structured event ``name`` with ``fields`` (JSON-able values).

    The event dict is the one ``Logger.info("{event}", event=name, **fields)``
    would publish, built here directly: every protocol step emits, and the
    Logger's generic path (level validation, keyword merging) cost more than
    writing the event out.
    """
    if name not in EVENTS:
        raise KeyError(f"unregistered event name {name!r}")
    now = time.time()
    # The record (as_record's) is made here, once, from the caller's fields
    # alone: the event file and every observer that asks for it share it.
    record = {"ts": round(now, 6), "event": name}
    for key, value in fields.items():
        if key not in _NOT_FIELDS and not key.startswith("log_"):
            record[key] = value
    fields["event"] = name
    fields["log_logger"] = _log
    fields["log_level"] = LogLevel.info
    fields["log_namespace"] = NAMESPACE
    fields["log_source"] = None
    fields["log_format"] = "{event}"
    fields["log_time"] = now
    fields["log_record"] = record
    publisher(fields)


_NOT_FIELDS = ("event", "ts")


def _echo_to_text_log(event):
    """Pass notable events to the global log, formatted "name key=value ..."."""
    if event.get("event") in TEXT_LOG:
        fields = [key for key in event if not key.startswith("log_") and key != "event"]
        text = " ".join(["{event}"] + [f"{key}={{{key}!r}}" for key in fields])
        globalLogPublisher(dict(event, log_format=text))


publisher.addObserver(_echo_to_text_log)


def as_record(event):
    """The JSON-able record for a logger event dict, or None if not ours
    (a dict of the caller's own: it may keep or change it)."""
    record = _record_of(event)
    return None if record is None else dict(record)


def _record_of(event):
    """``as_record``'s answer, shared (``emit`` made it): to read only."""
    name = event.get("event")
    if name is None or event.get("log_namespace") != NAMESPACE:
        return None
    record = event.get("log_record")
    if record is not None:
        return record
    record = {"ts": round(event.get("log_time", time.time()), 6), "event": name}
    for key, value in event.items():
        if key.startswith("log_") or key in ("event", "ts"):
            continue
        record[key] = value
    return record


_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)   # made once, not per event


@implementer(ILogObserver)
class JsonEventFile:
    """Appends our events to a file, one JSON object a line.

    Writes are buffered: the first event after a flush schedules the next one
    (``call_soon``, e.g. ``lambda f: reactor.callLater(0.05, f)``), so a busy
    server makes one write call per flush interval, not one per event or per
    reactor turn (each write is a system call on the reactor thread, and a
    chance for the writer threads to take the GIL from it), and readers see
    each event within that interval. Without ``call_soon`` every event is
    flushed. Page cache only: no fsync, the event log is not the ledger of
    acceptance, the spool is. Append mode, so logrotate's copytruncate and a
    reopen both work.
    """

    def __init__(self, path, call_soon=None):
        self.path = path
        self.call_soon = call_soon
        self._flush_pending = False
        self._file = open(path, "a", encoding="utf-8", buffering=BUFFER_BYTES)

    def __call__(self, event):
        record = _record_of(event)
        if record is None:
            return
        try:
            line = _ENCODER.encode(record)
        except (TypeError, ValueError):
            line = json.dumps({"ts": record["ts"], "event": record["event"],
                               "error": "unserialisable fields"})
        self._file.write(line + "\n")
        if self.call_soon is None:
            self._file.flush()
        elif not self._flush_pending:
            self._flush_pending = True
            self.call_soon(self.flush)

    def flush(self):
        self._flush_pending = False
        if not self._file.closed:
            self._file.flush()

    def reopen(self):
        self._file.close()
        self._file = open(self.path, "a", encoding="utf-8", buffering=BUFFER_BYTES)

    def close(self):
        self._file.close()


def catalogue_markdown():
    """docs/events.md: every registered event with its description and fields."""
    lines = [
        "# Events",
        "",
        "Every line of `[log] events` is one JSON object with `ts` (Unix time, float),",
        "`event` (one of the names below) and the fields listed for it. The auditor, the",
        "admin shell's `log tail` and the tests read this stream. Names and fields are",
        "stable: add, never rename. Passwords and tokens never appear in any field.",
        "",
        "This page is generated: `python -m appliance.eventsdoc > docs/events.md`",
        "(a test fails when it is out of date).",
        "",
        "| event | what happened | fields |",
        "| --- | --- | --- |",
    ]
    for name in sorted(EVENTS):
        description, fields = EVENTS[name]
        shown = ", ".join(f"`{f}`" for f in fields) or "-"
        lines.append(f"| `{name}` | {description} | {shown} |")
    return "\n".join(lines) + "\n"


class EventCollector:
    """Test helper and in-memory tail: keeps the last ``size`` records."""

    def __init__(self, size=1000):
        self.size = size
        self.records = []

    def __call__(self, event):
        record = as_record(event)
        if record is not None:
            self.records.append(record)
            del self.records[: -self.size]

    def named(self, name):
        return [r for r in self.records if r["event"] == name]

