"""Another app (uid) trying someone else's session, for test_sessions.py.

Run as root: `python -m tests.integration.session_intruder ADDRESS UID SESSION_ID`. Imports
as root, drops to UID, then reads, uses, clones and deletes the session by its id; prints
one JSON line: the status code name each attempt got ("OK" if it worked).
"""

from __future__ import annotations

import json
import os
import sys

import grpc  # noqa: F401 - loaded as root: nothing is imported after the drop
from m4client import Client, M4Error, Overflow, SessionInfo, _convert, _session, _stream  # noqa: F401


def main() -> int:
    address, uid, session_id = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    codes: dict[str, str] = {}
    with Client(address, app_name="intruder", timeout=60) as m4:
        attempts = {
            "get": lambda: m4.resume_session(session_id),
            "turn": lambda: _session.Session(m4, _fake(session_id)).respond("hi", max_tokens=2),
            "clone": lambda: _session.Session(m4, _fake(session_id)).clone(),
            "delete": lambda: _session.Session(m4, _fake(session_id)).delete(),
        }
        for name, attempt in attempts.items():
            try:
                attempt()
                codes[name] = "OK"
            except M4Error as exc:
                codes[name] = exc.code
    print(json.dumps({"uid": os.getuid(), **codes}))
    return 0


def _fake(session_id: str) -> SessionInfo:
    """A handle on a session this app did not make (the id is all a handle needs)."""
    return SessionInfo(session_id, "chat", [], 0, 0, [], Overflow.FAIL)


if __name__ == "__main__":
    sys.exit(main())
