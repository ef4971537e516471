"""authorized_keys with OpenSSH options, and the key checker."""

import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.conch import error as conch_error
from twisted.conch.ssh import keys
from twisted.cred.credentials import SSHPrivateKey
from twisted.internet import defer, task

from appliance.admin import keys as keymod
from appliance.admin.keys import KeyChecker, KeyFileError, Refused, parse_line, read_keys
from appliance.testing import error_of, value_of


def ed_key():
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def public_line(key, comment="me@laptop"):
    return key.public().toString("openssh").decode() + " " + comment


def test_plain_line_gives_fingerprint_and_role():
    key = ed_key()
    entry = parse_line(public_line(key), "admin", "f:1")
    assert entry.role == "admin" and entry.comment == "me@laptop"
    assert entry.fingerprint == "SHA256:" + key.fingerprint(
        keys.FingerprintFormats.SHA256_BASE64).rstrip("=")
    assert entry.from_patterns == () and not entry.no_pty and entry.expires is None
    assert parse_line("  # a comment", "admin") is None and parse_line("", "admin") is None


def test_options_are_honoured_not_dropped():
    key = ed_key()
    line = ('from="10.0.0.0/8,192.168.1.*,!10.6.6.6",restrict,expiry-time="20300101",'
            'command="queue list --json",no-port-forwarding ' + public_line(key))
    entry = parse_line(line, "read")
    assert entry.from_patterns == ("10.0.0.0/8", "192.168.1.*", "!10.6.6.6")
    assert entry.no_pty and entry.command == "queue list --json"
    assert entry.expires == time.mktime(time.strptime("20300101", "%Y%m%d"))
    assert entry.allows_peer("10.1.2.3") and entry.allows_peer("192.168.1.40")
    assert not entry.allows_peer("10.6.6.6") and not entry.allows_peer("127.0.0.1")
    assert entry.expired(entry.expires) and not entry.expired(entry.expires - 1)


def test_quoted_option_values_may_hold_commas_and_spaces():
    key = ed_key()
    entry = parse_line('command="log tail 5, \\"x\\"" ' + public_line(key), "admin")
    assert entry.command == 'log tail 5, "x"'


@pytest.mark.parametrize("prefix, why", [
    ("cert-authority ", "not supported"),
    ("frobnicate ", "not supported"),
    ('from="1.2.3.4 ', "unterminated quote"),
    ('expiry-time="2030" ', "YYYYMMDD"),
])
def test_lines_we_cannot_enforce_are_refused(prefix, why):
    with pytest.raises(KeyFileError, match=why):
        parse_line(prefix + public_line(ed_key()), "admin")


def test_small_rsa_keys_are_refused():
    small = keys.Key(rsa.generate_private_key(65537, 1024))
    with pytest.raises(KeyFileError, match="at least 2048"):
        parse_line(public_line(small), "admin")


def test_read_keys_skips_bad_lines_and_missing_files(tmp_path):
    good = ed_key()
    path = tmp_path / "authorized_keys"
    path.write_text("garbage line\n" + public_line(good) + "\n")
    found = read_keys([(str(path), "admin"), (str(tmp_path / "none"), "read"), ("", "read")])
    assert [k.blob for k in found] == [good.public().blob()]


def test_a_key_in_both_files_is_read_only(tmp_path):
    key = ed_key()
    (tmp_path / "a").write_text(public_line(key) + "\n")
    (tmp_path / "r").write_text(public_line(key) + "\n")
    found = read_keys([(str(tmp_path / "a"), "admin"), (str(tmp_path / "r"), "read")])
    assert keymod.find(found, key.public().blob()).role == "read"


# -- the checker ----------------------------------------------------------------------

SESSION = b"session-id-data"


def checker(entries, peer="127.0.0.1", now=None):
    clock = task.Clock()
    clock.advance(now if now is not None else time.time())
    return KeyChecker([("ignored", "admin")], peer, lambda files: defer.succeed(entries),
                      clock)


def creds(key, algorithm=b"ssh-ed25519", signed=True, sign_as=None):
    data = SESSION + b"request"
    signature = key.sign(data, signatureType=sign_as or algorithm) if signed else None
    return SSHPrivateKey(b"admin", algorithm, key.public().blob(),
                         data if signed else None, signature)


def test_a_listed_key_with_a_good_signature_logs_in():
    key = ed_key()
    entry = parse_line(public_line(key), "admin")
    avatar_id = value_of(checker([entry]).requestAvatarId(creds(key)))
    assert avatar_id.user == "admin" and avatar_id.key is entry


def test_the_probe_without_signature_is_answered_valid_key():
    key = ed_key()
    error = error_of(checker([parse_line(public_line(key), "admin")]).requestAvatarId(
        creds(key, signed=False)))
    assert isinstance(error, conch_error.ValidPublicKey)


def test_refusals_say_why_with_the_offered_fingerprint():
    key, other = ed_key(), ed_key()
    listed = parse_line(public_line(key), "admin")
    unknown = error_of(checker([listed]).requestAvatarId(creds(other)))
    assert isinstance(unknown, Refused) and unknown.reason == "unknown key"
    assert unknown.fingerprint == keymod.fingerprint(other.public().blob())
    fenced = parse_line('from="10.0.0.0/8" ' + public_line(key), "admin")
    assert error_of(checker([fenced]).requestAvatarId(creds(key))).reason == \
        "from= refused"
    old = parse_line('expiry-time="20200101" ' + public_line(key), "admin")
    assert error_of(checker([old]).requestAvatarId(creds(key))).reason == \
        "key expired"
    forged = creds(key)
    forged = SSHPrivateKey(forged.username, forged.algName, forged.blob, b"other data",
                           forged.signature)
    assert error_of(checker([listed]).requestAvatarId(forged)).reason == \
        "bad signature"


def test_sha1_rsa_signatures_are_refused_sha2_accepted():
    key = keys.Key(rsa.generate_private_key(65537, 2048))
    entry = parse_line(public_line(key), "admin")
    assert error_of(checker([entry]).requestAvatarId(
        creds(key, algorithm=b"ssh-rsa"))).reason == "sha1 signature"
    # A signature made with SHA-1 under a SHA-2 name is refused too.
    assert error_of(checker([entry]).requestAvatarId(
        creds(key, algorithm=b"rsa-sha2-512", sign_as=b"ssh-rsa"))).reason == \
        "sha1 signature"
    assert value_of(checker([entry]).requestAvatarId(
        creds(key, algorithm=b"rsa-sha2-512"))).key is entry
