"""What admin commands print: terminal-safe text, tables, JSON.

Mail data (subjects, senders, SMTP replies, log lines) is written by
strangers. Nothing of it may reach the admin's terminal as a control
character: ``safe`` shows every C0 and C1 control, DEL and the Unicode line
and bidi controls as ``\\xNN`` / ``\\uNNNN``, so an escape sequence in a
Subject prints as text instead of driving the terminal. JSON output is
escaped the same way (``dumps``), and stays valid JSON.
"""

import json
import re

# C0 but TAB, DEL, C1; Unicode line/paragraph separators and the bidi overrides.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match):
    ch = match.group()
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value):
    """``value`` as one line of text with no control characters."""
    text = value if isinstance(value, str) else str(value)
    return _UNSAFE.sub(_escape, text)


_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str, sort_keys=False)


def dumps(value):
    """One line of JSON, control characters escaped (json does C0; C1 here)."""
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", _ENCODER.encode(value))


def table(columns, rows, width=None):
    """Lines of a plain table: ``columns`` the headings, ``rows`` tuples of
    cells (made safe). With ``width`` no line is longer (the last column is
    cut, with ``…``)."""
    cells = [[safe(c) if c is not None else "" for c in row] for row in rows]
    heads = [h.upper() for h in columns]
    sizes = [len(h) for h in heads]
    for row in cells:
        for i, cell in enumerate(row[:-1]):
            sizes[i] = max(sizes[i], len(cell))
    lines = []
    for row in [heads] + cells:
        parts = [cell.ljust(sizes[i]) for i, cell in enumerate(row[:-1])]
        line = "  ".join(parts + [row[-1]]).rstrip()
        if width and len(line) > width:
            line = line[:max(1, width - 1)] + "…"
        lines.append(line)
    return lines


def duration(seconds):
    """``3d4h``, ``2h5m``, ``12m``, ``40s``: an age or an uptime, short."""
    seconds = int(max(0, seconds or 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def size(n):
    n = int(n or 0)
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
