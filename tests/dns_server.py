"""An authoritative DNS server for tests, on loopback, UDP and TCP, in threads.

Zones are plain Python data, name -> records or an outcome::

    zones = {
        "example.net": {"MX": [(10, "mx1.example.net"), (20, "mx2.example.net")]},
        "mx1.example.net": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        "nullmx.test": {"MX": [(0, ".")]},
        "alias.test": {"CNAME": "example.net"},
        "spf.test": {"TXT": ["v=spf1 -all"]},
        "broken.test": "SERVFAIL",          # also "REFUSED"
        "slow.test": "HANG",                # never answered (a timeout)
        "gone.test": "NXDOMAIN",            # the same as leaving it out
    }

A name that is not in ``zones`` is NXDOMAIN; a name without the asked type is
NODATA (NOERROR, empty answer). Records are ``(preference, host)`` for MX and
rdata text for every type (``"10 mx.example.net."`` works for MX too). A CNAME
is followed inside the zones, as an authoritative server does, at most
``MAX_CHAIN`` steps (so a CNAME loop comes back as a long chain).

Answers carry ``ttl`` seconds (default ``TTL``). With ``negative_ttl`` a
negative answer (NXDOMAIN, NODATA) carries the zone's SOA in its authority
section with that MINIMUM, so a resolver may cache it (RFC 2308); without it,
as by default, negative answers have no SOA and are not cacheable.

A UDP answer too big for the query's payload (512 bytes without EDNS) is sent
truncated (TC), and the client retries over TCP, like a real server. The
server runs in daemon threads, so it serves unit tests that block in
``resolver.resolve`` and a server subprocess (``[dns] nameservers =
127.0.0.1:PORT``) alike. ``zones`` may be replaced or changed while running.

    with DNSServer(zones) as dns:
        ... dns.port, dns.address ("127.0.0.1:PORT"), dns.queries ...

Run ``python tests/dns_server.py ZONES.json`` to serve a JSON file until killed
(prints the port).
"""

import json
import socket
import struct
import sys
import threading

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

MAX_CHAIN = 20
TTL = 60
_OUTCOMES = {"SERVFAIL": dns.rcode.SERVFAIL, "REFUSED": dns.rcode.REFUSED,
             "NXDOMAIN": dns.rcode.NXDOMAIN}


def _absolute(name):
    return dns.name.from_text(name if name.endswith(".") else name + ".")


