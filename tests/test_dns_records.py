"""`mailappliance dns-records`: what to publish, in zone-file syntax, and --check.

The check runs against the test DNS server (tests/dns_server.py) through
``[dns] nameservers``, as the command does for an operator.
"""

import io
import re

import dns.zone

import dns_server
from appliance import cli, dnsrecords
from appliance.config import parse
from appliance.deliver.mx import build_resolver
from appliance.policy.keys import KeyStore
from dkim_tools import txt_rdata

CONFIG = """\
[server]
hostname = mail.example.test
domains = example.test{more_domains}
data_dir = {data}
public_addresses = {addresses}
[auth]
users_file = {data}/users
[dkim]
algorithm = {algorithm}
[dns]
nameservers = {nameservers}
timeout = 2s
[listen]
https = {https}
[tls]
mta_sts = {mta_sts}
"""


def config_text(tmp_path, addresses="192.0.2.25, 2001:db8::25", more_domains="",
                algorithm="rsa-sha256", nameservers="", https="", mta_sts="testing"):
    # The web listener (and with it MTA-STS) is off unless a test turns it on.
    return CONFIG.format(data=tmp_path / "data", addresses=addresses,
                         more_domains=more_domains, algorithm=algorithm,
                         nameservers=nameservers, https=https, mta_sts=mta_sts)


def configured(tmp_path, **kwargs):
    # Not "setup": pytest < 8 (Debian 12 has 7.2) would call a module-level
    # setup() as a nose-style module fixture, with the module as tmp_path.
    cfg = parse(config_text(tmp_path, **kwargs), base_dir=str(tmp_path))
    store = KeyStore.from_config(cfg)
    store.ensure(cfg.server.domains)
    return cfg, store


def published(found, skip=()):
    """Test-DNS zones holding ``found`` (records of the kinds in ``skip`` left out)."""
    zones = {}
    for record in found:
        if record.kind in skip:
            continue
        value = txt_rdata(record.name, record.value) if record.rtype == "TXT" else record.value
        name = zones.setdefault(record.name.rstrip("."), {})
        name.setdefault(record.rtype, []).append(value)
    return zones


def test_every_record_for_a_domain_and_its_host(tmp_path):
    cfg, store = configured(tmp_path)
    [key] = store.keys()
    found = [(r.name, r.rtype, r.value) for r in dnsrecords.records(cfg, store)]
    assert found == [
        ("example.test.", "MX", "10 mail.example.test."),
        ("example.test.", "TXT", "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 -all"),
        ("mail._domainkey.example.test.", "TXT", f"v=DKIM1; k=rsa; p={key.public}"),
        ("_dmarc.example.test.", "TXT",
         "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.test"),
        ("mail.example.test.", "A", "192.0.2.25"),
        ("mail.example.test.", "AAAA", "2001:db8::25"),
        ("mail.example.test.", "TXT", "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 -all"),
    ]


def test_without_public_addresses_spf_names_the_mx_and_a_hint_says_why(tmp_path):
    cfg, store = configured(tmp_path, addresses="")
    found = dnsrecords.records(cfg, store)
    spf = {r.name: r.value for r in found if r.kind in ("spf", "helo-spf")}
    assert spf == {"example.test.": "v=spf1 mx -all", "mail.example.test.": "v=spf1 a -all"}
    assert not [r for r in found if r.rtype in ("A", "AAAA")]
    assert "set [server] public_addresses" in dnsrecords.render(cfg, found)


