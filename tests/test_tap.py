"""The service tree: one gate for every listener, a named pool for each kind of work."""

from twisted.internet import reactor

from appliance import tap
from appliance.testing import make_config

LISTENERS = ("mx", "submission", "submissions", "submission_alt", "imap", "imaps", "pop3",
             "pop3s", "http", "https")


def tree(tmp_path, **sections):
    sections.setdefault("auth", {}).update(users_file=str(tmp_path / "users"))
    sections.setdefault("log", {}).update(events=str(tmp_path / "events.json"))
    listen = {name: f"127.0.0.1:{10000 + i}" for i, name in enumerate(LISTENERS)}
    return tap.build(make_config(base_dir=str(tmp_path), listen=listen, **sections), reactor)


class Peer:
    """What a gated factory uses of a session: its IP, and its events (a refusal's)."""

    def __init__(self, ip):
        self.peer_ip = ip
        self.events = []

    def emit(self, name, **fields):
        self.events.append(name)


def test_every_listener_shares_one_gate(tmp_path):
    app = tree(tmp_path).appliance
    assert sorted(app.listeners) == sorted(LISTENERS)
    assert all(factory.gate is app.gate for factory in app.listeners.values())


def test_connections_from_one_ip_are_counted_across_mx_imap_and_pop3(tmp_path):
    app = tree(tmp_path, limits={"connections_per_ip": "3"}).appliance
    mx, imap, pop3 = (app.listeners[name] for name in ("mx", "imap", "pop3"))
    client = Peer("192.0.2.7")
    assert mx.admit(client) is None and imap.admit(client) is None
    assert pop3.admit(client) is None
    assert app.gate.count("192.0.2.7") == 3
    assert (mx.connections, imap.connections, pop3.connections) == (1, 1, 1)
    # The fourth, on any port, is over connections_per_ip.
    assert imap.admit(client) is not None and app.gate.count("192.0.2.7") == 3
    assert client.events == ["imap.limit"]
    assert app.gate.count("192.0.2.8") == 0
    mx.release(client)
    assert app.gate.count("192.0.2.7") == 2 and pop3.admit(client) is None


def test_each_kind_of_blocking_work_has_its_own_named_pool(tmp_path):
    top = tree(tmp_path)
    names = {service.name for service in top}
    for pool in ("group-commit", "spool-read", "password-hash", "dns", "dkim-sign",
                 "inbound-checks", "maildir"):
        assert f"pool-{pool}" in names
    assert "pool-ldap" not in names          # only with [auth] backend = ldap
    # A pool outlives the services that use it: it is added before them.
    order = [service.name for service in top]
    assert order.index("pool-group-commit") < order.index("queue-runner") \
        < order.index("listener-mx")
    assert order.index("pool-maildir") < order.index("listener-imap")
    assert order.index("pool-password-hash") < order.index("listener-submission")
