"""4. DELIVER: local Maildir delivery (maildir, local); remote delivery comes later."""
