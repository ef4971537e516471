"""Structured events: one stable name per thing that happens.

Every protocol step calls ``emit(name, **fields)``. The event goes through
``twisted.logger`` like any log line; ``JsonEventFile`` writes the ones that
carry an event name to ``[log] events``, one JSON object a line. The auditor,
the admin shell's ``log tail`` and the tests all read that same stream.

``EVENTS`` is the catalogue: name -> (description, field names). ``emit``
refuses names that are not in it, so the catalogue (and docs/events.md, which a
test keeps in step with it) always lists every event the code can write.
"""

import json
import time

from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

NAMESPACE = "mailappliance"

_log = Logger(namespace=NAMESPACE)

EVENTS = {
    # server life
    "config.loaded": ("configuration read and validated", ("path", "domains", "hostname")),
    "listener.started": ("a listener is bound", ("name", "address")),
    "listener.failed": ("a listener could not be bound", ("name", "address", "error")),
    "server.started": ("all services started", ("version",)),
    "server.stopped": ("the server stopped", ()),
}


def register(name, description, fields):
    """Add an event to the catalogue (for modules that own their events)."""
    EVENTS[name] = (description, tuple(fields))


def emit(name, /, **fields):
    """Emit the structured event ``name`` with ``fields`` (JSON-able values)."""
    if name not in EVENTS:
        raise KeyError(f"unregistered event name {name!r}")
    # The text log (twistd.log / journal) shows "name key=value ..."; the JSON
    # file gets the fields themselves.
    text = " ".join(["{event}"] + [f"{key}={{{key}!r}}" for key in fields])
    _log.info(text, event=name, **fields)


def as_record(event):
    """The JSON-able record for a logger event dict, or None if not ours."""
    name = event.get("event")
    if name is None or event.get("log_namespace") != NAMESPACE:
        return None
    record = {"ts": round(event.get("log_time", time.time()), 6), "event": name}
    for key, value in event.items():
        if key.startswith("log_") or key in ("event", "ts"):
            continue
        record[key] = value
    return record


@implementer(ILogObserver)
class JsonEventFile:
    """Appends our events to a file, one JSON object a line.

    Writes go to the page cache (no fsync: the event log is not the ledger of
    acceptance; the spool is). The file is opened in append mode so logrotate's
    copytruncate and a reopen both work.
    """

    def __init__(self, path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8", buffering=1)

    def __call__(self, event):
        record = as_record(event)
        if record is None:
            return
        try:
            line = json.dumps(record, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            line = json.dumps({"ts": record["ts"], "event": record["event"],
                               "error": "unserialisable fields"})
        self._file.write(line + "\n")

    def reopen(self):
        self._file.close()
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)

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
        "This page is generated: `python -m appliance.events > docs/events.md`",
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


if __name__ == "__main__":
    # Importing the service tree imports every module that registers events.
    # Run as __main__, this file is a second copy: use the registered one.
    import appliance.tap  # noqa: F401
    from appliance import events as registered
    print(registered.catalogue_markdown(), end="")
