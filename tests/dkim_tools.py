"""DKIM verification for tests: dkimpy and an independent one, Perl's Mail::DKIM.

Both read the public keys from DNS: dkimpy through a dnspython resolver (or a
dict), Mail::DKIM through Net::DNS pointed at the test DNS server
(tests/dns_server.py). ``zones_for(keys)`` turns key-store keys into that
server's zones, TXT split into 255-octet strings as dns-records prints them.

Mail::DKIM as Debian 12 ships it (1.20230212) verifies RSA only: an Ed25519
signature comes back "invalid (unsupported algorithm ...)". OpenDKIM (C,
libopendkim 2.11 on OpenSSL) verifies both: ``opendkim_verify`` runs its
test mode (``opendkim -t``) with the keys as ``TestDNSData``, no DNS.
"""

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import dkim
import dns.exception
import dns.resolver

from appliance.dnsrecords import Record

PERL_VERIFIER = r"""
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

my ($host, $port) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(
    nameservers => [$host], port => $port, recurse => 0, retry => 2,
    udp_timeout => 5, tcp_timeout => 5));
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\015?\012\z/\015\012/;
    $dkim->PRINT($line);
}
$dkim->CLOSE;
print "result ", $dkim->result, "\n";
foreach my $sig ($dkim->signatures) {
    printf "signature %s %s %s %s\n", $sig->domain, $sig->selector, $sig->algorithm,
        $sig->result;
}
"""


def mail_dkim_missing():
    """Why Mail::DKIM cannot run here ("" when it can)."""
    if shutil.which("perl") is None:
        return "perl is not installed"
    probe = subprocess.run(["perl", "-MMail::DKIM::Verifier", "-MNet::DNS::Resolver",
                            "-e", "1"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return "Mail::DKIM is not installed (apt-get install libmail-dkim-perl)"
    return ""


def mail_dkim_verify(message, dns_host, dns_port):
    """Mail::DKIM's verdict: (overall result, {(selector, algorithm): result})."""
    run = subprocess.run(["perl", "-e", PERL_VERIFIER, dns_host, str(dns_port)],
                         input=message, capture_output=True, timeout=60)
    if run.returncode != 0:
        raise AssertionError(f"Mail::DKIM failed: {run.stderr.decode(errors='replace')}")
    overall, signatures = None, {}
    for line in run.stdout.decode().splitlines():
        words = line.split()
        if words[0] == "result":
            overall = words[1]
        elif words[0] == "signature":
            signatures[(words[2], words[3])] = words[4]
    return overall, signatures


def txt_rdata(name, text):
    """TXT rdata text as the test DNS server takes it: quoted 255-octet strings."""
    return " ".join(Record(name, "TXT", text, "dkim").strings())


def zones_for(keys):
    """Test-DNS zones publishing ``keys`` (DKIMKey objects)."""
    return {key.dns_name: {"TXT": [txt_rdata(key.dns_name, key.txt)]} for key in keys}


def dnsfunc_from(keys):
    """A dkimpy ``dnsfunc`` answering from ``keys`` without any DNS."""
    records = {key.dns_name + ".": key.txt.encode("ascii") for key in keys}

    def dnsfunc(name, timeout=5):
        return records.get(name.decode("ascii") if isinstance(name, bytes) else name)
    return dnsfunc


def dnsfunc_server(host, port):
    """A dkimpy ``dnsfunc`` asking the DNS server at host:port."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    resolver.lifetime = 5

    def dnsfunc(name, timeout=5):
        qname = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(qname, "TXT")
        except dns.exception.DNSException:
            return None
        return b"".join(answer[0].strings)
    return dnsfunc


def dkimpy_results(message, dnsfunc):
    """{(selector, algorithm): bool} for every DKIM-Signature of ``message``."""
    checker = dkim.DKIM(message)
    signatures = [value for name, value in checker.headers
                  if name.lower() == b"dkim-signature"]
    results = {}
    for index, value in enumerate(signatures):
        tags = dict(part.strip().split(b"=", 1) for part in value.split(b";")
                    if b"=" in part)
        key = (tags[b"s"].strip().decode(), tags[b"a"].strip().decode())
        try:
            results[key] = dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc)
        except dkim.DKIMException:      # a body hash mismatch raises instead of False
            results[key] = False
    return results


OPENDKIM = "/usr/sbin/opendkim"
_OPENDKIM_RESULT = re.compile(r"dkim=(\w+)[^;]*?header\.a=([\w-]+) header\.s=([\w.-]+)")


def opendkim_missing():
    """Why OpenDKIM's verifier cannot run here ("" when it can)."""
    if not Path(OPENDKIM).exists() and shutil.which("opendkim") is None:
        return "opendkim is not installed (apt-get install opendkim)"
    return ""


def opendkim_verify(message, keys):
    """OpenDKIM's verdicts, {(selector, algorithm): result} ("pass", "fail",
    ...), for ``message`` checked against ``keys`` (DKIMKey objects)."""
    with tempfile.TemporaryDirectory(prefix="opendkim-verify-") as workdir:
        work = Path(workdir)
        (work / "dns").write_text("".join(f"{key.dns_name} {key.txt}\n" for key in keys))
        (work / "message.eml").write_bytes(message)
        (work / "opendkim.conf").write_text(
            f"Mode v\nSyslog no\nTestDNSData file:{work / 'dns'}\n")
        run = subprocess.run([shutil.which("opendkim") or OPENDKIM, "-x",
                              str(work / "opendkim.conf"), "-vv", "-t",
                              str(work / "message.eml")],
                             capture_output=True, timeout=60)
    output = (run.stdout + run.stderr).decode(errors="replace")
    if run.returncode != 0 or "Authentication-Results" not in output:
        raise AssertionError(f"opendkim -t failed ({run.returncode}): {output[-2000:]}")
    return {(selector, algorithm): result
            for result, algorithm, selector in _OPENDKIM_RESULT.findall(output)}
