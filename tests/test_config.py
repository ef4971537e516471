"""appliance.config: every type parser, unknown names, all problems at once."""

import dataclasses
import ipaddress
import os

import pytest

from appliance import config
from appliance.config import ConfigError, HostPort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "etc", "mailappliance.ini")

MINIMAL = "[server]\nhostname = mail.example.test\ndomains = example.test\n"


def parse(extra="", base_dir="/srv/mail"):
    return config.parse(MINIMAL + extra, base_dir=base_dir)


def problems(text, base_dir="/srv/mail"):
    with pytest.raises(ConfigError) as info:
        config.parse(text, base_dir=base_dir)
    return info.value.problems


def one_problem(extra):
    found = problems(MINIMAL + extra)
    assert len(found) == 1, found
    return found[0]


# -- the sample and the defaults ---------------------------------------------

def test_sample_config_is_valid_and_typed():
    cfg = config.load(SAMPLE, base_dir="/run/here")
    assert cfg.path == SAMPLE
    assert cfg.server.hostname == "mail.example.test"
    assert cfg.server.domains == ("example.test", "example.org")
    assert cfg.server.data_dir == "/run/here/var"
    assert cfg.server.max_message_size == 25 * 1024 * 1024
    assert cfg.listen.mx == HostPort("127.0.0.1", 8025)
    assert cfg.listen.submission_alt == HostPort("127.0.0.1", 2525)
    assert cfg.auth.users_file == "/run/here/var/users"
    assert cfg.auth.ldap_user_filter == "(mail={address})"
    assert cfg.auth.ldap_starttls is True
    assert cfg.dkim.key_dir == "/run/here/var/dkim"
    assert cfg.queue.retry == (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
    assert cfg.limits.command_timeout == 300.0
    assert cfg.limits.auth_failures_before_ban == 5
    assert cfg.log.events == "/run/here/var/log/events.json"
    assert set(cfg.listeners()) == set(config.LISTENERS)


def test_only_the_cross_checked_keys_are_needed():
    cfg = parse()
    assert cfg.tls.certificate is None and cfg.tls.private_key is None
    assert cfg.auth.backend == "file"
    assert cfg.auth.ldap_bind_dn == ""
    assert cfg.relay.trusted_networks == () and cfg.relay.smarthost is None
    assert cfg.dns.nameservers == () and cfg.dns.timeout == 5.0
    assert cfg.outbound.port == 25 and cfg.outbound.tls == "opportunistic"
    assert cfg.checks.spf == "on" and cfg.checks.dkim is True
    assert cfg.checks.dmarc == "enforce" and cfg.checks.greylist is False
    assert cfg.limits.data_timeout == 600.0 and cfg.limits.max_errors == 20
    assert cfg.admin.authorized_keys == "/srv/mail/var/admin_authorized_keys"
    assert cfg.aliases_file == "/srv/mail/var/aliases"


def test_an_empty_file_names_what_it_needs():
    assert problems("") == [
        "[server] hostname: must be set (the banner and EHLO name)",
        "[server] domains: at least one local domain is needed",
    ]


def test_config_is_frozen():
    cfg = parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.hostname = "other"


def test_relative_paths_default_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.parse(MINIMAL + "[tls]\ncertificate = c.pem\nprivate_key = /k.pem\n")
    assert cfg.server.data_dir == os.path.join(str(tmp_path), "var")
    assert cfg.tls.certificate == os.path.join(str(tmp_path), "c.pem")
    assert cfg.tls.private_key == "/k.pem"


def test_key_dir_follows_data_dir_unless_set():
    assert parse("data_dir = /data\n").dkim.key_dir == "/data/dkim"
    assert parse("data_dir = /data\n[dkim]\nkey_dir = keys\n").dkim.key_dir \
        == "/srv/mail/keys"


# -- type parsers ------------------------------------------------------------

@pytest.mark.parametrize("raw, seconds", [
    ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("5d", 432000.0),
    ("45", 45.0), ("1.5h", 5400.0), ("10 M", 600.0),
])
def test_durations(raw, seconds):
    assert config.duration(raw) == seconds


@pytest.mark.parametrize("raw", ["1x", "", "m", "-5s", "5 minutes", "1h30m"])
def test_bad_durations(raw):
    with pytest.raises(ValueError, match="is not a duration"):
        config.duration(raw)


def test_bad_duration_problem_line():
    assert one_problem("[limits]\nban_time = 1x\n") == \
        '[limits] ban_time: "1x" is not a duration (use 30s, 5m, 2h, 5d)'


def test_zero_duration_only_where_it_means_disabled():
    assert parse("[queue]\ndelay_warning = 0\n").queue.delay_warning == 0.0
    assert one_problem("[limits]\ncommand_timeout = 0\n") == \
        '[limits] command_timeout: "0" must be longer than zero'


@pytest.mark.parametrize("raw, size", [
    ("25M", 25 * 1024 ** 2), ("512K", 512 * 1024), ("1G", 1024 ** 3),
    ("1000", 1000), ("10m", 10 * 1024 ** 2), ("2MB", 2 * 1024 ** 2),
])
def test_sizes(raw, size):
    assert config.size(raw) == size


@pytest.mark.parametrize("raw", ["25X", "M", "", "-1", "0", "1T"])
def test_bad_sizes(raw):
    with pytest.raises(ValueError):
        config.size(raw)


def test_integers_and_bounds():
    assert parse("max_recipients = 7\n").server.max_recipients == 7
    assert one_problem("max_recipients = many\n") == \
        '[server] max_recipients: "many" is not a whole number'
    assert one_problem("max_recipients = 0\n") == \
        "[server] max_recipients: 0 is too small (at least 1)"
    assert one_problem("[outbound]\nport = 70000\n") == \
        "[outbound] port: 70000 is too large (at most 65535)"


@pytest.mark.parametrize("raw, value", [
    ("on", True), ("off", False), ("yes", True), ("no", False),
    ("true", True), ("FALSE", False),
])
def test_booleans(raw, value):
    assert config.boolean(raw) is value


def test_bad_boolean():
    assert one_problem("[checks]\ngreylist = maybe\n") == \
        '[checks] greylist: "maybe" is not on or off'


def test_enums():
    cfg = parse("[checks]\nspf = ENFORCE\ndmarc = report\n[outbound]\ntls = off\n"
                "[dkim]\nalgorithm = ed25519-sha256\n")
    assert (cfg.checks.spf, cfg.checks.dmarc) == ("enforce", "report")
    assert cfg.outbound.tls == "off" and cfg.dkim.algorithm == "ed25519-sha256"
    assert one_problem("[checks]\nspf = strict\n") == \
        '[checks] spf: "strict" is not one of: on, enforce, off'


@pytest.mark.parametrize("raw, expected", [
    ("127.0.0.1:25", HostPort("127.0.0.1", 25)),
    ("[::1]:25", HostPort("::1", 25)),
    ("Localhost:8025", HostPort("localhost", 8025)),
    ("0.0.0.0:465", HostPort("0.0.0.0", 465)),
    ("", None),
])
def test_host_port(raw, expected):
    assert config.host_port()(raw) == expected


@pytest.mark.parametrize("raw", [
    "127.0.0.1", "::1:25", "127.0.0.1:0", "127.0.0.1:65536", "host:port",
    "[::1]25", ":25", "bad_host!:25",
])
def test_bad_host_port(raw):
    with pytest.raises(ValueError):
        config.host_port()(raw)


def test_smarthost_port_defaults_to_25():
    cfg = parse("[relay]\nsmarthost = relay.example.net\n")
    assert cfg.relay.smarthost == HostPort("relay.example.net", 25)


def test_empty_listener_is_disabled():
    cfg = parse("[listen]\npop3 =\npop3s =\n")
    assert cfg.listen.pop3 is None
    assert "pop3" not in cfg.listeners() and "imap" in cfg.listeners()


def test_cidr_lists():
    cfg = parse("[relay]\ntrusted_networks = 10.1.2.3/8, 2001:db8::/32, 192.0.2.7\n"
                "[limits]\ndeny = 198.51.100.0/24\n")
    assert cfg.relay.trusted_networks == (
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.0.2.7/32"))
    assert cfg.limits.deny == (ipaddress.ip_network("198.51.100.0/24"),)
    assert cfg.limits.allow == ()
    assert one_problem("[limits]\nallow = 10.0.0.0/33\n") == \
        '[limits] allow: "10.0.0.0/33" is not an IP network (e.g. 192.0.2.0/24 or ' \
        '2001:db8::/32)'


def test_nameservers():
    cfg = parse("[dns]\nnameservers = 127.0.0.1:5353, ::1, [::1]:53, 192.0.2.1\n")
    assert cfg.dns.nameservers == (
        HostPort("127.0.0.1", 5353), HostPort("::1", 53), HostPort("::1", 53),
        HostPort("192.0.2.1", 53))
    assert "is not an IP address" in one_problem("[dns]\nnameservers = ns.example\n")


def test_domain_lists_are_canonical():
    cfg = config.parse("[server]\nhostname = MAIL.Example.TEST.\n"
                       "domains = Example.ORG., xn--bcher-kva.example, example.org\n",
                       base_dir="/x")
    assert cfg.server.hostname == "mail.example.test"
    assert cfg.server.domains == ("example.org", "bücher.example")
    for bad in ("exa mple.test", "-bad-.test", "a..b", "x" * 64 + ".test"):
        assert problems(f"[server]\nhostname = m.test\ndomains = {bad}\n") == [
            f'[server] domains: "{bad}" is not a valid domain name']


def test_public_addresses():
    cfg = parse("public_addresses = 192.0.2.1, 2001:db8::1\n")
    assert cfg.server.public_addresses == (ipaddress.ip_address("192.0.2.1"),
                                           ipaddress.ip_address("2001:db8::1"))
    assert "is not an IP address" in one_problem("public_addresses = mail\n")


def test_lists_may_continue_on_indented_lines():
    cfg = parse("[queue]\nretry = 1m,\n    5m\n")
    assert cfg.queue.retry == (60.0, 300.0)


def test_multiline_single_value_is_refused():
    assert one_problem("[dns]\ntimeout = 5s\n  6s\n") == \
        '[dns] timeout: "5s\\n6s" spans several lines; one value expected'


def test_ldap_values():
    assert "is not an ldap:// or ldaps:// URL" in one_problem(
        "[auth]\nldap_url = http://x\n")
    assert "containing {address}" in one_problem("[auth]\nldap_user_filter = (mail=x)\n")
    assert "not an LDAP attribute name" in one_problem(
        "[auth]\nldap_address_attributes = mail, mail alias\n")
    cfg = parse("[auth]\nldap_address_attributes = mail, mailAlternateAddress\n"
                "ldap_starttls = off\n")
    assert cfg.auth.ldap_address_attributes == ("mail", "mailAlternateAddress")
    assert cfg.auth.ldap_starttls is False


def test_inline_comments_and_semicolons_inside_values():
    cfg = parse("[auth]\nldap_user_filter = (&(mail={address})(a=b;c)) ; note\n")
    assert cfg.auth.ldap_user_filter == "(&(mail={address})(a=b;c))"


# -- unknown names, syntax, all problems at once -----------------------------

def test_unknown_section_and_key_are_named():
    found = problems(MINIMAL + "hostnme = x\n[lsiten]\nmx = 1.2.3.4:25\n[spam]\na = 1\n")
    assert found == [
        '[server] hostnme: unknown key (did you mean "hostname"?)',
        '[lsiten]: unknown section (did you mean "listen"?)',
        "[spam]: unknown section",
    ]


def test_default_section_is_not_magic():
    assert problems(MINIMAL + "[DEFAULT]\nhostname = y\n") == \
        ["[DEFAULT]: unknown section"]


def test_all_problems_are_listed_at_once():
    text = ("[server]\ndomains = example.test\nmax_message_size = big\n"
            "[limits]\nban_time = 1x\nconnections_per_ip = -3\n"
            "[checks]\ndkim = sometimes\n[listen]\nimap = 127.0.0.1:8025\n"
            "[auth]\nbackend = ldap\nldap_base_dn =\n[tls]\ncertificate = c.pem\n"
            "[bogus]\n")
    found = problems(text)
    assert found == [
        "[bogus]: unknown section",
        '[server] max_message_size: "big" is not a size (use 512K, 25M, 1G or bytes)',
        '[checks] dkim: "sometimes" is not on or off',
        "[limits] connections_per_ip: -3 is too small (at least 1)",
        '[limits] ban_time: "1x" is not a duration (use 30s, 5m, 2h, 5d)',
        "[server] hostname: must be set (the banner and EHLO name)",
        "[auth] ldap_base_dn: must be set when backend = ldap",
        "[tls] private_key: certificate and private_key go together (set both, "
        "or neither for a self-signed one)",
        "[listen] imap: 127.0.0.1:8025 is already used by mx",
    ]
    assert all("\n" not in line for line in found)


def test_more_cross_checks():
    assert one_problem("[auth]\nldap_bind_dn = cn=svc\n").startswith(
        "[auth] ldap_bind_dn: ldap_bind_dn and ldap_bind_password_file go together")
    assert one_problem("[auth]\noauth2_issuer = https://id.example\n").startswith(
        "[auth] oauth2_audience: oauth2_issuer, oauth2_audience and oauth2_jwks_file")
    assert one_problem("data_dir =\n") == \
        "[server] data_dir: must be set (a file or directory path)"
    assert one_problem("[listen]\nmx = [::1]:8587\nsubmission = [::1]:8587\n") == \
        "[listen] submission: [::1]:8587 is already used by mx"
    cfg = parse("[auth]\nbackend = ldap\nldap_base_dn = dc=example,dc=test\n")
    assert cfg.auth.backend == "ldap"


def test_syntax_errors_are_one_line():
    assert problems("hostname = x\n") == [
        "line 1: 'hostname = x' comes before any [section] header"]
    assert problems(MINIMAL + "[server]\n") == [
        "[server]: section appears twice (line 4)"]
    assert problems(MINIMAL + "hostname = y\n") == [
        "[server] hostname: set twice (line 4)"]
    assert problems(MINIMAL + "just words\nmore words\n") == [
        "line 4: cannot parse 'just words' (expected key = value)",
        "line 5: cannot parse 'more words' (expected key = value)"]


def test_load_missing_unreadable_and_binary(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path / "none.ini"))
    assert info.value.problems == [f"{tmp_path / 'none.ini'}: no such file"]
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path))
    assert info.value.problems[0].startswith(f"{tmp_path}: cannot read")
    binary = tmp_path / "bin.ini"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError) as info:
        config.load(str(binary))
    assert info.value.problems == [f"{binary}: not UTF-8 text"]


