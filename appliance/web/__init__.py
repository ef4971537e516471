"""The web listener pair of SPEC §8 (MTA-STS policy, client autoconfig, ACME).

``services(cfg, reactor, parts, listener)`` is what the service tree adds:
the ``http`` and ``https`` listeners (when configured) and, with ``[tls]
acme = on``, the ACME client that keeps ``parts["tls"]`` (the ServerTLS every
TLS listener uses) supplied with a certificate. ``listener(name, address,
factory)`` makes a listening service (tap's Listener), so bind failures read
the same as for the mail listeners.
"""

from twisted.protocols.tls import TLSMemoryBIOFactory

from appliance.web.acme_client import AcmePool, AcmeService
from appliance.web.challenges import Challenges, WebTLS
from appliance.web.site import HttpRoot, HttpsRoot, WebSite


def services(cfg, reactor, parts, listener):
    """The web services for ``cfg``, in start order; ``parts`` gains
    ``challenges``, ``http``/``https`` (the sites) and ``acme``."""
    challenges = parts["challenges"] = Challenges()
    found = []
    if cfg.tls.acme:
        pool = AcmePool(reactor)            # first: outlives the service that uses it
        acme = parts["acme"] = AcmeService.from_config(cfg, reactor, parts["tls"], challenges,
                                                       pool.run)
        found += [pool, acme]
    if cfg.listen.http is not None:
        site = parts["http"] = WebSite(HttpRoot(cfg, challenges), "http", cfg.limits,
                                       reactor=reactor)
        found.append(listener("http", cfg.listen.http, site))
    if cfg.listen.https is not None:
        site = parts["https"] = WebSite(HttpsRoot(cfg), "https", cfg.limits, reactor=reactor)
        tls = parts["web_tls"] = WebTLS(parts["tls"], challenges)
        found.append(listener("https", cfg.listen.https, TLSMemoryBIOFactory(tls, False, site)))
    return found
