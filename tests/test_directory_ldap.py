"""LdapDirectory: recipients from a real slapd (tests/ldap_server.py), the
aliases file on top, the answer cache, and LDAP outages as temporary failures.

The blocking LDAP client runs in the test's thread (``synchronous_runner``),
so every Deferred has fired when a call returns, except where a test holds
the answers on purpose. Time is a ``Clock``.
"""

import json
import os
from types import SimpleNamespace

import pytest
from twisted.internet import defer, task

from appliance.testing import CountingRunner, clock_at
from appliance.auth.accounts import Account, BackendUnavailable
from appliance.auth.ldap import LdapConfigError
from appliance.deliver.maildir import MaildirDeliverer
from appliance.directory import (NEGATIVE_TTL, POSITIVE_TTL, AliasesFile, Directory,
                                 LdapDirectory, LookupCache, directory_from_config,
                                 recipient_accounts, recipient_filter)
from appliance.envelope import Envelope
from appliance.durable.commit import GroupCommitWriter
from appliance.threads import synchronous_runner
from appliance.queue.runner import QueueRunner
from appliance.envelope import DEFERRED, DELIVERED, FAILED
from appliance.queue.store import Spool
from appliance import replies
from appliance.policy.relay import MXPolicy
from appliance.threads import new_pool
from appliance.testing import FakeSpool, SMTPHarness, error_of, make_config, value_of

ALICE = "alice@example.test"
BOB = "bob@example.test"
MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


# ---------------------------------------------------------------------------
# Fixtures and helpers



def config_for(server, tmp_path, **auth):
    return make_config(base_dir=str(tmp_path), auth=server.auth_section("starttls", **auth),
                       server={"data_dir": str(tmp_path / "data")})


def ldap_directory(server, tmp_path, clock=None, runner=None, aliases=""):
    """An LdapDirectory on ``server``; ``aliases`` is the aliases file's text."""
    cfg = config_for(server, tmp_path)
    path = tmp_path / "aliases"
    path.write_text(aliases)
    accounts = recipient_accounts(cfg, runner or CountingRunner(), timeout=2.0)
    return LdapDirectory(cfg, AliasesFile(str(path)), accounts, clock or task.Clock())


def recipient(address):
    return SimpleNamespace(canonical=lambda: address)


# ---------------------------------------------------------------------------
# Recipients from the real directory

def test_recipient_filter_searches_every_address_attribute():
    assert recipient_filter("(mail={address})", ("mail", "mailAlternateAddress")) == (
        "(&(mail=*)(|(mail={address})(mailAlternateAddress={address})))")
    assert recipient_filter("(&(objectClass=inetOrgPerson)(mail={address}))", ("mail",)) == (
        "(&(&(objectClass=inetOrgPerson)(mail=*))(|(mail={address})))")


def test_primary_address_resolves_to_its_mailbox(slapd, tmp_path):
    directory = ldap_directory(slapd, tmp_path)
    assert value_of(directory.resolve("Alice@Example.TEST")) == [ALICE]
    assert value_of(directory.resolve(BOB)) == [BOB]
    assert value_of(directory.resolve("carol@example.org")) == ["carol@example.org"]
    assert value_of(directory.is_local_user(ALICE)) is True


def test_alternate_addresses_deliver_to_the_primary_mailbox(slapd, tmp_path):
    directory = ldap_directory(slapd, tmp_path)
    # mailAlternateAddress values, in any case: alice's mailbox
    assert value_of(directory.resolve("postmaster@example.test")) == [ALICE]
    assert value_of(directory.resolve("alice.smith@EXAMPLE.test")) == [ALICE]
    assert value_of(directory.is_local_user("Postmaster@example.test")) is True


def test_tags_resolve_like_the_file_backend(slapd, tmp_path):
    directory = ldap_directory(slapd, tmp_path)
    assert value_of(directory.resolve("alice+news@example.test")) == [ALICE]
    assert value_of(directory.resolve("postmaster+abuse@example.test")) == [ALICE]
    assert value_of(directory.is_local_user("bob+x@example.test")) is True
    assert value_of(directory.resolve("dave+x@example.test")) == []


def test_unknown_ambiguous_and_malformed_addresses_resolve_to_nothing(slapd, tmp_path):
    directory = ldap_directory(slapd, tmp_path)
    assert value_of(directory.resolve("dave@example.test")) == []
    assert value_of(directory.is_local_user("dave@example.test")) is False
    # two entries hold twin@: it opens neither mailbox (as it opens no login)
    assert value_of(directory.resolve("twin@example.test")) == []
    assert value_of(directory.resolve("garbage")) == []
    assert value_of(directory.is_local_user("<junk>")) is False


