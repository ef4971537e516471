"""SASL mechanisms and the account store, without any protocol around them."""

import base64

import bcrypt
import pytest
from twisted.cred import credentials, error
from twisted.internet import defer

from appliance.auth.accounts import (
    AccountsChecker, BackendUnavailable, BadCredentials, FileAccounts, IAccounts)
from appliance.auth.oauth2 import InvalidToken
from appliance.auth.sasl import (
    Aborted, Challenge, Malformed, Mechanisms, decode_response, encode_challenge)
from appliance.auth.users import UsersFile
from appliance.directory import AliasesFile, Directory
from appliance.testing import FakeAccounts as _FakeAccounts, make_config
from appliance.testing import value_of as result_of


def FakeAccounts(**kwargs):
    return _FakeAccounts({"alice@example.test": "secret"}, **kwargs)


def sync(f, *args):
    return defer.maybeDeferred(f, *args)


class FakeVerifier:
    """``verify(token) -> email``: tokens are 'ok:<email>' or anything else (bad)."""

    def verify(self, token):
        if token.startswith("ok:"):
            return token[3:]
        raise InvalidToken("bad signature")


# -- base64 responses --------------------------------------------------------

@pytest.mark.parametrize("line,expected", [
    (b"YWxpY2U=", b"alice"), (b"=", b""), (b"", b""), (b"AGFsaWNlAHB3", b"\0alice\0pw"),
])
def test_decode_accepts_canonical_base64(line, expected):
    assert decode_response(line) == expected


@pytest.mark.parametrize("line", [
    b"YWxpY2U=junk",        # trailing junk: stock Twisted decodes it anyway (T5)
    b"YWxpY2U", b"YWxp Y2U=", b"YW!pY2U=", b"====", b"YQ==YQ==", b"\xff\xfe",
])
def test_decode_refuses_anything_else(line):
    with pytest.raises(Malformed):
        decode_response(line)


def test_star_aborts():
    with pytest.raises(Aborted):
        decode_response(b"*")


def test_challenges_are_base64():
    assert encode_challenge(b"Username:") == b"VXNlcm5hbWU6"


# -- PLAIN -----------------------------------------------------------------------

def plain(*fields):
    return b"\0".join(f.encode() for f in fields)


def test_plain_with_initial_response():
    accounts = FakeAccounts()
    mech = Mechanisms(accounts).create("plain")
    account = result_of(mech.step(plain("", "alice@example.test", "secret")))
    assert account.address == "alice@example.test"
    assert mech.identity == "alice@example.test"


def test_plain_without_initial_response_asks_with_an_empty_challenge():
    mech = Mechanisms(FakeAccounts()).create("PLAIN")
    challenge = result_of(mech.step(None))
    assert isinstance(challenge, Challenge) and challenge.data == b""
    assert result_of(mech.step(plain("", "alice@example.test", "secret"))).address


def test_plain_authzid_equal_to_the_user_is_fine():
    mech = Mechanisms(FakeAccounts()).create("PLAIN")
    assert result_of(mech.step(plain("Alice@Example.Test", "alice@example.test", "secret")))


@pytest.mark.parametrize("fields, why", [
    # T5: stock Twisted drops the authzid and logs in as alice.
    (("root@example.test", "alice@example.test", "secret"), "authorization identity"),
    (("", "alice@example.test", ""), "empty password"),
], ids=["authzid-of-another-user", "empty-password"])
def test_plain_refused_without_a_lookup(fields, why):
    accounts = FakeAccounts()
    mech = Mechanisms(accounts).create("PLAIN")
    with pytest.raises(BadCredentials, match=why):
        result_of(mech.step(plain(*fields)))
    assert accounts.calls == []


@pytest.mark.parametrize("response", [
    b"alice\0secret",                  # T6: two fields crash stock Twisted
    b"a\0b\0c\0d", b"no nul at all", b"\0\0secret",
    b"\0alice@example.test\0\xff\xfe",  # not UTF-8
])
def test_plain_malformed(response):
    mech = Mechanisms(FakeAccounts()).create("PLAIN")
    with pytest.raises(Malformed):
        result_of(mech.step(response))


def test_plain_wrong_password_and_unknown_user():
    for fields in (("", "alice@example.test", "wrong"), ("", "nobody@example.test", "x")):
        mech = Mechanisms(FakeAccounts()).create("PLAIN")
        with pytest.raises(BadCredentials):
            result_of(mech.step(plain(*fields)))


