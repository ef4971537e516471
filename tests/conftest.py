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