def _rdata_text(rdtype, value):
    if rdtype == "MX" and isinstance(value, (tuple, list)):
        preference, host = value
        return f"{preference} {host if host.endswith('.') else host + '.'}"
    if rdtype in ("CNAME", "NS", "PTR") and not value.endswith("."):
        return value + "."
    if rdtype == "TXT" and not value.startswith('"'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


class DNSServer:
    """See the module docstring. ``start()``/``stop()`` or use as a context manager."""

    def __init__(self, zones=None, host="127.0.0.1", port=0, ttl=TTL, negative_ttl=None):
        self.zones = dict(zones or {})
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.host = host
        self.requested_port = port
        self.port = None
        self.queries = []              # (name, type, "udp"|"tcp") in arrival order
        self._stopping = threading.Event()
        self._sockets = []
        self._threads = []
        self._hung = []                # TCP connections held open for HANG names

    @property
    def address(self):
        return f"{self.host}:{self.port}"

    # -- life ----------------------------------------------------------------

    def start(self):
        udp, tcp = self._bind()
        self._sockets = [udp, tcp]
        for target, sock in ((self._serve_udp, udp), (self._serve_tcp, tcp)):
            thread = threading.Thread(target=target, args=(sock,), daemon=True,
                                      name=f"test-dns-{target.__name__}")
            thread.start()
            self._threads.append(thread)
        return self

    def _bind(self):
        """A UDP and a TCP socket on the same port (bounded retries for port 0)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _attempt in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            udp.bind((self.host, self.requested_port))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                if self.requested_port:
                    raise
                continue
            tcp.listen(16)
            udp.settimeout(0.2)
            tcp.settimeout(0.2)
            self.port = port
            return udp, tcp
        raise OSError("no port free for both UDP and TCP")

    def stop(self):
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in self._sockets + self._hung:
            sock.close()
        self._threads, self._sockets, self._hung = [], [], []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    # -- transports ----------------------------------------------------------

    def _serve_udp(self, sock):
        while not self._stopping.is_set():
            try:
                wire, peer = sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            answer = self._answer(wire, "udp")
            if answer is not None:
                try:
                    sock.sendto(answer, peer)
                except OSError:
                    pass

    def _serve_tcp(self, sock):
        while not self._stopping.is_set():
            try:
                conn, _peer = sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._tcp_connection, args=(conn,), daemon=True)
            thread.start()

    def _tcp_connection(self, conn):
        conn.settimeout(5)
        try:
            while not self._stopping.is_set():
                header = self._read_exactly(conn, 2)
                if header is None:
                    break
                wire = self._read_exactly(conn, struct.unpack("!H", header)[0])
                if wire is None:
                    break
                answer = self._answer(wire, "tcp")
                if answer is None:        # HANG: keep the connection, say nothing
                    self._hung.append(conn)
                    return
                conn.sendall(struct.pack("!H", len(answer)) + answer)
        except OSError:
            pass
        conn.close()

    @staticmethod
    def _read_exactly(conn, count):
        data = b""
        while len(data) < count:
            chunk = conn.recv(count - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    # -- answers -------------------------------------------------------------

    def _answer(self, wire, transport):
        """The response's wire form, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        self.queries.append((question.name.to_text(omit_final_dot=True).lower(),
                             dns.rdatatype.to_text(question.rdtype), transport))
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if self._fill(response, question.name, question.rdtype) == "HANG":
            return None
        if (self.negative_ttl is not None and not response.answer
                and response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN)):
            zone = question.name.parent() if len(question.name) > 2 else question.name
            response.authority.append(dns.rrset.from_text(
                zone, self.negative_ttl, dns.rdataclass.IN, "SOA",
                f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {self.negative_ttl}"))
        limit = 65535 if transport == "tcp" else (query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    def _fill(self, response, qname, rdtype):
        """Put the answer for ``qname``/``rdtype`` (following CNAMEs) into ``response``."""
        zones = self.zones         # one snapshot: tests may replace the dict
        name = qname
        for _step in range(MAX_CHAIN):
            entry = zones.get(name.to_text(omit_final_dot=True).lower())
            if entry is None:
                if name == qname:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                return None
            if isinstance(entry, str):
                if entry == "HANG":
                    return "HANG"
                if name == qname:
                    response.set_rcode(_OUTCOMES[entry])
                return None
            cname = entry.get("CNAME")
            if cname is not None and rdtype != dns.rdatatype.CNAME:
                response.answer.append(self._rrset(name, "CNAME", [cname]))
                name = _absolute(cname)
                continue
            values = entry.get(dns.rdatatype.to_text(rdtype))
            if values:
                response.answer.append(self._rrset(name, dns.rdatatype.to_text(rdtype),
                                                   values))
            return None
        return None

    def _rrset(self, name, rdtype, values):
        if isinstance(values, str):
            values = [values]
        return dns.rrset.from_text_list(name, self.ttl, dns.rdataclass.IN, rdtype,
                                        [_rdata_text(rdtype, v) for v in values])


def main(argv):
    """``dns_server.py ZONES.json [HOST [PORT]]``: serve until killed."""
    if len(argv) < 2:
        print("usage: dns_server.py ZONES.json [HOST [PORT]]", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        zones = json.load(f)
    host = argv[2] if len(argv) > 2 else "127.0.0.1"
    port = int(argv[3]) if len(argv) > 3 else 0
    server = DNSServer(zones, host, port).start()
    print(server.port, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
