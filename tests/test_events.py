"""The event stream: JSON lines, the catalogue, and the doc page kept in step."""

import json
import os

import pytest

import appliance.tap  # noqa: F401  (registers every event)
from appliance import events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_page_lists_every_registered_event():
    with open(os.path.join(ROOT, "docs", "events.md"), encoding="utf-8") as handle:
        page = handle.read()
    assert page == events.catalogue_markdown(), (
        "docs/events.md is stale: run `python -m appliance.eventsdoc > docs/events.md`")


def test_unregistered_name_is_refused():
    with pytest.raises(KeyError):
        events.emit("no.such.event", x=1)


def test_json_file_gets_one_object_a_line(tmp_path):
    path = tmp_path / "events.json"
    observer = events.JsonEventFile(str(path))
    events.add_observer(observer)
    try:
        events.emit("listener.started", name="mx", address="127.0.0.1:25")
        events.emit("server.stopped")
    finally:
        events.remove_observer(observer)
        observer.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["listener.started", "server.stopped"]
    assert records[0]["name"] == "mx" and records[0]["address"] == "127.0.0.1:25"
    assert all(isinstance(r["ts"], float) for r in records)
    assert not any(key.startswith("log_") for r in records for key in r)


def test_field_values_cannot_break_the_line(tmp_path):
    """A CR/LF in a field (say a HELO name) stays inside its JSON string."""
    path = tmp_path / "events.json"
    observer = events.JsonEventFile(str(path))
    events.add_observer(observer)
    try:
        events.emit("listener.failed", name="mx", address="x\r\n{\"event\":1}", error="e")
    finally:
        events.remove_observer(observer)
        observer.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["address"] == "x\r\n{\"event\":1}"


def test_only_notable_events_reach_the_text_log():
    from twisted.logger import globalLogPublisher
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        events.emit("server.started", version="x")
        events.emit("listener.failed", name="mx", address="a", error="e")
        events.register("test.quiet", "a chatty protocol step", ("n",))
        events.emit("test.quiet", n=1)
    finally:
        globalLogPublisher.removeObserver(seen.append)
        del events.EVENTS["test.quiet"]
    names = [e.get("event") for e in seen]
    assert names == ["server.started", "listener.failed"]
    from twisted.logger import formatEvent
    assert formatEvent(seen[1]) == "listener.failed name='mx' address='a' error='e'"


def test_the_running_server_writes_events_at_most_once_per_flush_interval(tmp_path):
    from twisted.internet import task

    from appliance.tap import EVENT_FLUSH_INTERVAL, EventLogService

    clock = task.Clock()
    clock.advance(100)
    path = tmp_path / "log" / "events.json"
    service = EventLogService(str(path), clock)
    service.privilegedStartService()
    service.startService()

    def lines():
        return len(path.read_text().splitlines())

    try:
        events.emit("server.stopped")
        assert lines() == 0 and len(clock.getDelayedCalls()) == 1
        clock.advance(0)                            # quiet before: written at once
        assert lines() == 1
        events.emit("server.stopped")
        events.emit("server.stopped")
        clock.advance(EVENT_FLUSH_INTERVAL / 2)     # busy: waits out the interval
        assert lines() == 1
        clock.advance(EVENT_FLUSH_INTERVAL / 2)
        assert lines() == 3 and clock.getDelayedCalls() == []
    finally:
        service.stopService()
