"""twistd plugin: `twistd mailappliance`. Imports nothing heavy until used."""
from twisted.application.service import ServiceMaker

mailappliance = ServiceMaker(
    "mailappliance",
    "appliance.tap",
    "A complete mail server: ESMTP, queue, Maildir, IMAP, POP3",
    "mailappliance",
)
