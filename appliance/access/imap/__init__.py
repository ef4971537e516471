"""IMAP4rev1 over the Maildirs: ``server`` (the protocol), ``mailbox`` (IAccount/IMailbox, FETCH and SEARCH), ``syntax``, ``mime``, ``search``."""
