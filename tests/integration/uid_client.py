"""A real m4client caller running as another uid, for test_identity_uid.py.

Run as root: `python -m tests.integration.uid_client ADDRESS UID APP PRIORITY N`. It imports
everything it needs while still root (the interpreter and the venv live where the target
uid may not read), drops to UID (groups, gid, then uid: no way back), connects to the app
socket only then, so the kernel records UID for the connection, and makes N greedy
generations claiming app name APP in the m4-app-name metadata. Prints one JSON line: the
uid it ran as, the prompt and completion tokens the daemon reported for its calls and the
seconds the slowest call took (from its request to its last token).
"""

from __future__ import annotations

import json
import os
import sys
import time

import grpc  # noqa: F401 - loaded as root: nothing is imported after the drop
from m4client import Client, GenerationResult, _convert, _stream  # noqa: F401 - the lazy parts of the client

PROMPTS = ["The colour of the sky is", "A good breakfast has", "Trains are useful because",
           "In winter the trees", "The best thing about books is"]


def main() -> int:
    address, uid, app, priority, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], \
        int(sys.argv[5])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        print(json.dumps({"error": f"still uid {os.getuid()}"}))
        return 1
    prompt_tokens = completion_tokens = 0
    slowest = 0.0
    with Client(address, app_name=app, timeout=120) as client:
        for i in range(n):
            began = time.monotonic()
            result: GenerationResult = client.complete(
                PROMPTS[i % len(PROMPTS)], max_tokens=8, temperature=0.0, priority=priority)
            slowest = max(slowest, time.monotonic() - began)
            prompt_tokens += result.usage.prompt_tokens
            completion_tokens += result.usage.completion_tokens
    print(json.dumps({"uid": os.getuid(), "calls": n, "prompt_tokens": prompt_tokens,
                      "completion_tokens": completion_tokens, "seconds": slowest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
