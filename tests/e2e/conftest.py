"""Fixtures that run the real server (twistd mailappliance) on loopback ports.

``mailserver``          a started server with one user, ``server.user`` /
                        ``server.password`` (alice@example.test); see harness.MailServer.
``mailserver_factory``  ``factory(listeners=..., overrides=..., users=..., start=True)``
                        for tests that need another config; every server made is
                        stopped at teardown.

At teardown the server's output is printed: pytest shows it for failing tests only.
"""


import pytest


from harness import MailServer

USER = "alice@example.test"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def mailserver_factory(tmp_path):
    servers = []

    def factory(listeners=None, overrides=None, users=((USER, PASSWORD),), start=True):
        kwargs = {"overrides": overrides}
        if listeners is not None:
            kwargs["listeners"] = listeners
        server = MailServer(tmp_path / f"server{len(servers)}", **kwargs)
        servers.append(server)
        for address, password in users:
            server.add_user(address, password)
        if users:
            server.user, server.password = users[0]
        if start:
            server.start()
        return server

    yield factory
    for server in servers:
        server.stop()
        print(f"--- output of the server in {server.workdir} ---")
        print(server.output()[-20000:])


@pytest.fixture
def mailserver(mailserver_factory):
    return mailserver_factory()
