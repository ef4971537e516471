"""Issue 17: ``postmaster`` always exists (RFC 5321 §4.5.1), so a bounce of
a bounce reaches a person; unknown recipients and relay refusals count as
errors (harvesting, relay probing); duplicates count towards max_recipients."""

import os

from appliance.deliver.maildir import MaildirDeliverer
from appliance.directory import Directory
from appliance.queue.bounce import Bouncer
from appliance.queue.runner import QueueRunner
from appliance.testing import FakeSpool, SMTPHarness, capture_events, make_config
from test_queue_manager import HOST, Env, dsn_fields

PW_HASH = "$2b$04$" + "a" * 53      # any well-formed bcrypt hash: no login here


def real_directory(tmp_path, users=("alice@example.test",), aliases=()):
    """The file-backed Directory of a config for example.test (primary) and
    example.org, with ``users`` and ``aliases`` ((address, targets) pairs)."""
    base = tmp_path / "conf"
    base.mkdir(parents=True, exist_ok=True)
    cfg = make_config(str(base), server={"data_dir": str(base / "var")})
    os.makedirs(cfg.server.data_dir, exist_ok=True)
    directory = Directory.from_config(cfg)
    for user in users:
        directory.users.add(user, PW_HASH)
    for address, targets in aliases:
        directory.aliases.add(address, targets)
    return cfg, directory


def test_postmaster_of_every_local_domain_resolves_without_an_account(tmp_path):
    _, directory = real_directory(tmp_path)
    assert directory.resolve("postmaster@example.test") == ["postmaster@example.test"]
    assert directory.resolve("PostMaster@Example.org") == ["postmaster@example.test"]
    assert directory.resolve("nobody@example.test") == []
    assert directory.resolve("postmaster@elsewhere.example") == ["postmaster@elsewhere.example"]


def test_postmaster_follows_the_primary_domains_alias(tmp_path):
    _, directory = real_directory(
        tmp_path, aliases=[("postmaster@example.test", ["alice@example.test"])])
    assert directory.resolve("postmaster@example.org") == ["alice@example.test"]
    _, directory = real_directory(
        tmp_path / "2", aliases=[("postmaster@example.org", ["bob@far.example"])])
    assert directory.resolve("postmaster@example.org") == ["bob@far.example"]


