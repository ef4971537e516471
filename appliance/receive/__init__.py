"""1. RECEIVE: the ESMTP server shared by the SMTP listeners.

``smtp`` (protocol and factory), ``framing`` (CRLF-only lines, DATA body),
``policy`` (who may send what to whom), ``replies`` (every reply),
``received`` (our trace header).
"""