def test_backend_unavailable_passes_through():
    mech = Mechanisms(FakeAccounts(error=BackendUnavailable("ldap down"))).create("PLAIN")
    with pytest.raises(BackendUnavailable):
        result_of(mech.step(plain("", "alice@example.test", "secret")))


def test_a_finished_exchange_takes_no_more_steps():
    mech = Mechanisms(FakeAccounts()).create("PLAIN")
    result_of(mech.step(plain("", "alice@example.test", "secret")))
    with pytest.raises(Malformed):
        result_of(mech.step(b"again"))


# -- LOGIN -----------------------------------------------------------------------

def test_login_asks_for_user_then_password():
    mech = Mechanisms(FakeAccounts()).create("LOGIN")
    assert result_of(mech.step(None)).data == b"Username:"
    assert result_of(mech.step(b"alice@example.test")).data == b"Password:"
    assert result_of(mech.step(b"secret")).address == "alice@example.test"


def test_login_with_the_user_as_initial_response():
    mech = Mechanisms(FakeAccounts()).create("LOGIN")
    assert result_of(mech.step(b"alice@example.test")).data == b"Password:"
    with pytest.raises(BadCredentials):
        result_of(mech.step(b"wrong"))


def test_login_empty_user_is_malformed():
    mech = Mechanisms(FakeAccounts()).create("LOGIN")
    result_of(mech.step(None))
    with pytest.raises(Malformed):
        result_of(mech.step(b""))


# -- XOAUTH2 and OAUTHBEARER ------------------------------------------------------

def xoauth2(user, token):
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def oauthbearer(user, token, gs2=None):
    header = gs2 if gs2 is not None else (f"n,a={user}," if user else "n,,")
    pairs = f"host=mail.example.test\x01port=587\x01auth=Bearer {token}\x01\x01"
    return f"{header}\x01{pairs}".encode()


def test_oauth_offered_only_with_a_verifier():
    assert Mechanisms(FakeAccounts()).names() == ["PLAIN", "LOGIN"]
    assert Mechanisms(FakeAccounts()).create("XOAUTH2") is None
    assert Mechanisms(FakeAccounts(), FakeVerifier()).names() == [
        "PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"]


@pytest.mark.parametrize("name,make", [("XOAUTH2", xoauth2), ("OAUTHBEARER", oauthbearer)])
def test_oauth_good_token(name, make):
    accounts = FakeAccounts()
    mech = Mechanisms(accounts, FakeVerifier()).create(name)
    account = result_of(mech.step(make("alice@example.test", "ok:alice@example.test")))
    assert account.address == "alice@example.test"
    assert accounts.calls == [("account", "alice@example.test")]


def test_oauthbearer_without_authzid_uses_the_token_email():
    mech = Mechanisms(FakeAccounts(), FakeVerifier()).create("OAUTHBEARER")
    assert result_of(mech.step(oauthbearer("", "ok:alice@example.test"))).address


@pytest.mark.parametrize("name,make,status", [
    ("XOAUTH2", xoauth2, "401"), ("OAUTHBEARER", oauthbearer, "invalid_token")])
def test_oauth_bad_token_sends_the_json_error_then_fails(name, make, status):
    mech = Mechanisms(FakeAccounts(), FakeVerifier()).create(name)
    challenge = result_of(mech.step(make("alice@example.test", "forged")))
    assert challenge.data == (b'{"status":"' + status.encode()
                              + b'","schemes":"bearer","scope":"email"}')
    with pytest.raises(BadCredentials, match="bad signature"):
        result_of(mech.step(b"\x01" if name == "OAUTHBEARER" else b""))


def test_oauth_user_must_match_the_token():
    mech = Mechanisms(FakeAccounts(), FakeVerifier()).create("XOAUTH2")
    result_of(mech.step(xoauth2("mallory@example.test", "ok:alice@example.test")))
    with pytest.raises(BadCredentials, match="does not match"):
        result_of(mech.step(b""))


def test_oauth_token_for_an_unknown_account():
    mech = Mechanisms(FakeAccounts(), FakeVerifier()).create("OAUTHBEARER")
    with pytest.raises(BadCredentials, match="no account"):
        result_of(mech.step(oauthbearer("", "ok:ghost@example.test")))


