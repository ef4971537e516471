"""mailappliance: a mail server for a VPS, on Twisted."""

__version__ = "0.1.0"
