"""Mailbox access: IMAP4 and POP3 over the Maildirs that delivery writes."""
