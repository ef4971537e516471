"""The LDAP accounts backend against a real slapd (tests/ldap_server.py).

The blocking client runs in the test's thread (a synchronous ``run_in_thread``),
so every Deferred has fired when ``authenticate`` returns; the deadline logic
is tested separately with a Clock. Each slapd lives in a temp directory on
free loopback ports; tests that stop or freeze it get their own.
"""

import concurrent.futures
import subprocess
import time

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

import ldap_server
from appliance.testing import CountingRunner as Runner
from appliance.auth import ldap as ldap_backend
from appliance.auth.accounts import (Account, BackendUnavailable, BadCredentials,
                                     FileAccounts, IAccounts)
from appliance.auth.ldap import (LdapAccounts, LdapClient, LdapConfigError, LdapSettings,
                                 accounts_from_config, account_from_entry,
                                 read_bind_password, user_filter)
from appliance.threads import synchronous_runner
from appliance.threads import new_pool
from appliance.testing import capture_events, error_of, make_config, outcome
from appliance.testing import value_of as account_of

ALICE = "alice@example.test"
ALICE_PASSWORD = ldap_server.USERS["alice"][0]
ALIAS_FILTER = "(|(mail={address})(mailAlternateAddress={address}))"


# ---------------------------------------------------------------------------
# Fixtures and helpers



def config_for(server, tls="starttls", **auth):
    return make_config(base_dir=str(server.workdir), auth=server.auth_section(tls, **auth))


def client_for(server, tls="starttls", timeout=2.0, **auth):
    settings = LdapSettings.from_config(config_for(server, tls, **auth), timeout=timeout)
    return LdapClient(settings)


def accounts_for(server, tls="starttls", timeout=2.0, runner=None, **auth):
    runner = runner or Runner()
    return LdapAccounts(client_for(server, tls, timeout, **auth), runner)


def refused_with(d):
    """The exception class a Deferred failed with."""
    return type(error_of(d))


# ---------------------------------------------------------------------------
# Logins

def test_good_password_gives_the_account_with_its_aliases(slapd):
    accounts = accounts_for(slapd)
    account = account_of(accounts.authenticate(ALICE, ALICE_PASSWORD))
    assert isinstance(account, Account)
    assert account.address == ALICE
    # mail first, then mailAlternateAddress, canonical (domain lower-cased)
    assert account.addresses == (ALICE, "postmaster@example.test",
                                 "alice.smith@example.test")
    assert account.may_send_as("Postmaster@Example.Test")
    assert account.may_send_as("alice+lists@example.test")
    assert not account.may_send_as("bob@example.test")


def test_login_is_case_insensitive(slapd):
    account = account_of(accounts_for(slapd).authenticate("ALICE@Example.TEST",
                                                          ALICE_PASSWORD))
    assert account.address == ALICE


def test_non_ascii_password(slapd):
    password = slapd.password("carol")
    account = account_of(accounts_for(slapd).authenticate("carol@example.org", password))
    assert account.address == "carol@example.org"


def test_wrong_password_is_bad_credentials(slapd):
    accounts = accounts_for(slapd)
    assert refused_with(accounts.authenticate(ALICE, "not alice's")) is BadCredentials
    assert refused_with(accounts.authenticate(ALICE, ALICE_PASSWORD + " ")) is BadCredentials
    # another user's password opens nothing
    assert refused_with(accounts.authenticate(ALICE, slapd.password("bob"))) is BadCredentials


def test_unknown_user_is_bad_credentials(slapd):
    accounts = accounts_for(slapd)
    assert refused_with(accounts.authenticate("nobody@example.test", "x")) is BadCredentials
    assert refused_with(accounts.authenticate("not an address", "x")) is BadCredentials


def test_ambiguous_login_never_authenticates(slapd):
    # two entries carry twin@example.test: the right password still fails
    accounts = accounts_for(slapd)
    error = error_of(accounts.authenticate("twin@example.test", slapd.password("twin1")))
    assert isinstance(error, BadCredentials) and "ambiguous" in str(error)
    assert outcome(accounts.account("twin@example.test")) is None