def test_the_zone_text_loads_as_a_zone_with_255_octet_strings(tmp_path):
    cfg, store = configured(tmp_path, more_domains=", bücher.test", algorithm="ed25519-sha256")
    found = dnsrecords.records(cfg, store)
    text = dnsrecords.render(cfg, found, notes=["a note"])
    zone = dns.zone.from_text(text, origin=".", relativize=False, check_origin=False)
    for record in found:
        rdataset = zone.find_rdataset(record.name, record.rtype)
        if record.rtype == "TXT":
            values = {b"".join(r.strings).decode() for r in rdataset}
            assert all(len(s) <= 255 for r in rdataset for s in r.strings)
        else:
            values = {r.to_text() for r in rdataset}
        assert record.value in values, record
        assert rdataset.ttl == dnsrecords.TTL
    rsa = zone.find_rdataset("mail._domainkey.xn--bcher-kva.test.", "TXT")
    assert [len(r.strings) for r in rsa] == [2]          # 2048-bit p= needs two strings
    assert len([r for r in found if r.kind == "dkim"]) == 4   # RSA + Ed25519, two domains


def test_a_retired_key_stays_published_until_it_is_removed(tmp_path):
    cfg, store = configured(tmp_path)
    store.rotate("example.test")
    selectors = [r.name.split(".")[0] for r in dnsrecords.records(cfg, store)
                 if r.kind == "dkim"]
    assert selectors[0] == "mail" and len(selectors) == 2
    store.remove("example.test", "mail")
    assert len([r for r in dnsrecords.records(cfg, store) if r.kind == "dkim"]) == 1


def test_a_hostname_that_is_a_local_domain_gets_no_second_spf(tmp_path):
    text = config_text(tmp_path).replace("hostname = mail.example.test",
                                         "hostname = example.test")
    cfg = parse(text, base_dir=str(tmp_path))
    store = KeyStore.from_config(cfg)
    store.ensure(cfg.server.domains)
    kinds = [r.kind for r in dnsrecords.records(cfg, store)]
    assert "helo-spf" not in kinds and kinds.count("spf") == 1


# -- --check ------------------------------------------------------------------------------

def statuses(findings):
    return {(f.record.kind, f.record.rtype): (f.status, f.found) for f in findings}


def test_check_says_present_when_everything_is_published(tmp_path):
    cfg, store = configured(tmp_path)
    found = dnsrecords.records(cfg, store)
    zones = published(found)
    zones["example.test"]["TXT"].append('"google-site-verification=abc"')   # unrelated TXT
    with dns_server.DNSServer(zones) as dns:
        cfg = parse(config_text(tmp_path, nameservers=dns.address), base_dir=str(tmp_path))
        findings = dnsrecords.check(found, build_resolver(cfg))
    assert {f.status for f in findings} == {"present"}
    assert len(findings) == len(found)


def test_check_says_missing_and_different_with_what_it_found(tmp_path):
    cfg, store = configured(tmp_path)
    found = dnsrecords.records(cfg, store)
    zones = published(found, skip=("dkim", "helo-spf"))
    zones["_dmarc.example.test"]["TXT"] = ['"v=DMARC1; p=none"']
    zones["example.test"]["MX"] = ["10 mx.elsewhere.test."]
    zones["mail.example.test"]["A"] = ["192.0.2.99"]
    with dns_server.DNSServer(zones) as dns:
        cfg = parse(config_text(tmp_path, nameservers=dns.address), base_dir=str(tmp_path))
        findings = statuses(dnsrecords.check(found, build_resolver(cfg)))
    assert findings[("dkim", "TXT")] == ("missing", ())
    assert findings[("helo-spf", "TXT")] == ("missing", ())
    assert findings[("dmarc", "TXT")] == ("different", ("v=DMARC1; p=none",))
    assert findings[("mx", "MX")] == ("different", ("10 mx.elsewhere.test.",))
    assert findings[("address", "A")] == ("different", ("192.0.2.99",))
    assert findings[("address", "AAAA")] == ("present", ())
    assert findings[("spf", "TXT")] == ("present", ())


def test_a_dkim_record_with_another_key_is_different(tmp_path):
    cfg, store = configured(tmp_path)
    found = dnsrecords.records(cfg, store)
    zones = published(found)
    zones["mail._domainkey.example.test"]["TXT"] = ['"v=DKIM1; k=rsa; p=MIIBIjANBgkqOLD"']
    with dns_server.DNSServer(zones) as dns:
        cfg = parse(config_text(tmp_path, nameservers=dns.address), base_dir=str(tmp_path))
        findings = statuses(dnsrecords.check(found, build_resolver(cfg)))
    assert findings[("dkim", "TXT")] == ("different", ("v=DKIM1; k=rsa; p=MIIBIjANBgkqOLD",))