def test_filter_metacharacters_are_no_wildcards(slapd, tmp_path):
    directory = ldap_directory(slapd, tmp_path)
    for address in ("*@example.test", "alic*@example.test", "a*)(mail=*@example.test"):
        assert value_of(directory.resolve(address)) == [], address


def test_aliases_and_catch_all_apply_on_top(slapd, tmp_path):
    directory = ldap_directory(slapd, tmp_path, aliases=(
        "sales@example.test: postmaster@example.test, bob@example.test\n"
        "bob@example.test: alice@example.test\n"        # an alias wins over an account
        "@example.org: sales@example.test\n"
        "out@example.test: someone@remote.example\n"))
    assert value_of(directory.resolve("sales@example.test")) == [ALICE]
    assert value_of(directory.resolve(BOB)) == [ALICE]
    assert value_of(directory.resolve("carol@example.org")) == ["carol@example.org"]
    assert value_of(directory.resolve("anyone@example.org")) == [ALICE]
    assert value_of(directory.resolve("out@example.test")) == ["someone@remote.example"]
    assert value_of(directory.resolve("nobody@example.test")) == []     # no catch-all


def test_may_send_as_follows_aliases_to_the_account(slapd, tmp_path):
    directory = ldap_directory(slapd, tmp_path,
                               aliases="sales@example.test: postmaster@example.test\n"
                                       "@example.test: bob@example.test\n")
    assert value_of(directory.may_send_as(ALICE, "alice+x@example.test")) is True
    assert value_of(directory.may_send_as(ALICE, "postmaster@example.test")) is True
    assert value_of(directory.may_send_as(ALICE, "sales@example.test")) is True
    assert value_of(directory.may_send_as(BOB, "sales@example.test")) is False
    # the catch-all reaches bob but grants him nothing
    assert value_of(directory.may_send_as(BOB, "whoever@example.test")) is False


def test_mx_policy_accepts_ldap_users_and_refuses_unknowns(slapd, tmp_path):
    policy = MXPolicy(config_for(slapd, tmp_path), ldap_directory(slapd, tmp_path))
    session = SimpleNamespace(peer_ip="192.0.2.1")
    assert value_of(policy.check_recipient(session, recipient("postmaster@example.test"))) \
        is replies.RECIPIENT_OK
    assert value_of(policy.check_recipient(session, recipient("dave@example.test"))) \
        is replies.USER_UNKNOWN


def test_a_flood_of_rcpts_asks_ldap_once(slapd, tmp_path):
    runner = CountingRunner()
    directory = ldap_directory(slapd, tmp_path, runner=runner)
    cfg = config_for(slapd, tmp_path)
    harness = SMTPHarness(config=cfg, directory=directory, spool=FakeSpool())
    harness.replies()
    harness.send("EHLO client.example\r\nMAIL FROM:<x@remote.example>\r\n")
    harness.send("".join("RCPT TO:<postmaster@example.test>\r\n" for _ in range(20)))
    harness.send("".join("RCPT TO:<nobody@example.test>\r\n" for _ in range(20)))
    codes = harness.codes()
    # The 20th unknown recipient reaches max_errors (20): 421 and the end.
    assert codes[2:] == [250] * 20 + [550] * 20 + [421]
    assert runner.count == 2        # one search each; the rest came from the cache


# ---------------------------------------------------------------------------
# The directory down: temporary failures only

def test_ldap_down_is_a_temporary_failure_then_recovers(own_slapd, tmp_path):
    clock = task.Clock()
    directory = ldap_directory(own_slapd, tmp_path, clock=clock)
    assert value_of(directory.resolve(BOB)) == [BOB]
    own_slapd.stop()
    # bob is cached; alice is not, and nothing says she does not exist
    assert value_of(directory.resolve(BOB)) == [BOB]
    assert isinstance(error_of(directory.resolve(ALICE)), BackendUnavailable)
    assert isinstance(error_of(directory.is_local_user(ALICE)), BackendUnavailable)
    assert isinstance(error_of(directory.may_send_as(BOB, "sales@example.test")),
                      BackendUnavailable)

    own_slapd.start()                   # the same ports: the failure was not kept
    assert value_of(directory.resolve(ALICE)) == [ALICE]


