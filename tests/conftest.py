"""What every test shares: the test helpers are importable by name.

``tests/`` holds the peers the tests start (``dns_server``, ``ldap_server``,
``dkim_tools``) and ``tests/e2e/`` the real-server harness (``harness``,
``postfix_peer``, ``postfix_mx``); unit tests live in folders that mirror
``appliance/``. ``ROOT`` is the checkout.
"""

import sys
from pathlib import Path

import pytest

from appliance import events

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

for _path in (TESTS, TESTS / "e2e"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@pytest.fixture
def collected():
    """The structured events emitted during the test (an EventCollector)."""
    collector = events.EventCollector()
    events.add_observer(collector)
    yield collector
    events.remove_observer(collector)


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    """One OpenLDAP slapd on loopback, shared by a module's tests that leave it as it is."""
    import ldap_server
    with ldap_server.SlapdServer(tmp_path_factory.mktemp("slapd")) as server:
        yield server


@pytest.fixture
def own_slapd(tmp_path):
    """A slapd of the test's own (it may be stopped, restarted or frozen)."""
    import ldap_server
    with ldap_server.SlapdServer(tmp_path / "slapd") as server:
        yield server


@pytest.fixture(scope="module")
def dns(request):
    """A DNS server on loopback serving the module's ``ZONES``."""
    import dns_server
    with dns_server.DNSServer(request.module.ZONES) as server:
        yield server


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of the test's own on a loopback port (it may be stopped,
    restarted empty, or frozen); see tests/redis_server.py."""
    import redis_server as module
    with module.RedisServer(tmp_path / "redis") as server:
        yield server
