"""The auditor: an IDS over the server's own event stream (SPEC §4 "The auditor").

- ``rules``: the rule engine (``Engine``, ``Settings``, ``Finding``), fed typed
  event records; no clock, no I/O.
- ``service``: ``AuditService``, the engine as an observer of the event
  publisher (live), and ``QueueWatch`` (``queue.stale``).
- ``replay``: the same engine over log files (``mailappliance audit``).
- ``actions``: ``IActions`` (ban, hold), ``Actions``, ``Holds`` (the queue).
- ``alerts``: ``AlertStore`` (data_dir), ``Digest`` (mail), ``Webhook``.
"""
