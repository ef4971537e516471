"""The two twisted.web sites (SPEC §8): what a mail domain needs over HTTP, nothing else.

``https``:

- ``GET /.well-known/mta-sts.txt`` on ``mta-sts.DOMAIN``: our MTA-STS policy;
- ``GET /mail/config-v1.1.xml`` (also under ``/.well-known/autoconfig/``):
  Thunderbird's autoconfig, for the domain of ``?emailaddress=`` or of the
  ``autoconfig.DOMAIN`` name asked for, else the first local domain;
- ``POST /autodiscover/autodiscover.xml`` (any case, any name served):
  Outlook's autodiscover for the EMailAddress in the body;

everything else is 404. ``http`` answers ACME http-01 at
``/.well-known/acme-challenge/TOKEN`` and redirects every other request to
the same name and path on ``https``.

Bounds: the request line and headers 16 KiB (more: 400), a body 64 KiB
(more: 413, connection closed), 15 s without a byte and 60 s for a whole
connection. Each connection passes the listener's gate first (deny list,
per-IP connection limit, as on the mail listeners); a refused one is closed
without a response.
"""

from urllib.parse import parse_qs, urlsplit

from twisted.logger import Logger
from twisted.web import http, resource, server

from appliance import events
from appliance.net.gate import DENIED, GatedFactory
from appliance.web import clientconfig
from appliance.web.policy import policy_text
from appliance.clock import cancel

MAX_HEADERS = 16 * 1024
MAX_BODY = 64 * 1024
IDLE_TIMEOUT = 15.0
CONNECTION_LIFETIME = 60.0

_log = Logger()

events.register("web.request", "the web listener answered a request",
                ("listener", "peer_ip", "host", "method", "path", "code"))
events.register("web.refused", "a web connection was refused at connect (deny list or "
                "per-IP connection limit) or for an oversized body",
                ("listener", "peer_ip", "reason"))


class BoundedRequest(server.Request):
    """A request whose body may not exceed MAX_BODY."""

    _body_size = 0

    def handleContentChunk(self, data):
        if self.channel is None or getattr(self.channel, "_refused", False):
            return
        self._body_size += len(data)
        if self._body_size > MAX_BODY:
            self.channel.refuse(413, b"Payload Too Large", "body_too_large")
            return
        super().handleContentChunk(data)


class BoundedChannel(http.HTTPChannel):
    """HTTP/1.1 with the size and time bounds, let in by the site's gate."""

    totalHeadersSize = MAX_HEADERS
    maxHeaders = 100
    peer_ip = ""
    _refused = False
    _lifetime = None

    def connectionMade(self):
        self.peer_ip = getattr(self.transport.getPeer(), "host", "")
        if self.factory.admit(self) is not None:
            self._refused = True
            self.transport.abortConnection()
            return
        super().connectionMade()
        self._lifetime = self.callLater(CONNECTION_LIFETIME, self._too_long)

    def dataReceived(self, data):
        if not self._refused:
            super().dataReceived(data)

    def _too_long(self):
        self._lifetime = None
        self.transport.abortConnection()

    def refuse(self, code, phrase, reason):
        """Answer ``code`` and close (a body over the limit)."""
        self._refused = True
        events.emit("web.refused", listener=self.factory.listener, peer_ip=self.peer_ip,
                    reason=reason)
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n" % (code, phrase))
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self._lifetime = cancel(self._lifetime)
        self.factory.release(self)
        super().connectionLost(reason)


class WebSite(server.Site):
    """A Site behind the appliance's one gate, logging each request as an event.

    The gate is used as the mail listeners' GatedFactory uses it (its
    ``admit``/``release``; a Site cannot also be one: both build protocols).
    """

    noisy = False
    protocol = BoundedChannel

    def __init__(self, root, listener, limits, reactor=None, gate=None):
        super().__init__(root, requestFactory=BoundedRequest, timeout=IDLE_TIMEOUT,
                         reactor=reactor)
        self.listener = listener
        GatedFactory.use_gate(self, gate, limits)

    admit = GatedFactory.admit
    release = GatedFactory.release
    connections = GatedFactory.connections

    def refusal(self, session, verdict):
        events.emit("web.refused", listener=self.listener, peer_ip=session.peer_ip,
                    reason="denied" if verdict == DENIED else "connections_per_ip")
        return verdict

    def log(self, request):
        events.emit("web.request", listener=self.listener,
                    peer_ip=getattr(request.getClientAddress(), "host", ""),
                    host=request_host(request), method=_text(request.method),
                    path=_text(request.path)[:200], code=request.code)


