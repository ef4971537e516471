"""What every listener shares beneath its protocol: the gate every connection
passes at connect (``gate``), client addresses (``peer``), CRLF framing and the
one-command-at-a-time line session (``framing``, ``session``), same-turn
replies (``write``) and the server TLS context (``tls``)."""
