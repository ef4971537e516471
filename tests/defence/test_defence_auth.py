"""AUTH failures per network, the ban they cause, message rates and junk commands."""

import itertools

from twisted.internet import task

from appliance import config
from appliance.defence import authfail
from appliance.auth.sasl import fingerprint
from appliance.defence.service import Defences

MINIMAL = "[server]\nhostname = mail.example.test\ndomains = example.test\n"


def make(limits=""):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    cfg = config.parse(MINIMAL + "[limits]\nallow = 127.0.0.1\n" + limits, base_dir="/srv")
    defences = Defences(cfg, clock)
    defences.load()
    return defences, clock


_guesses = itertools.count()


def fail(defences, ip, account="alice@example.test", password=None, n=1):
    """``n`` failures, each with another wrong password unless ``password``."""
    bans = []
    for _ in range(n):
        secret = password if password is not None else f"guess{next(_guesses)}"
        bans.append(defences.auth_failed(ip, account, fingerprint(account, secret)))
    return bans


def test_the_ban_comes_with_the_limit_th_failure_within_the_window(collected):
    defences, clock = make("auth_failures_before_ban = 5\nauth_failure_window = 15m")
    assert fail(defences, "192.0.2.5", n=4) == [None] * 4
    ban = fail(defences, "192.0.2.5")[0]
    assert ban is not None and ban.rule == "auth_failures_before_ban"
    assert defences.bans.is_banned("192.0.2.5") is not None
    limit = collected.named("defence.limit")[0]
    assert (limit["kind"], limit["key"], limit["count"]) == ("auth_failures", "192.0.2.5/32", 5)


def test_failures_older_than_the_window_do_not_count():
    defences, clock = make("auth_failures_before_ban = 3\nauth_failure_window = 10m")
    fail(defences, "192.0.2.5", n=2)
    clock.advance(11 * 60)
    assert fail(defences, "192.0.2.5", n=2) == [None, None]
    assert defences.bans.is_banned("192.0.2.5") is None


def test_the_same_wrong_password_counts_once():
    defences, _ = make("auth_failures_before_ban = 3")
    assert fail(defences, "192.0.2.5", password="stale", n=300) == [None] * 300
    assert defences.auth.failures("192.0.2.5") == 1
    assert defences.bans.is_banned("192.0.2.5") is None


def test_the_fingerprint_is_keyed_and_never_the_password():
    one = fingerprint("alice@example.test", "hunter2")
    assert one == fingerprint("ALICE@example.test", "hunter2")
    assert one != fingerprint("bob@example.test", "hunter2")
    assert "hunter2" not in one and len(one) == 64


def test_a_network_with_a_recent_login_on_that_account_weighs_half():
    defences, clock = make("auth_failures_before_ban = 4")
    defences.auth_succeeded("192.0.2.5", "alice@example.test")
    clock.advance(86400)
    assert fail(defences, "192.0.2.5", n=7) == [None] * 7      # 3.5 < 4
    assert fail(defences, "192.0.2.5")[0] is not None
    # a login more than 7 days ago does not help
    defences.auth_succeeded("192.0.2.6", "alice@example.test")
    clock.advance(8 * 86400)
    assert fail(defences, "192.0.2.6", n=4)[-1] is not None


def test_success_clears_one_account_s_failures_not_a_spray():
    defences, _ = make("auth_failures_before_ban = 3")
    fail(defences, "192.0.2.5", n=2)
    defences.auth_succeeded("192.0.2.5", "alice@example.test")
    assert defences.auth.failures("192.0.2.5") == 0
    fail(defences, "192.0.2.7", account="bob@example.test")
    fail(defences, "192.0.2.7", account="carol@example.test")
    defences.auth_succeeded("192.0.2.7", "bob@example.test")
    assert defences.auth.failures("192.0.2.7") == 2


def test_allowed_networks_are_never_counted_or_banned():
    defences, _ = make("auth_failures_before_ban = 1")
    assert fail(defences, "127.0.0.1", n=5) == [None] * 5
    assert fail(defences, "127.0.0.2")[0] is not None       # other loopback addresses count


def test_an_account_attacked_from_many_networks_is_an_event_never_a_lockout(collected):
    defences, _ = make("auth_failures_before_ban = 100")
    for n in range(authfail.ACCOUNT_ATTACK_NETWORKS + 5):
        fail(defences, f"198.51.100.{n}", account="ceo@example.test")
    alerts = collected.named("defence.account_attacked")
    assert len(alerts) == 1 and alerts[0]["account"] == "ceo@example.test"
    assert alerts[0]["networks"] == authfail.ACCOUNT_ATTACK_NETWORKS
    assert defences.bans.list() == []


def test_ipv6_failures_add_up_per_prefix():
    defences, _ = make("auth_failures_before_ban = 3\nipv6_prefix = 64")
    fail(defences, "2001:db8::1")
    fail(defences, "2001:db8::2")
    ban = fail(defences, "2001:db8::ffff:3")[0]
    assert ban.network == "2001:db8::/64"


# -- message rates --------------------------------------------------------------

def test_messages_per_hour_per_ip_and_per_user(collected):
    defences, clock = make("messages_per_hour_per_ip = 3\nmessages_per_hour_per_user = 2")
    assert [defences.mail_allowed("192.0.2.5") for _ in range(4)] == [True] * 3 + [False]
    assert defences.mail_allowed("192.0.2.6")
    assert [defences.mail_allowed("192.0.2.5", "u@example.test") for _ in range(3)] == \
        [True, True, False]
    assert defences.mail_allowed("192.0.2.99", "U@example.test") is False   # per user
    assert defences.mail_allowed("127.0.0.1", "u@example.test") is True     # allow wins
    kinds = [e["kind"] for e in collected.named("defence.limit")]
    assert kinds == ["messages_per_hour_per_ip", "messages_per_hour_per_user",
                     "messages_per_hour_per_user"]
    clock.advance(3600 + 61)
    assert defences.mail_allowed("192.0.2.5")


def test_junk_commands_over_the_limit(collected):
    defences, _ = make("junk_commands = 3")
    junk = defences.junk_counter("192.0.2.5/32")
    assert [junk.count() for _ in range(5)] == [False, False, False, True, True]
    assert len([e for e in collected.named("defence.limit")
                if e["kind"] == "junk_commands"]) == 1
