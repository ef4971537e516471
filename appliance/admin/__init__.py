"""The admin command set and its three doors: SSH (one-shot and interactive),
the control socket that ``mailappliance COMMAND`` uses, and the offline CLI.

- ``commands``: every command, its arguments, help, read-only flag, output;
- ``output``: tables, JSON, terminal-safe text;
- ``keys``: the ``authorized_keys`` reader (OpenSSH options, roles);
- ``ssh``: the Conch server (keys only, pinned algorithms, deadlines);
- ``shell``: the interactive and line shells on an SSH session;
- ``control``: the UNIX control socket, server and client;
- ``service``: the services ``tap.py`` adds (``admin_services``).
"""
