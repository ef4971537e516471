"""Fixtures that run the real server (twistd mailappliance) on loopback ports.

``mailserver``          a started server with one user, ``server.user`` /
                        ``server.password`` (alice@example.test); see harness.MailServer.
``mailserver_factory``  ``factory(listeners=..., overrides=..., users=..., start=True)``
                        for tests that need another config; every server made is
                        stopped at teardown.
``module_mailserver_factory``  the same, for servers that the tests of one module
                        share (tests that do not disturb each other: unique
                        markers, events read with ``server.events(since=...)``);
                        stopped when the module is done.

Users are written straight into the users file with a bcrypt hash of cost
``BCRYPT_COST`` (the unit tests' cost): the tests check what the server does with
a login, not what a full-cost hash costs (tests/test_users.py and test_cli.py cover
hashing and ``mailappliance user add``).

At teardown the server's output is printed: pytest shows it for failing tests only.
"""


import pytest


from harness import MailServer

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"
BCRYPT_COST = 4


def _servers_in(directory):
    """A server factory making servers under ``directory``, and its list of servers."""
    servers = []

    def factory(listeners=None, overrides=None, users=((USER, PASSWORD),), start=True):
        kwargs = {"overrides": overrides}
        if listeners is not None:
            kwargs["listeners"] = listeners
        server = MailServer(directory / f"server{len(servers)}", **kwargs)
        servers.append(server)
        for address, password in users:
            server.add_user(address, password, bcrypt_cost=BCRYPT_COST)
        if users:
            server.user, server.password = users[0]
        server.unused_users = list(users)
        if start:
            server.start()
        return server

    return factory, servers


def _stop_all(servers):
    for server in servers:
        server.stop()
        print(f"--- output of the server in {server.workdir} ---")
        print(server.output()[-20000:])


@pytest.fixture
def mailserver_factory(tmp_path):
    factory, servers = _servers_in(tmp_path)
    yield factory
    _stop_all(servers)


@pytest.fixture(scope="module")
def module_mailserver_factory(tmp_path_factory):
    factory, servers = _servers_in(tmp_path_factory.mktemp("shared"))
    yield factory
    _stop_all(servers)


@pytest.fixture
def mailserver(mailserver_factory):
    return mailserver_factory()


@pytest.fixture(scope="module")
def shared_server(module_mailserver_factory, request):
    """One server for the tests of a module (a server start is most of an
    end-to-end test's time): its ``LISTENERS`` and ``USERS`` (a mailbox per
    test, ``harness.mailboxes``)."""
    return module_mailserver_factory(listeners=request.module.LISTENERS,
                                     users=request.module.USERS)


@pytest.fixture
def server(shared_server):
    """The shared server for this test: ``server.user`` / ``server.password``
    a mailbox no other test touches, ``server.since`` when the test began."""
    return shared_server.for_next_test()