def _text(data):
    return data.decode("ascii", "replace") if isinstance(data, bytes) else str(data)


def request_host(request):
    """The Host header without the port, lower-case, or "" if missing or not a name."""
    raw = request.getHeader(b"host") or b""
    host = _text(raw).strip().lower()
    if host.startswith("["):
        return ""
    host = host.rpartition(":")[0] if ":" in host else host
    host = host.rstrip(".")
    if not host or len(host) > 253 or not all(c.isalnum() or c in "-." for c in host):
        return ""
    return host


def _plain(request, code, text):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return text.encode("utf-8") + b"\n"


class HttpsRoot(resource.Resource):
    """Everything the https listener serves (see the module docstring)."""

    isLeaf = True

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def render(self, request):
        request.setHeader(b"x-content-type-options", b"nosniff")
        path = _text(request.path).lower()
        method = request.method
        if path == "/.well-known/mta-sts.txt":
            return self._only(request, method, b"GET", self._mta_sts)
        if path in ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml"):
            return self._only(request, method, b"GET", self._autoconfig)
        if path == "/autodiscover/autodiscover.xml":
            return self._only(request, method, b"POST", self._autodiscover)
        return _plain(request, 404, "Not found")

    def _only(self, request, method, allowed, handler):
        if method == allowed or (allowed == b"GET" and method == b"HEAD"):
            return handler(request)
        request.setHeader(b"allow", allowed)
        return _plain(request, 405, "Method not allowed")

    def _mta_sts(self, request):
        host = request_host(request)
        prefix, _, domain = host.partition(".")
        if (not self.cfg.mta_sts_published or prefix != "mta-sts"
                or clientconfig.local_domain_of(self.cfg, "x@" + domain) is None):
            return _plain(request, 404, "Not found")
        request.setHeader(b"content-type", b"text/plain")
        request.setHeader(b"cache-control", b"max-age=3600")
        return policy_text(self.cfg).encode("ascii")

    def _autoconfig(self, request):
        domain = None
        query = parse_qs(_text(urlsplit(request.uri).query))
        address = (query.get("emailaddress") or [""])[0]
        if address:
            domain = clientconfig.local_domain_of(self.cfg, address)
        if domain is None:
            host = request_host(request)
            if host.startswith("autoconfig."):
                domain = clientconfig.local_domain_of(self.cfg, "x@" + host[11:])
        if domain is None:
            domain = self.cfg.server.domains[0]
        request.setHeader(b"content-type", b"application/xml; charset=utf-8")
        return clientconfig.thunderbird_xml(self.cfg, domain)

    def _autodiscover(self, request):
        try:
            address = clientconfig.autodiscover_address(request.content.read(MAX_BODY + 1))
        except clientconfig.BadRequest as exc:
            return _plain(request, 400, f"Bad request: {exc}")
        if clientconfig.local_domain_of(self.cfg, address) is None:
            return _plain(request, 404, "Not a domain of this server")
        request.setHeader(b"content-type", b"application/xml; charset=utf-8")
        return clientconfig.outlook_xml(self.cfg, address)


class HttpRoot(resource.Resource):
    """ACME http-01, and a redirect to https for everything else."""

    isLeaf = True
    CHALLENGE_PREFIX = "/.well-known/acme-challenge/"

    def __init__(self, cfg, challenges):
        super().__init__()
        self.cfg = cfg
        self.challenges = challenges

    def render(self, request):
        path = _text(request.path)
        if path.startswith(self.CHALLENGE_PREFIX):
            token = path[len(self.CHALLENGE_PREFIX):]
            answer = self.challenges.http01(token) if token else None
            if answer is None:
                return _plain(request, 404, "Not found")
            request.setHeader(b"content-type", b"application/octet-stream")
            return answer.encode("ascii")
        https = self.cfg.listen.https
        if https is None:
            return _plain(request, 404, "Not found")
        host = request_host(request) or self.cfg.server.hostname
        port = "" if https.port == 443 else f":{https.port}"
        uri = _text(request.uri)
        if not uri.startswith("/"):
            uri = "/"
        request.setResponseCode(301)
        request.setHeader(b"location", f"https://{host}{port}{uri}".encode("ascii", "replace"))
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Moved to https\n"