def test_rcpt_postmaster_is_accepted_without_an_account(tmp_path):
    """092f303: ``RCPT TO:<postmaster>`` (and postmaster@ any local domain)
    was ``550 5.1.1 User unknown`` unless someone had made the account."""
    cfg, directory = real_directory(tmp_path)
    h = SMTPHarness(config=cfg, directory=directory, spool=FakeSpool())
    h.send("EHLO client.test\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\n"
           "RCPT TO:<postmaster@example.org>\r\nRCPT TO:<nobody@example.test>\r\n"
           "DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert h.codes() == [220, 250, 250, 250, 250, 550, 354, 250]
    envelope, _ = h.factory.queue.accepted[0]
    assert envelope.recipients == ["postmaster@example.test", "postmaster@example.org"]


def test_a_double_bounce_reaches_the_postmaster_mailbox(tmp_path):
    """092f303, with no postmaster account (the default): the bounce of a
    bounce failed locally and was dropped; nobody ever saw it."""
    env = Env(tmp_path, users={})
    _, directory = real_directory(tmp_path)
    maildir = MaildirDeliverer(str(tmp_path / "mail"), env.writer, HOST)
    env.runner = QueueRunner(env.spool, directory, maildir, env.clock, settings=env.settings,
                             remote=env.remote)
    env.bouncer = env.runner.bouncer = Bouncer(env.runner, env.clock, HOST,
                                               "postmaster@example.test")
    env.start()
    with capture_events() as seen:
        env.accept(["a@remote.example"], sender="carol@far.example")
        env.remote.pending()[0].answer(550, "5.1.1 unknown")
        env.remote.pending()[0].answer(550, "5.1.1 carol is gone")    # the DSN bounces
    assert [e["kind"] for e in seen.named("bounce.sent")] == ["failed", "postmaster"]
    assert seen.named("bounce.dropped") == []
    [notice] = env.parsed("postmaster")
    assert notice["Subject"].startswith("Postmaster Copy")
    assert dsn_fields(notice)[1]["Final-Recipient"] == "rfc822; carol@far.example"
    [stored] = [e for e in seen.named("delivery.local")
                if e["recipient"] == "postmaster@example.test"]
    assert stored["mailbox"] == "postmaster@example.test"
    assert env.spool.queue_ids() == []


# -- RCPT refusals and max_recipients ------------------------------------------------------

def greeted(tmp_path, **sections):
    cfg = make_config(str(tmp_path), **sections)
    _, directory = real_directory(tmp_path)
    h = SMTPHarness(config=cfg, directory=directory, spool=FakeSpool())
    h.send("EHLO client.test\r\nMAIL FROM:<x@far.example>\r\n")
    assert h.codes() == [220, 250, 250]
    return h


def test_unknown_recipients_count_towards_max_errors(tmp_path):
    """092f303: 300 unknown-user RCPTs got 550 in 0.1 s and the session went on."""
    h = greeted(tmp_path, limits={"max_errors": "5"})
    with capture_events() as seen:
        h.send("".join(f"RCPT TO:<guess{i}@example.test>\r\n" for i in range(10)))
    assert h.replies() == ["550 5.1.1 User unknown"] * 5 + ["421 4.7.0 Too many errors"]
    assert h.closed
    assert len(seen.named("smtp.rcpt.rejected")) == 5      # what the auditor counts
    assert [e["kind"] for e in seen.named("smtp.limit")] == ["max_errors"]


def test_relay_refusals_count_towards_max_errors(tmp_path):
    h = greeted(tmp_path, limits={"max_errors": "3"})
    h.send("RCPT TO:<a@far.example>\r\nRCPT TO:<alice@example.test>\r\n"
           "RCPT TO:<b@far.example>\r\nRCPT TO:<c@far.example>\r\nRCPT TO:<d@far.example>\r\n")
    assert h.replies() == ["554 5.7.1 Relay access denied", "250 2.1.5 Recipient ok",
                           "554 5.7.1 Relay access denied", "554 5.7.1 Relay access denied",
                           "421 4.7.0 Too many errors"]
    assert h.closed


def test_duplicate_recipients_count_towards_max_recipients(tmp_path):
    """092f303 accepted the 101st RCPT when it repeated an earlier one (SPEC §4:
    every accepted RCPT counts, duplicates included)."""
    h = greeted(tmp_path, server={"max_recipients": "3"})
    h.send("RCPT TO:<alice@example.test>\r\n" * 3 + "RCPT TO:<Alice@example.test>\r\n"
           "RCPT TO:<postmaster@example.test>\r\nRSET\r\nMAIL FROM:<x@far.example>\r\n"
           "RCPT TO:<alice@example.test>\r\n")
    assert h.replies() == ["250 2.1.5 Recipient ok"] * 3 + [
        "452 4.5.3 Too many recipients", "452 4.5.3 Too many recipients",
        "250 2.0.0 Ok", "250 2.1.0 Sender ok", "250 2.1.5 Recipient ok"]


# -- forwarding aliases: no backscatter, no private address in a DSN ------------------------

def forwarded(tmp_path, spf=None):
    """A message from outside to fwd@ (-> bob and x@remote.example) whose
    forward to x@remote.example then fails with 550."""
    env = Env(tmp_path).start()
    envelope_params = {} if spf is None else {"spf": spf}
    from appliance.envelope import Envelope
    from test_queue_manager import MESSAGE
    out = []
    env.runner.accept(Envelope(queue_id="", sender="carol@far.example",
                              recipients=["fwd@example.test"], received_at=env.clock.seconds(),
                              listener="mx", size=len(MESSAGE), params=envelope_params),
                     MESSAGE).addBoth(out.append)
    [call] = env.remote.pending()
    assert call.recipients == ["x@remote.example"]
    return env, out[0], call


def test_a_failed_forward_is_not_bounced_to_a_sender_spf_did_not_confirm(tmp_path):
    """092f303 bounced it to the (likely forged) MAIL FROM: backscatter."""
    with capture_events() as seen:
        env, qid, call = forwarded(tmp_path, spf="softfail")
        call.answer(550, "5.1.1 <x@remote.example>: no such user")
    assert env.remote.pending() == []                # no DSN to carol@far.example
    [dropped] = seen.named("bounce.dropped")
    assert dropped["queue_id"] == qid and dropped["recipients"] == ["x@remote.example"]
    assert "SPF" in dropped["reason"]
    assert seen.named("bounce.sent") == [] and env.spool.queue_ids() == []


def test_a_failed_forward_bounces_to_a_confirmed_sender_without_the_private_address(tmp_path):
    """092f303's DSN named x@remote.example and quoted its server's reply."""
    env, qid, call = forwarded(tmp_path, spf="pass")
    call.answer(550, "5.1.1 <x@remote.example>: no such user")
    [dsn] = env.remote.pending()
    assert dsn.recipients == ["carol@far.example"] and dsn.envelope.sender == ""
    assert b"x@remote.example" not in dsn.message and b"mx.remote.example" not in dsn.message
    assert b"Final-Recipient: rfc822; fwd@example.test" in dsn.message
    assert b"5.1.1 delivery to a forwarding address failed" in dsn.message


def test_spf_result_of_mx_mail_is_kept_in_the_envelope():
    from appliance.policy.checks import Verdict
    from appliance.policy.spf_check import SPFResult

    class Checks:
        def applies(self, session):
            return True

        def check(self, facts, body, context):
            from twisted.internet import defer
            return defer.succeed(Verdict(body, spf=[SPFResult("helo", "c.test", "none"),
                                                    SPFResult("mailfrom", "far.example",
                                                              "fail")]))
    from appliance.testing import FakeDirectory
    h = SMTPHarness(config=make_config(), directory=FakeDirectory(["bob@example.test"]),
                    spool=FakeSpool())
    h.factory.checks = Checks()
    h.send("EHLO c.test\r\nMAIL FROM:<carol@far.example>\r\nRCPT TO:<bob@example.test>\r\n"
           "DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert h.codes()[-1] == 250
    [(envelope, _)] = h.factory.queue.accepted
    assert envelope.params["spf"] == "fail"
