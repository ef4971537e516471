"""``status`` reads the queue's kept counts (appliance.queue.counts), never
the queue itself: its cost does not grow with the queue."""

from types import SimpleNamespace

from twisted.internet import task

from appliance.admin.service import AdminState
from appliance.admin.suspend import Suspensions
from appliance.testing import make_config


class CountedSpool:
    def totals(self):
        return {"messages": 100000, "held": 7, "deferred": 99000, "oldest_age": 3600.0}

    def queue_ids(self):
        raise AssertionError("status walked the queue")

    def get(self, qid):
        raise AssertionError("status walked the queue")


def test_status_takes_the_queue_from_the_spools_counts(tmp_path):
    cfg = make_config(str(tmp_path), server={"data_dir": str(tmp_path)})
    app = SimpleNamespace(config=cfg, spool=CountedSpool(), listeners={},
                          suspensions=Suspensions(str(tmp_path / "suspended")))
    info = AdminState(app, task.Clock()).status()
    assert info["queue"] == {"messages": 100000, "held": 7, "deferred": 99000,
                             "oldest_age": 3600.0}