def test_a_failing_lookup_is_an_error_not_missing(tmp_path):
    cfg, store = configured(tmp_path)
    found = dnsrecords.records(cfg, store)
    zones = published(found)
    zones["example.test"] = "SERVFAIL"
    with dns_server.DNSServer(zones) as dns:
        cfg = parse(config_text(tmp_path, nameservers=dns.address), base_dir=str(tmp_path))
        findings = statuses(dnsrecords.check(found, build_resolver(cfg)))
    assert findings[("mx", "MX")][0] == "error"
    assert findings[("spf", "TXT")][0] == "error"
    assert findings[("dmarc", "TXT")][0] == "present"


# -- the command ------------------------------------------------------------------------------

def run(path, *argv):
    streams = cli.IO(stdin=io.StringIO(), stdout=io.StringIO(), stderr=io.StringIO())
    code = cli.main(list(argv) + ["--config", str(path)], streams)
    return code, streams.stdout.getvalue(), streams.stderr.getvalue()


def write_config(tmp_path, **kwargs):
    path = tmp_path / "m.ini"
    path.write_text(config_text(tmp_path, **kwargs), encoding="utf-8")
    return path


def test_the_command_makes_the_keys_once_and_prints_the_zone(tmp_path):
    path = write_config(tmp_path)
    code, out, err = run(path, "dns-records")
    assert (code, err) == (0, "")
    assert "; new DKIM key: mail._domainkey.example.test (rsa-sha256): publish it" in out
    assert "example.test.                            3600 IN MX    10 mail.example.test." in out
    code, again, _ = run(path, "dns-records")
    assert code == 0 and "new DKIM key" not in again
    assert again.splitlines()[1:] == out.splitlines()[2:]    # the same records, no note
    [key] = KeyStore(str(tmp_path / "data" / "dkim")).keys()
    assert key.public[:60] in again


def test_the_command_checks_through_the_configured_name_servers(tmp_path):
    cfg, store = configured(tmp_path)
    zones = published(dnsrecords.records(cfg, store))
    with dns_server.DNSServer(zones) as dns:
        path = write_config(tmp_path, nameservers=dns.address)
        code, out, err = run(path, "dns-records", "--check")
        assert (code, err) == (0, ""), out
        assert out.splitlines()[-1] == "7 present, 0 missing, 0 different, 0 error"
        assert out.splitlines()[0].startswith("present   MX   example.test. ")
        del dns.zones["_dmarc.example.test"]
        code, out, _ = run(path, "dns-records", "--check")
    assert code == 1
    assert "missing   TXT  _dmarc.example.test. v=DMARC1; p=quarantine;" in out


def test_the_command_fails_in_one_line(tmp_path):
    path = write_config(tmp_path)
    (tmp_path / "data").write_text("a file where the data directory should be")
    code, out, err = run(path, "dns-records")
    assert (code, out) == (1, "")
    assert err.startswith("mailappliance: [dkim] key_dir: cannot create ")
    assert err.count("\n") == 1
    path.write_text(path.read_text().replace("hostname = mail.example.test", "hostname ="))
    code, _, err = run(path, "dns-records")
    assert (code, err) == (2, "mailappliance: [server] hostname: must be set "
                              "(the banner and EHLO name)\n")