def test_load_resolves_against_cwd(tmp_path, monkeypatch):
    path = tmp_path / "m.ini"
    path.write_text(MINIMAL)
    monkeypatch.chdir(tmp_path)
    cfg = config.load("m.ini")
    assert cfg.path == str(path)
    assert cfg.server.data_dir == str(tmp_path / "var")


def test_config_error_message_joins_problems():
    error = ConfigError(["a", "b"])
    assert str(error) == "a\nb" and error.problems == ["a", "b"]


# -- [listen] http/https and [tls] acme*, mta_sts (SPEC §3, §8) -----------------

def test_web_and_acme_defaults():
    cfg = parse()
    assert cfg.listen.http == HostPort("127.0.0.1", 8080)
    assert cfg.listen.https == HostPort("127.0.0.1", 8443)
    assert cfg.tls.acme is False
    assert cfg.tls.acme_directory == "https://acme-v02.api.letsencrypt.org/directory"
    assert cfg.tls.acme_email == ""
    assert cfg.tls.acme_challenge == "tls-alpn-01"
    assert cfg.tls.acme_ca_file is None
    assert cfg.tls.mta_sts == "testing"
    assert cfg.mta_sts_published is True


def test_acme_values_are_typed():
    cfg = parse("[tls]\nacme = on\nacme_directory = https://127.0.0.1:14000/dir\n"
                "acme_email = Hostmaster@Example.TEST\nacme_challenge = HTTP-01\n"
                "acme_ca_file = ca.pem\nmta_sts = enforce\n")
    assert cfg.tls.acme is True
    assert cfg.tls.acme_directory == "https://127.0.0.1:14000/dir"
    assert cfg.tls.acme_email == "Hostmaster@example.test"
    assert cfg.tls.acme_challenge == "http-01"
    assert cfg.tls.acme_ca_file == "/srv/mail/ca.pem"
    assert cfg.tls.mta_sts == "enforce"