def test_ldap_down_at_rcpt_is_451_never_550(own_slapd, tmp_path):
    directory = ldap_directory(own_slapd, tmp_path)
    own_slapd.stop()
    harness = SMTPHarness(config=config_for(own_slapd, tmp_path), directory=directory,
                          spool=FakeSpool())
    harness.replies()
    harness.send("EHLO client.example\r\nMAIL FROM:<x@remote.example>\r\n"
                 "RCPT TO:<alice@example.test>\r\nRCPT TO:<dave@example.test>\r\n")
    lines = harness.replies()
    assert [line[:9] for line in lines[-2:]] == ["451 4.3.0"] * 2


def test_hung_ldap_at_rcpt_is_451_after_the_deadline(tmp_path, slapd):
    """A directory that never answers: the deadline on the clock gives 451."""
    clock = task.Clock()
    held = []

    def never(f, *args):
        d = defer.Deferred()
        held.append(d)
        return d
    cfg = config_for(slapd, tmp_path)
    accounts = recipient_accounts(cfg, never, clock=clock, timeout=1.0)
    directory = LdapDirectory(cfg, AliasesFile(str(tmp_path / "aliases")), accounts, clock)
    harness = SMTPHarness(config=cfg, directory=directory, spool=FakeSpool(), clock=clock)
    harness.replies()
    harness.send("EHLO client.example\r\nMAIL FROM:<x@remote.example>\r\n"
                 "RCPT TO:<alice@example.test>\r\n")
    assert harness.codes() == [250, 250]        # RCPT still waiting
    clock.advance(3.0)                          # the deadline: 3 x timeout
    assert [line[:9] for line in harness.replies()] == ["451 4.3.0"]
    assert len(held) == 1


def _queue(tmp_path, directory, clock):
    writer = GroupCommitWriter(synchronous_runner)
    spool = Spool(str(tmp_path / "queue"), writer, synchronous_runner, clock)
    maildir = MaildirDeliverer(str(tmp_path / "mail"), writer, "mx.example.test")
    return spool, QueueRunner(spool, directory, maildir, clock)


def _mail_files(tmp_path, user):
    box = tmp_path / "mail" / "example.test" / user
    return [name for sub in ("new", "cur") if (box / sub).exists()
            for name in os.listdir(box / sub)]


def ldap_queue(server, tmp_path):
    """(clock, spool, runner): a queue delivering through the LDAP directory."""
    clock = clock_at(1000)
    directory = ldap_directory(server, tmp_path, clock=clock)
    spool, runner = _queue(tmp_path, directory, clock)
    return clock, spool, runner


def test_queue_delivers_alternates_to_the_primary_maildir(slapd, tmp_path):
    clock, spool, runner = ldap_queue(slapd, tmp_path)
    runner.startService()
    envelope = Envelope(queue_id="0005f1e2d3c4b5a6deadbee1", sender="x@remote.example",
                        recipients=["postmaster@example.test", "alice+tag@example.test",
                                    "dave@example.test"], received_at=990.0)
    runner.accept(envelope, MESSAGE)
    assert len(_mail_files(tmp_path, "alice")) == 1        # one copy for both
    state = json.loads((tmp_path / "queue" / "0005f1e2d3c4b5a6deadbee1.json").read_text())
    states = {r: s["state"] for r, s in state["recipients"].items()}
    assert states == {"postmaster@example.test": DELIVERED,
                      "alice+tag@example.test": DELIVERED, "dave@example.test": FAILED}


def test_ldap_down_at_delivery_defers_and_retries_never_bounces(own_slapd, tmp_path):
    clock, spool, runner = ldap_queue(own_slapd, tmp_path)
    own_slapd.stop()
    runner.startService()
    qid = "0005f1e2d3c4b5a6deadbee2"
    runner.accept(Envelope(queue_id=qid, sender="x@remote.example",
                           recipients=["postmaster@example.test"], received_at=990.0), MESSAGE)
    [state] = spool.get(qid).recipients.values()
    assert state["state"] == DEFERRED and state["next_attempt"] is not None
    assert "directory lookup failed" in state["last_error"]
    assert _mail_files(tmp_path, "alice") == []

    own_slapd.start()
    clock.advance(state["next_attempt"] - clock.seconds())
    assert len(_mail_files(tmp_path, "alice")) == 1
    assert spool.get(qid) is None                          # delivered, removed
    runner.stopService()


# ---------------------------------------------------------------------------
# The cache

