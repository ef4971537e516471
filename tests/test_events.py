"""The event stream: JSON lines, the catalogue, and the doc page kept in step."""

import json
import os

import pytest
from twisted.logger import globalLogPublisher

import appliance.tap  # noqa: F401  (registers every event)
from appliance import events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_page_lists_every_registered_event():
    with open(os.path.join(ROOT, "docs", "events.md"), encoding="utf-8") as handle:
        page = handle.read()
    assert page == events.catalogue_markdown(), (
        "docs/events.md is stale: run `python -m appliance.events > docs/events.md`")


def test_unregistered_name_is_refused():
    with pytest.raises(KeyError):
        events.emit("no.such.event", x=1)


def test_json_file_gets_one_object_a_line(tmp_path):
    path = tmp_path / "events.json"
    observer = events.JsonEventFile(str(path))
    globalLogPublisher.addObserver(observer)
    try:
        events.emit("listener.started", name="mx", address="127.0.0.1:25")
        events.emit("server.stopped")
    finally:
        globalLogPublisher.removeObserver(observer)
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
    globalLogPublisher.addObserver(observer)
    try:
        events.emit("listener.failed", name="mx", address="x\r\n{\"event\":1}", error="e")
    finally:
        globalLogPublisher.removeObserver(observer)
        observer.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["address"] == "x\r\n{\"event\":1}"