def test_dkim_rotate_list_and_remove_from_the_command_line(tmp_path):
    path = write_config(tmp_path)
    code, out, _ = run(path, "dkim", "rotate", "example.test")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "retired: mail._domainkey.example.test (keep it published until " \
                       "you remove it)"
    assert lines[1].startswith("new key: mail-") and lines[1].endswith("(rsa-sha256); publish:")
    selector = lines[1].split()[2].split(".")[0]
    assert lines[2].startswith(f"{selector}._domainkey.example.test.")
    code, out, _ = run(path, "dkim", "list")
    assert out.splitlines() == ["example.test mail rsa-sha256 retired",
                                f"example.test {selector} rsa-sha256 active"]
    assert run(path, "dkim", "remove", "example.test", "mail")[0] == 0
    code, _, err = run(path, "dkim", "remove", "example.test", selector)
    assert code == 1 and "is the active key" in err
    code, _, err = run(path, "dkim", "rotate", "other.test")
    assert (code, err) == (1, "mailappliance: other.test is not one of the local domains "
                              "([server] domains)\n")


# -- the web names, MTA-STS and TLS-RPT (SPEC §8) ---------------------------------------

def web_records(cfg, store):
    return [(r.name, r.rtype, r.value) for r in dnsrecords.records(cfg, store)
            if r.kind in ("web", "mta-sts", "tls-rpt")]


def test_with_https_the_web_names_mta_sts_and_tls_rpt_are_listed(tmp_path):
    cfg, store = configured(tmp_path, https="127.0.0.1:8443")
    found = web_records(cfg, store)
    assert found[:3] == [
        ("mta-sts.example.test.", "CNAME", "mail.example.test."),
        ("autoconfig.example.test.", "CNAME", "mail.example.test."),
        ("autodiscover.example.test.", "CNAME", "mail.example.test."),
    ]
    (sts_name, _, sts), tlsrpt = found[3:]
    assert sts_name == "_mta-sts.example.test."
    assert re.fullmatch(r"v=STSv1; id=[0-9a-f]{20}", sts)
    assert tlsrpt == ("_smtp._tls.example.test.", "TXT",
                      "v=TLSRPTv1; rua=mailto:postmaster@example.test")
    text = dnsrecords.render(cfg, dnsrecords.records(cfg, store))
    assert f'_mta-sts.example.test. ' in text and f'"{sts}"' in text


def test_the_policy_id_changes_with_the_policy_only(tmp_path):
    def sts(**kwargs):
        cfg, store = configured(tmp_path, https="127.0.0.1:8443", **kwargs)
        return dict((n, v) for n, _, v in web_records(cfg, store))["_mta-sts.example.test."]
    testing = sts()
    assert sts() == testing
    assert sts(mta_sts="enforce") != testing
    assert sts(more_domains=", example.org") == testing     # the policy text is per host


def test_without_a_published_policy_no_mta_sts_records(tmp_path):
    cfg, store = configured(tmp_path, https="127.0.0.1:8443", mta_sts="none")
    assert [kind for _, kind, _ in web_records(cfg, store)] == ["CNAME"] * 3
    cfg, store = configured(tmp_path)
    assert web_records(cfg, store) == []


def test_check_finds_the_mta_sts_records(tmp_path):
    cfg, store = configured(tmp_path, https="127.0.0.1:8443")
    found = dnsrecords.records(cfg, store)
    zones = published(found, skip=("web",))
    for record in found:
        if record.kind == "web":
            zones.setdefault(record.name.rstrip("."), {})["CNAME"] = record.value
    zones["_smtp._tls.example.test"]["TXT"] = [
        txt_rdata("x", "v=TLSRPTv1; rua=mailto:postmaster@example.test")]
    zones["_mta-sts.example.test"]["TXT"] = [txt_rdata("x", "v=STSv1; id=old")]
    with dns_server.DNSServer(zones) as server:
        cfg, store = configured(tmp_path, https="127.0.0.1:8443", nameservers=server.address)
        findings = dnsrecords.check(dnsrecords.records(cfg, store), build_resolver(cfg))
    status = {f.record.kind: f.status for f in findings}
    assert status["tls-rpt"] == dnsrecords.PRESENT
    assert status["web"] == dnsrecords.PRESENT
    assert status["mta-sts"] == dnsrecords.DIFFERENT
