"""The web listener pair of SPEC §8 (MTA-STS policy, client autoconfig, ACME).

``services(cfg, reactor, app, listener)`` is what the service tree adds:
the ``http`` and ``https`` listeners (when configured; through the
appliance's one gate) and, with ``[tls] acme = on``, the ACME client that
keeps ``app.tls`` (the ServerTLS every TLS listener uses) supplied with a
certificate. ``listener(name, address,
factory)`` makes a listening service (tap's Listener), so bind failures read
the same as for the mail listeners.
"""

from twisted.protocols.tls import TLSMemoryBIOFactory

from appliance.web.acme_client import AcmePool, AcmeService
from appliance.web.challenges import Challenges, WebTLS
from appliance.web.site import HttpRoot, HttpsRoot, WebSite


def services(cfg, reactor, app, listener):
    """The web services for ``cfg``, in start order; ``app`` (the Appliance
    record) gains ``challenges``, ``acme`` and the sites in ``listeners``."""
    challenges = app.challenges = Challenges()
    found = []
    if cfg.tls.acme:
        pool = AcmePool(reactor)            # first: outlives the service that uses it
        acme = app.acme = AcmeService.from_config(cfg, reactor, app.tls, challenges, pool.run)
        found += [pool, acme]
    if cfg.listen.http is not None:
        site = app.listeners["http"] = WebSite(HttpRoot(cfg, challenges), "http", cfg.limits,
                                               reactor=reactor, gate=app.gate)
        found.append(listener("http", cfg.listen.http, site))
    if cfg.listen.https is not None:
        site = app.listeners["https"] = WebSite(HttpsRoot(cfg), "https", cfg.limits,
                                                reactor=reactor, gate=app.gate)
        tls = WebTLS(app.tls, challenges)
        found.append(listener("https", cfg.listen.https, TLSMemoryBIOFactory(tls, False, site)))
    return found
