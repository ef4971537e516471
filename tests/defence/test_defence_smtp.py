"""The defences inside an SMTP session (StringTransport + task.Clock): the
gate's refusals, MAIL rates and RCPT greylisting as a pipeline stage, junk
commands, max_recipients with duplicates, the ban closing sessions."""

from twisted.internet.task import Clock

from appliance.defence.service import Defences
from appliance.defence.stages import DefenceStage
from appliance.net.gate import Gate
from appliance.receive.smtp import SMTPFactory
from appliance.testing import FakeDirectory, FakeSpool, SMTPHarness, make_config

USERS = {"alice@example.test": ["alice@example.test"]}
DOMAINS = ("example.test",)


def factory(**sections):
    clock = Clock()
    clock.advance(1_700_000_000)
    cfg = make_config(**sections)
    defences = Defences(cfg, clock)
    defences.load()
    directory = FakeDirectory(USERS, DOMAINS)
    smtp = SMTPFactory(cfg, directory, FakeSpool(), clock, gate=Gate(cfg.limits, defences))
    smtp.pipeline.stages.append(DefenceStage(defences))
    return smtp, defences, clock


def session(smtp, peer="192.0.2.10"):
    h = SMTPHarness(smtp, peer=peer)
    h.send("EHLO client.test\r\n")
    h.replies()
    return h


def test_a_banned_client_gets_421_at_connect_and_open_sessions_end():
    smtp, defences, _ = factory()
    open_one = session(smtp)
    defences.bans.ban("192.0.2.10", reason="test")
    assert open_one.replies() == ["421 4.7.0 Your address is blocked, closing connection"]
    assert open_one.closed
    open_one.lose()
    refused = SMTPHarness(smtp, peer="192.0.2.10")
    assert refused.replies() == ["421 4.7.0 Your address is blocked"] and refused.closed
    assert smtp.gate.connections == 0


def test_messages_per_hour_per_ip_is_451_at_mail():
    smtp, _, clock = factory(limits={"messages_per_hour_per_ip": "2"})
    h = session(smtp)
    for _ in range(2):
        h.send("MAIL FROM:<a@remote.test>\r\nRSET\r\n")
    h.send("MAIL FROM:<a@remote.test>\r\n")
    assert h.codes() == [250, 250, 250, 250, 451]
    other = session(smtp, peer="192.0.2.11")                  # another client: its own count
    other.send("MAIL FROM:<a@remote.test>\r\n")
    assert other.codes() == [250]
    clock.advance(3600 + 61)
    h = session(smtp)
    h.send("MAIL FROM:<a@remote.test>\r\n")
    assert h.codes() == [250]


def test_greylisting_comes_after_recipient_validation():
    smtp, _, clock = factory(checks={"greylist": "on", "greylist_delay": "1m"})
    h = session(smtp)
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<nobody@example.test>\r\n"
           "RCPT TO:<alice@example.test>\r\n")
    assert h.replies()[1:] == ["550 5.1.1 User unknown",
                               "451 4.7.1 Greylisted, please try again later"]
    clock.advance(60)
    h.send("RCPT TO:<alice@example.test>\r\n")
    assert h.codes() == [250]


def test_junk_commands_end_the_session_with_421():
    smtp, _, _ = factory(limits={"junk_commands": "3"})
    h = session(smtp)
    h.send("NOOP\r\nRSET\r\nHELP\r\nVRFY x\r\nNOOP\r\n")
    assert h.codes() == [250, 250, 214, 421]
    assert h.closed


def test_duplicate_rcpts_are_junk_and_count_towards_max_recipients():
    smtp, _, _ = factory(limits={"junk_commands": "2"}, server={"max_recipients": "5"})
    h = session(smtp)
    h.send("MAIL FROM:<a@remote.test>\r\n" + "RCPT TO:<alice@example.test>\r\n" * 4)
    assert h.codes() == [250, 250, 250, 250, 421]
    smtp, _, _ = factory(server={"max_recipients": "2"})
    h = session(smtp)
    h.send("MAIL FROM:<a@remote.test>\r\n" + "RCPT TO:<alice@example.test>\r\n" * 3)
    assert h.codes() == [250, 250, 250, 452]


def test_allowed_clients_have_no_junk_or_message_limit():
    smtp, _, _ = factory(limits={"junk_commands": "1", "messages_per_hour_per_ip": "1",
                                 "allow": "192.0.2.10"})
    h = session(smtp)
    h.send("NOOP\r\nNOOP\r\nNOOP\r\n" + "MAIL FROM:<a@remote.test>\r\nRSET\r\n" * 3)
    assert h.codes() == [250] * 9


def test_unknown_recipients_count_towards_max_errors():
    smtp, _, _ = factory(limits={"max_errors": "3"})
    h = session(smtp)
    h.send("MAIL FROM:<a@remote.test>\r\n" + "RCPT TO:<x@example.test>\r\n"
           "RCPT TO:<y@elsewhere.test>\r\nRCPT TO:<z@example.test>\r\n")
    assert h.codes() == [250, 550, 554, 550, 421]
