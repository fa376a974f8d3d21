"""Helpers for the real-host tests that start a host as a server process of its own
(test_http_server.py, test_browser.py): a free port, who listens on it, the processes to stop,
the end of the server's log. Standard library only."""
from __future__ import annotations

import os
import re
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_pid(port: int):
    """PID of the process listening on 127.0.0.1:port, from ``ss -ltnp``, or None."""
    try:
        out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"pid=(\d+)", out)
    return int(found.group(1)) if found else None


def server_pids(proc: subprocess.Popen, port: int) -> set:
    """The server process started with ``start_new_session=True`` and the process listening on its
    port when that one is in the server's session (ours, not a stranger on a reused port)."""
    pids = {proc.pid}
    owner = listening_pid(port)
    if owner is not None:
        try:
            if os.getsid(owner) == proc.pid:
                pids.add(owner)
        except OSError:
            pass
    return pids


def log_tail(path: str, chars: int) -> str:
    """The last ``chars`` characters of the log at ``path`` ("" when it cannot be read)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""
