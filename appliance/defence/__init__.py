"""Defences (SPEC §4 "Defences"): bans, rate and connection limits, AUTH
failure tracking, greylisting and junk-command counting, enforced inside the
server.

- ``state``: ``IDefenceState`` and ``LocalState`` (persisted in data_dir);
- ``network``: the client network keys (IPv4 /32, IPv6 /ipv6_prefix,
  greylisting /24), ::ffff:-mapped addresses normalised;
- ``bans``: ``Bans`` (ban, unban, list, is_banned, escalation, expiry);
- ``authfail``: ``AuthGuard`` (failures per network, bans, account attacks);
- ``rates``: ``Rates`` (connections per minute, messages per hour);
- ``greylist``: ``Greylist``;
- ``junk``: ``JunkCounter``;
- ``admission``: ``Admission``, what the gate asks at connect, and the
  registry of open sessions a ban closes;
- ``service``: ``Defences`` (all of the above built from the config) and
  ``DefenceService`` (loads the state before the listeners open).
"""