@pytest.mark.parametrize("line, why", [
    ("acme = maybe", "[tls] acme: \"maybe\" is not on or off"),
    ("acme_directory = http://acme.test/dir", "is not an https:// URL"),
    ("acme_directory = https://acme.test:99999/dir", "has no valid port"),
    ("acme_email = nobody", "is not an e-mail address"),
    ("acme_email = a@b@c", "is not an e-mail address"),
    ("acme_challenge = dns-01", "is not one of: tls-alpn-01, http-01"),
    ("mta_sts = on", "is not one of: none, testing, enforce"),
])
def test_bad_acme_values(line, why):
    problem = one_problem(f"[tls]\n{line}\n")
    assert problem.startswith("[tls] ") and why in problem


def test_acme_needs_its_challenge_listener_and_no_certificate_file():
    assert one_problem("[listen]\nhttps =\n[tls]\nacme = on\n") == (
        "[tls] acme_challenge: tls-alpn-01 is answered on [listen] https, which is empty")
    assert one_problem("[listen]\nhttp =\n[tls]\nacme = on\nacme_challenge = http-01\n") == (
        "[tls] acme_challenge: http-01 is answered on [listen] http, which is empty")
    assert "exclude each other" in one_problem(
        "[tls]\nacme = on\ncertificate = c.pem\nprivate_key = k.pem\n")
    found = problems("[server]\nhostname = 192.0.2.1\ndomains = example.test\n"
                     "[tls]\nacme = on\n")
    assert found == ["[tls] acme: the hostname must be a DNS name for ACME, "
                     "not the address 192.0.2.1"]
    # Off, none of it matters.
    parse("[listen]\nhttps =\nhttp =\n")


def test_web_listeners_clash_like_the_others():
    assert one_problem("[listen]\nhttps = 127.0.0.1:8993\n") == (
        "[listen] https: 127.0.0.1:8993 is already used by imaps")


def test_mta_sts_is_published_only_with_a_mode_and_https():
    assert parse("[tls]\nmta_sts = none\n").mta_sts_published is False
    assert parse("[listen]\nhttps =\n").mta_sts_published is False
    assert parse("[tls]\nmta_sts = enforce\n").mta_sts_published is True