class Lookups:
    """``account(address)``: answers from ``mailboxes`` (address -> primary),
    or held until ``release``; ``error`` fails every call."""

    def __init__(self, mailboxes, hold=False):
        self.mailboxes = mailboxes
        self.hold = hold
        self.error = None
        self.asked = []
        self.held = []

    def account(self, address):
        self.asked.append(address)
        if self.error is not None:
            return defer.fail(self.error)
        primary = self.mailboxes.get(address)
        answer = None if primary is None else Account(primary, (primary, address))
        if self.hold:
            d = defer.Deferred()
            self.held.append((d, answer))
            return d
        return defer.succeed(answer)

    def release(self):
        held, self.held = self.held, []
        for d, answer in held:
            d.callback(answer)


def fake_directory(lookups, clock, **cache):
    cfg = make_config()
    return LdapDirectory(cfg, AliasesFile("/nonexistent/aliases"), lookups, clock, **cache)


def test_found_answers_are_kept_for_a_minute():
    clock, lookups = task.Clock(), Lookups({"alias@example.test": ALICE})
    directory = fake_directory(lookups, clock)
    for _ in range(3):
        assert value_of(directory.resolve("alias@example.test")) == [ALICE]
    clock.advance(POSITIVE_TTL - 0.5)
    assert value_of(directory.resolve("alias@example.test")) == [ALICE]
    assert lookups.asked == ["alias@example.test"]
    clock.advance(0.5)
    assert value_of(directory.resolve("alias@example.test")) == [ALICE]
    assert lookups.asked == ["alias@example.test"] * 2


def test_misses_are_kept_for_ten_seconds_then_asked_again():
    clock, lookups = task.Clock(), Lookups({})
    directory = fake_directory(lookups, clock)
    assert value_of(directory.is_local_user("new@example.test")) is False
    lookups.mailboxes["new@example.test"] = "new@example.test"     # added in LDAP
    clock.advance(NEGATIVE_TTL - 0.5)
    assert value_of(directory.is_local_user("new@example.test")) is False
    clock.advance(0.5)
    assert value_of(directory.is_local_user("new@example.test")) is True
    assert lookups.asked == ["new@example.test"] * 2


def test_failures_are_not_kept():
    clock, lookups = task.Clock(), Lookups({ALICE: ALICE})
    directory = fake_directory(lookups, clock)
    lookups.error = BackendUnavailable("down")
    assert isinstance(error_of(directory.resolve(ALICE)), BackendUnavailable)
    lookups.error = None
    assert value_of(directory.resolve(ALICE)) == [ALICE]
    assert lookups.asked == [ALICE, ALICE]


def test_concurrent_lookups_share_one_search_and_a_cancelled_one_is_skipped():
    clock, lookups = task.Clock(), Lookups({ALICE: ALICE}, hold=True)
    directory = fake_directory(lookups, clock)
    waiting = [directory.resolve(ALICE) for _ in range(5)]
    waiting[0].cancel()                 # e.g. the client went away
    assert lookups.asked == [ALICE]
    lookups.release()
    assert isinstance(error_of(waiting[0]), defer.CancelledError)
    assert [value_of(d) for d in waiting[1:]] == [[ALICE]] * 4


def test_the_cache_stays_bounded():
    clock, lookups = task.Clock(), Lookups({})
    cache = LookupCache(lookups.account, clock, max_entries=3)
    for n in range(10):
        value_of(cache.get(f"user{n}@example.test"))
    assert len(cache) == 3
    value_of(cache.get("user9@example.test"))           # the newest are kept
    assert lookups.asked.count("user9@example.test") == 1


# ---------------------------------------------------------------------------
# Choosing the directory

def test_directory_from_config_picks_the_backend(slapd, tmp_path):
    aliases = AliasesFile(str(tmp_path / "aliases"))
    file_cfg = make_config(base_dir=str(tmp_path))
    directory, service = directory_from_config(file_cfg, object(), aliases, task.Clock())
    assert type(directory) is Directory and service is None

    directory, service = directory_from_config(config_for(slapd, tmp_path), None, aliases,
                                               task.Clock(), pool=new_pool("ldap-directory", 4))
    assert isinstance(directory, LdapDirectory) and directory.aliases is aliases
    assert service.name == "pool-ldap-directory"


def test_directory_from_config_reports_unusable_ldap_settings(slapd, tmp_path):
    cfg = config_for(slapd, tmp_path, ldap_bind_password_file=str(tmp_path / "missing"))
    with pytest.raises(LdapConfigError, match="ldap_bind_password_file"):
        directory_from_config(cfg, None, AliasesFile(str(tmp_path / "aliases")), task.Clock(),
                              pool=new_pool("ldap-directory", 4))