@pytest.mark.parametrize("name,response", [
    ("XOAUTH2", b"user=alice@example.test\x01auth=Bearer t\x01"),       # no ^A^A
    ("XOAUTH2", b"auth=Bearer t\x01\x01"),                               # no user=
    ("XOAUTH2", b"user=alice@example.test\x01auth=Basic t\x01\x01"),
    ("OAUTHBEARER", b"p=tls-unique,,\x01auth=Bearer t\x01\x01"),         # channel binding
    ("OAUTHBEARER", b"n,a=alice@example.test\x01auth=Bearer t\x01\x01"),  # GS2 unterminated
    ("OAUTHBEARER", b"n,a=a=4@example.test,\x01auth=Bearer t\x01\x01"),   # bad escape
    ("OAUTHBEARER", b"n,,\x01\x01"),                                      # no auth at all
])
def test_oauth_malformed(name, response):
    mech = Mechanisms(FakeAccounts(), FakeVerifier()).create(name)
    with pytest.raises(Malformed):
        result_of(mech.step(response))


# -- the file backend --------------------------------------------------------------

@pytest.fixture
def file_accounts(tmp_path):
    cfg = make_config(base_dir=str(tmp_path), server={"data_dir": str(tmp_path)})
    users = UsersFile(str(tmp_path / "users"), run_in_thread=sync)
    # Cost-4 bcrypt: these tests check the mechanisms, not the hash's cost.
    users.add("alice@example.test", bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode())
    users.add("bob@example.test", bcrypt.hashpw(b"bobs", bcrypt.gensalt(4)).decode())
    aliases = AliasesFile(str(tmp_path / "aliases"))
    aliases.add("postmaster@example.test", ["alice@example.test"])
    aliases.add("team@example.test", ["alice@example.test", "bob@example.test"])
    aliases.add("@example.org", ["alice@example.test"])       # catch-all: not a sender
    aliases.add("fwd@example.test", ["someone@elsewhere.test"])
    return FileAccounts(users, Directory(cfg, users, aliases))


def test_file_accounts_provide_the_interface(file_accounts):
    assert IAccounts.providedBy(file_accounts)


def test_file_authenticate_gives_own_address_and_aliases(file_accounts):
    account = result_of(file_accounts.authenticate("Alice@Example.TEST", "secret"))
    assert account.address == "alice@example.test"
    assert account.addresses == ("alice@example.test", "postmaster@example.test",
                                 "team@example.test")
    assert account.may_send_as("ALICE+lists@example.test")
    assert account.may_send_as("postmaster@example.test")
    assert not account.may_send_as("someone@example.org")     # catch-all
    assert not account.may_send_as("bob@example.test")
    assert not account.may_send_as("not an address")


@pytest.mark.parametrize("address,password", [
    ("alice@example.test", "wrong"), ("nobody@example.test", "secret"),
    ("alice@example.test", ""), ("not-an-address", "secret")])
def test_file_authenticate_refusals(file_accounts, address, password):
    with pytest.raises(BadCredentials):
        result_of(file_accounts.authenticate(address, password))


def test_file_account_lookup(file_accounts):
    assert result_of(file_accounts.account("bob@example.test")).addresses == (
        "bob@example.test", "team@example.test")
    assert result_of(file_accounts.account("ghost@example.test")) is None
    assert result_of(file_accounts.account("??")) is None


def test_cred_checker_over_accounts(file_accounts):
    checker = AccountsChecker(file_accounts)
    good = credentials.UsernamePassword(b"alice@example.test", b"secret")
    assert result_of(checker.requestAvatarId(good)).address == "alice@example.test"
    for creds in (credentials.UsernamePassword(b"alice@example.test", b"nope"),
                  credentials.UsernamePassword(b"\xff@example.test", b"secret")):
        with pytest.raises(error.UnauthorizedLogin):
            result_of(checker.requestAvatarId(creds))


def test_cred_checker_keeps_backend_outages_temporary():
    checker = AccountsChecker(FakeAccounts(error=BackendUnavailable("down")))
    creds = credentials.UsernamePassword(b"alice@example.test", b"secret")
    with pytest.raises(BackendUnavailable):
        result_of(checker.requestAvatarId(creds))


def test_plain_response_round_trip_through_base64():
    raw = base64.b64encode(plain("", "alice@example.test", "secret"))
    mech = Mechanisms(FakeAccounts()).create("PLAIN")
    assert result_of(mech.step(decode_response(raw))).address == "alice@example.test"
