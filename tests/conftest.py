"""What every test shares: the test helpers are importable by name.

``tests/`` holds the peers the tests start (``dns_server``, ``ldap_server``,
``dkim_tools``) and ``tests/e2e/`` the real-server harness (``harness``,
``postfix_peer``, ``postfix_mx``); unit tests live in folders that mirror
``appliance/``. ``ROOT`` is the checkout.
"""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

for _path in (TESTS, TESTS / "e2e"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