def test_login_by_alias_when_the_filter_allows_it(slapd):
    accounts = accounts_for(slapd, ldap_user_filter=ALIAS_FILTER)
    account = account_of(accounts.authenticate("postmaster@example.test", ALICE_PASSWORD))
    assert account.address == ALICE             # the mailbox is the entry's mail
    assert "postmaster@example.test" in account.addresses


def test_only_configured_attributes_give_addresses(slapd):
    accounts = accounts_for(slapd, ldap_address_attributes="mail")
    account = account_of(accounts.authenticate(ALICE, ALICE_PASSWORD))
    assert account.addresses == (ALICE,)


def test_wrong_service_password_is_unavailable_not_bad_credentials(slapd, tmp_path):
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not the service password\n")
    accounts = accounts_for(slapd, ldap_bind_password_file=str(wrong))
    assert refused_with(accounts.authenticate(ALICE, ALICE_PASSWORD)) is BackendUnavailable


def test_missing_base_dn_is_unavailable(slapd):
    accounts = accounts_for(slapd, ldap_base_dn="ou=nowhere,dc=example,dc=test")
    error = error_of(accounts.authenticate(ALICE, ALICE_PASSWORD))
    assert isinstance(error, BackendUnavailable)
    assert "ldap_base_dn ou=nowhere,dc=example,dc=test does not exist" in str(error)


# ---------------------------------------------------------------------------
# The anonymous-bind trap

