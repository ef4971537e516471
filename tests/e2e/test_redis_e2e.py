"""Two appliances (two twistd servers) sharing their defence state through one
real redis-server (SPEC §7): a ban on A refuses the client on B within a
second, a greylisted triplet retried on B passes, a user's hourly limit is
counted across both, and with Redis stopped both keep accepting mail, say so
(event and auditor alert), and share again once it is back.

Clients are bound to 127.0.0.x addresses other than 127.0.0.1 (which the
harness puts in ``allow``).
"""

import smtplib
import time

import pytest

from harness import wait_until
from test_defences_e2e import USER, PASSWORD, greeting, plain, submission_session

TIMEOUT = 10
LISTENERS = ("mx", "submission")


@pytest.fixture
def pair(mailserver_factory, redis_server):
    def make(limits=None, checks=None):
        overrides = {"state": {"backend": "redis", "redis_url": redis_server.url},
                     "limits": dict({"allow": "127.0.0.1"}, **(limits or {}))}
        if checks:
            overrides["checks"] = checks
        a = mailserver_factory(listeners=LISTENERS, overrides=overrides)
        b = mailserver_factory(listeners=LISTENERS, overrides=overrides)
        for server in (a, b):
            wait_until(lambda s=server: s.events("state.redis_up"), 10,
                       what="the shared state")
        return a, b
    return make


def mail_from(server, source, user=USER, sender=None):
    """One MAIL on submission from ``source`` after AUTH: its reply code."""
    with smtplib.SMTP(server.host, server.port("submission"), timeout=TIMEOUT,
                      source_address=(source, 0)) as client:
        client.starttls(context=server.tls_context())
        client.login(user, PASSWORD)
        return client.mail(sender or user)[0]


def send_mx(server, source, subject):
    with smtplib.SMTP(server.host, server.mx_port, timeout=TIMEOUT,
                      source_address=(source, 0)) as client:
        client.ehlo("sender.example.net")
        client.mail("news@sender.example.net")
        code = client.rcpt(USER)[0]
        if code == 250:
            client.data(f"Subject: {subject}\r\n\r\nhello\r\n".encode())
        return code


def test_a_ban_on_one_refuses_the_client_on_the_other_within_a_second(pair):
    a, b = pair(limits={"auth_failures_before_ban": "2"})
    source = "127.0.0.81"
    assert greeting(b, "mx", source).startswith(b"220 ")
    client = submission_session(a, source)
    client.send(f"AUTH PLAIN {plain('wrong 1')}")
    assert client.reply()[0].startswith(b"535")
    client.send(f"AUTH PLAIN {plain('wrong 2')}")
    assert client.reply()[0].startswith(b"535")
    banned_at = time.monotonic()
    assert client.reply()[0].startswith(b"421 4.7.0")
    client.close()
    wait_until(lambda: greeting(b, "mx", source).startswith(b"421 4.7.0"), 1.0,
               interval=0.02, what="B to refuse the client banned on A")
    assert time.monotonic() - banned_at < 1.0
    assert greeting(b, "submission", source).startswith(b"421 4.7.0")
    assert greeting(b, "mx", "127.0.0.82").startswith(b"220 ")      # a neighbour is not
    remote = wait_until(lambda: b.events("defence.ban.remote"), 5, what="the remote ban")
    assert remote[0]["network"] == "127.0.0.81/32"


def test_a_triplet_greylisted_on_one_passes_on_the_other(pair):
    a, b = pair(checks={"greylist": "on", "greylist_delay": "1s", "greylist_window": "1m"})
    source = "127.0.0.83"
    assert send_mx(a, source, "first") == 451
    time.sleep(1.1)
    assert send_mx(b, source, "retry on B") == 250
    b.wait_for_messages(USER, 1)
    assert send_mx(a, source, "known on A") == 250


def test_a_users_hourly_limit_is_counted_across_both(pair):
    a, b = pair(limits={"messages_per_hour_per_user": "3"})
    source = "127.0.0.84"
    codes = [mail_from(server, source) for server in (a, b, a)]
    assert codes == [250, 250, 250]
    time.sleep(0.2)
    assert mail_from(b, source) == 451
    assert mail_from(a, source) == 451


def test_redis_down_both_keep_accepting_then_share_again(pair, redis_server):
    a, b = pair(limits={"auth_failures_before_ban": "1"})
    redis_server.stop()
    # Mail keeps flowing on both, with nothing from Redis in the replies.
    for server, subject in ((a, "during outage A"), (b, "during outage B")):
        assert send_mx(server, "127.0.0.85", subject) == 250
        assert mail_from(server, "127.0.0.86") == 250
    for server in (a, b):
        down = wait_until(lambda s=server: s.events("state.redis_down"), 10,
                          what="state.redis_down")
        assert down[0]["retry_in"] == 1.0
        alerts = wait_until(lambda s=server: [e for e in s.events("audit.alert")
                                              if e["rule"] == "server_trouble"], 5,
                            what="the auditor's alert")
        assert "state.redis_down" in alerts[0]["detail"]
        server.wait_for_messages(USER, 1)
    status = a.cli("status")
    assert "warning: the shared defence state (redis://127.0.0.1:" in status.stdout
    # A ban placed on A while Redis is down holds on A only...
    client = submission_session(a, "127.0.0.87")
    client.send(f"AUTH PLAIN {plain('wrong')}")
    assert client.reply()[0].startswith(b"535")
    client.close()
    assert greeting(a, "mx", "127.0.0.87").startswith(b"421")
    assert greeting(b, "mx", "127.0.0.87").startswith(b"220")
    # ...and reaches B once Redis is back (reconnect with backoff: within 1+2+4+8 s).
    redis_server.start()
    for server in (a, b):
        wait_until(lambda s=server: len(s.events("state.redis_up")) >= 2, 20,
                   what="state.redis_up again")
    wait_until(lambda: greeting(b, "mx", "127.0.0.87").startswith(b"421"), 5,
               interval=0.1, what="the ban made during the outage to reach B")
    # And sharing is live again: a new ban on B is refused on A.
    client = submission_session(b, "127.0.0.88")
    client.send(f"AUTH PLAIN {plain('wrong')}")
    assert client.reply()[0].startswith(b"535")
    client.close()
    wait_until(lambda: greeting(a, "mx", "127.0.0.88").startswith(b"421"), 1.0,
               interval=0.02, what="A to refuse the client banned on B")


def test_an_unreadable_password_file_is_one_line_at_start(mailserver_factory, redis_server,
                                                          tmp_path):
    from harness import ServerError
    server = mailserver_factory(listeners=("mx",), start=False, overrides={"state": {
        "backend": "redis", "redis_url": redis_server.url,
        "redis_password_file": str(tmp_path / "missing")}})
    with pytest.raises(ServerError):
        server.start(timeout=10)
    output = server.output()
    assert f"mailappliance: [state] redis_password_file: cannot read {tmp_path / 'missing'}" \
        in output
    assert "Traceback" not in output
