"""2. CHECK: what is done to a message between receiving and queueing it.

DKIM signing of outgoing mail (``dkim_sign``, keys in ``keys``) and the
inbound SPF / DKIM / DMARC checks live here.
"""