def test_the_server_would_accept_an_empty_password(slapd):
    """The fixture is as permissive as real servers can be: a DN with an
    empty password binds (as anonymous). So the refusals below matter."""
    done = subprocess.run(
        ["ldapwhoami", "-x", "-H", slapd.ldap_url, "-D", ldap_server.user_dn("alice"),
         "-w", ""], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "anonymous"


@pytest.mark.parametrize("password", ["", None])
def test_empty_password_refused_before_any_ldap_call(slapd, password):
    runner = Runner()
    accounts = accounts_for(slapd, runner=runner)
    assert refused_with(accounts.authenticate(ALICE, password)) is BadCredentials
    assert runner.count == 0


def test_password_that_saslprep_maps_to_nothing_is_refused(slapd):
    # U+00AD (soft hyphen) maps to nothing in SASLprep: it would be an empty bind
    client = client_for(slapd)
    assert client.check_password(ldap_server.user_dn("alice"), "\u00ad") is False
    assert client.check_password(ldap_server.user_dn("alice"), "") is False
    assert refused_with(accounts_for(slapd).authenticate(ALICE, "\u00ad\u200b")) \
        is BadCredentials


# ---------------------------------------------------------------------------
# Filter injection (RFC 4515 escaping)

def test_user_filter_escapes_every_special_character():
    assert user_filter("(mail={address})", "*)(mail=*") == r"(mail=\2a\29\28mail=\2a)"
    assert user_filter("(mail={address})", "a\\b\x00") == r"(mail=a\5cb\00)"
    assert user_filter(ALIAS_FILTER, "*") == \
        r"(|(mail=\2a)(mailAlternateAddress=\2a))"
    # format() is not used: other braces stay, attribute access is not evaluated
    assert user_filter("(&(x={y})(mail={address}))", "a@b") == "(&(x={y})(mail=a@b))"
    assert user_filter("(mail={address.__class__})", "a@b") == "(mail={address.__class__})"


@pytest.mark.parametrize("login", ["*)(mail=*", "*", "*)(|(mail=*", "alice@example.test)(uid=*"])
def test_injection_logins_never_authenticate(slapd, login):
    accounts = accounts_for(slapd)
    assert refused_with(accounts.authenticate(login, ALICE_PASSWORD)) is BadCredentials
    # and straight into the search, past the address check: nothing is found
    assert client_for(slapd).find(login) is None


def test_wildcard_in_an_address_matches_only_itself(slapd, monkeypatch):
    accounts = accounts_for(slapd)
    assert refused_with(accounts.authenticate("alic*@example.test", ALICE_PASSWORD)) \
        is BadCredentials
    assert refused_with(accounts.authenticate("*@example.test", ALICE_PASSWORD)) \
        is BadCredentials
    # the control: without escaping, the same login would open alice's account
    monkeypatch.setattr(ldap_backend, "escape_filter_chars", lambda value: value)
    account = account_of(accounts_for(slapd).authenticate("alic*@example.test",
                                                          ALICE_PASSWORD))
    assert account.address == ALICE


# ---------------------------------------------------------------------------
# Lookups without a password (OAuth2) and listing (admin shell)

def test_account_lookup(slapd):
    accounts = accounts_for(slapd)
    assert outcome(accounts.account("Bob@Example.Test")) == Account("bob@example.test")
    assert outcome(accounts.account(ALICE)).addresses[1] == "postmaster@example.test"
    assert outcome(accounts.account("nobody@example.test")) is None
    assert outcome(accounts.account("*")) is None


def test_list_accounts(slapd):
    accounts = accounts_for(slapd)
    listed = outcome(accounts.list_accounts())
    # nomail has no address; the twins share one address and show once
    assert [a.address for a in listed] == ["alice@example.test", "bob@example.test",
                                          "carol@example.org", "twin@example.test"]
    assert [a.address for a in outcome(accounts.list_accounts(limit=2))] == \
        ["alice@example.test", "bob@example.test"]


def test_list_accounts_pages_through_the_directory(slapd, monkeypatch):
    monkeypatch.setattr(ldap_backend, "PAGE_SIZE", 2)    # 6 entries: 3 pages
    accounts = accounts_for(slapd)
    assert len(outcome(accounts.list_accounts())) == 4
    assert len(outcome(accounts.list_accounts(limit=3))) == 3


def test_account_from_entry_skips_values_that_are_no_address():
    entry = {"dn": "uid=x", "attributes": {"mail": ["X@Example.TEST", "broken"],
                                           "mailAlternateAddress": [b"y@example.test",
                                                                    "x@example.test"]}}
    account = account_from_entry(entry, ("mail", "mailAlternateAddress"))
    assert account == Account("x@example.test", ("x@example.test", "y@example.test"))
    assert account_from_entry({"dn": "uid=y", "attributes": {"mail": []}}, ("mail",)) is None


# ---------------------------------------------------------------------------
# TLS

def test_ldaps_with_a_verified_certificate(slapd):
    account = account_of(accounts_for(slapd, tls="ldaps").authenticate(ALICE, ALICE_PASSWORD))
    assert account.address == ALICE


def test_starttls_is_really_used(slapd):
    """The fixture refuses simple binds without TLS: the same login over
    plain ldap:// fails, so the passing StartTLS tests did encrypt."""
    accounts = accounts_for(slapd, tls="none")
    assert refused_with(accounts.authenticate(ALICE, ALICE_PASSWORD)) is BackendUnavailable


@pytest.mark.parametrize("tls", ["starttls", "ldaps"])
def test_certificate_from_an_untrusted_ca_is_refused(tmp_path, tls):
    with ldap_server.SlapdServer(tmp_path / "rogue", trusted_cert=False) as server:
        accounts = accounts_for(server, tls=tls)
        error = error_of(accounts.authenticate(ALICE, ALICE_PASSWORD))
        assert isinstance(error, BackendUnavailable)
        assert "unable to get local issuer certificate" in str(error)
        assert refused_with(accounts.account(ALICE)) is BackendUnavailable
        # the control: trusting the CA that did sign it, the same login works
        trusting = accounts_for(server, tls=tls, ldap_ca_file=server.rogue_ca_file)
        assert account_of(trusting.authenticate(ALICE, ALICE_PASSWORD)).address == ALICE


@pytest.mark.parametrize("tls", ["starttls", "ldaps"])
def test_certificate_for_another_host_is_refused(tmp_path, tls):
    with ldap_server.SlapdServer(tmp_path / "other", cert_dns_names=("ldap.example.test",),
                                 cert_ips=()) as server:
        accounts = accounts_for(server, tls=tls)
        error = error_of(accounts.authenticate(ALICE, ALICE_PASSWORD))
        assert isinstance(error, BackendUnavailable)
        assert "IP address mismatch" in str(error)


@pytest.mark.parametrize("tls", ["starttls", "ldaps"])
def test_host_name_in_the_url_is_verified_against_the_certificate(slapd, tls):
    url = (slapd.ldaps_url if tls == "ldaps" else slapd.ldap_url).replace(
        "127.0.0.1", "localhost")
    accounts = accounts_for(slapd, tls=tls, ldap_url=url)
    assert account_of(accounts.authenticate(ALICE, ALICE_PASSWORD)).address == ALICE


# ---------------------------------------------------------------------------
# Outages

def test_directory_down_is_unavailable_and_recovers(own_slapd):
    accounts = accounts_for(own_slapd)
    assert account_of(accounts.authenticate(ALICE, ALICE_PASSWORD)).address == ALICE
    own_slapd.stop()
    with capture_events() as events:
        assert refused_with(accounts.authenticate(ALICE, ALICE_PASSWORD)) \
            is BackendUnavailable
        assert refused_with(accounts.authenticate(ALICE, "wrong")) is BackendUnavailable
        assert refused_with(accounts.account(ALICE)) is BackendUnavailable
        assert refused_with(accounts.list_accounts()) is BackendUnavailable
        own_slapd.start()           # same ports: the pooled connections are stale
        assert account_of(accounts.authenticate(ALICE, ALICE_PASSWORD)).address == ALICE
    down = events.named("ldap.unavailable")
    assert len(down) == 1                       # once per outage, not per login
    assert down[0]["url"] == own_slapd.ldap_url
    assert ALICE_PASSWORD not in str(events.records)
    assert len(events.named("ldap.recovered")) == 1


def test_directory_restart_is_invisible(own_slapd):
    accounts = accounts_for(own_slapd)
    assert account_of(accounts.authenticate(ALICE, ALICE_PASSWORD)).address == ALICE
    own_slapd.restart()
    # the pooled connections died with the old process: replaced transparently
    assert account_of(accounts.authenticate(ALICE, ALICE_PASSWORD)).address == ALICE
    assert refused_with(accounts.authenticate(ALICE, "wrong")) is BadCredentials


def test_hung_directory_answers_within_the_timeouts(own_slapd):
    accounts = accounts_for(own_slapd, timeout=0.5)
    assert account_of(accounts.authenticate(ALICE, ALICE_PASSWORD)).address == ALICE
    own_slapd.pause()
    try:
        started = time.monotonic()
        assert refused_with(accounts.authenticate(ALICE, ALICE_PASSWORD)) \
            is BackendUnavailable
        # a handful of socket timeouts, not a hang (generous bound for slow CI)
        assert time.monotonic() - started < 10
    finally:
        own_slapd.resume()
    assert account_of(accounts.authenticate(ALICE, ALICE_PASSWORD)).address == ALICE


def test_concurrent_logins_share_the_pools(slapd):
    client = client_for(slapd)
    logins = [(ALICE, ALICE_PASSWORD), ("bob@example.test", slapd.password("bob")),
              (ALICE, "wrong")] * 8

    def login(pair):
        try:
            return client.authenticate(*pair).address
        except BadCredentials:
            return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as executor:
        results = list(executor.map(login, logins))
    assert results == [ALICE, "bob@example.test", None] * 8
    client.close()


# ---------------------------------------------------------------------------
# The asynchronous face, without a directory

class FakeClient:
    settings = LdapSettings(host="127.0.0.1", port=389, use_ssl=False, starttls=True,
                            ca_file=None, bind_dn="", bind_password="", base_dn="o=x",
                            user_filter="(mail={address})", address_attributes=("mail",))

    def __init__(self, error=None):
        self.error = error

    def authenticate(self, address, password):
        if self.error is not None:
            raise self.error
        return Account(address)


def test_deadline_turns_a_hung_call_into_unavailable():
    clock = Clock()
    pending = []

    def never(f, *args):
        pending.append(defer.Deferred())
        return pending[-1]
    accounts = LdapAccounts(FakeClient(), never, clock=clock, deadline=15)
    d = accounts.authenticate(ALICE, "pw")
    clock.advance(14.9)
    assert not d.called
    with capture_events() as events:
        clock.advance(0.2)
    assert refused_with(d) is BackendUnavailable
    assert events.named("ldap.unavailable")[0]["error"] == "no answer within 15s"
    pending[0].callback(Account(ALICE))         # the thread's late answer is dropped
    assert not clock.getDelayedCalls()


def test_unexpected_error_is_unavailable_never_a_crash():
    accounts = LdapAccounts(FakeClient(error=RuntimeError("boom")), synchronous_runner)
    with capture_events():
        assert refused_with(accounts.authenticate(ALICE, "pw")) is BackendUnavailable


def test_provides_the_interface():
    assert IAccounts.providedBy(LdapAccounts(FakeClient(), synchronous_runner))


# ---------------------------------------------------------------------------
# Configuration

def test_bind_password_file(tmp_path):
    path = tmp_path / "pw"
    for text, expected in [("secret\n", "secret"), ("secret", "secret"),
                           ("secret\r\n", "secret"), (" spaced \n", " spaced ")]:
        path.write_text(text, newline="")
        assert read_bind_password(str(path)) == expected
    for text, why in [("one\ntwo\n", "one line"), ("\n", "empty"), ("", "empty")]:
        path.write_text(text)
        with pytest.raises(LdapConfigError, match=why):
            read_bind_password(str(path))
    with pytest.raises(LdapConfigError, match="ldap_bind_password_file: cannot read"):
        read_bind_password(str(tmp_path / "missing"))


def test_settings_from_config(slapd):
    settings = LdapSettings.from_config(config_for(slapd, "ldaps"))
    assert (settings.host, settings.port, settings.use_ssl, settings.starttls) == \
        ("127.0.0.1", slapd.ldaps_port, True, False)
    assert settings.bind_password == ldap_server.SERVICE_PASSWORD
    assert settings.address_attributes == ("mail", "mailAlternateAddress")
    defaults = LdapSettings.from_config(make_config(auth={
        "backend": "ldap", "ldap_url": "ldaps://ldap.example.test",
        "ldap_base_dn": "o=x"}))
    assert (defaults.port, defaults.ca_file, defaults.bind_dn) == (636, None, "")
    plain = LdapSettings.from_config(make_config(auth={
        "backend": "ldap", "ldap_url": "ldap://[::1]", "ldap_base_dn": "o=x"}))
    assert (plain.host, plain.port, plain.starttls, plain.url) == \
        ("::1", 389, True, "ldap://[::1]:389")


def test_accounts_from_config_picks_the_backend(slapd):
    cfg = make_config()
    accounts, service = accounts_from_config(cfg, users=object(), directory=object(),
                                             reactor=Clock())
    assert isinstance(accounts, FileAccounts) and service is None

    accounts, service = accounts_from_config(config_for(slapd), users=None, directory=None,
                                             reactor=Clock(), pool=new_pool("ldap", 4))
    assert isinstance(accounts, LdapAccounts) and accounts.url == slapd.ldap_url
    assert service.name == "pool-ldap"
    service.startService()
    try:
        assert service.pool.started
    finally:
        service.pool.stop()
