"""Child process of the add-on store's fault-injection test (run as a script, not collected).

    addon_crash_child.py run KEYS_DIR ADDON_V1 ADDON_V2      (stdin: one line "0 STATE_DIR")
    addon_crash_child.py serve KEYS_DIR ADDON_V1 ADDON_V2    (stdin: lines "N STATE_DIR")

Both open the add-on store in STATE_DIR, stream ADDON_V1 in, replace it with ADDON_V2 (from
its directory), then remove it. ``run`` prints the number of durable steps taken; ``serve``
does the same once per line in a freshly forked process that its store SIGKILLs at the N-th
durable step (`m4d_test_hooks.kill_at_durable_step`), and prints "N EXITCODE" per line.
"""

from __future__ import annotations

import sys
from functools import partial

from m4d_test_hooks import killed_at_durable_step
from m4image.addon_io import iter_addon_tar
from m4image.addon_store import AddonStore
from m4image.durable import crashpoints_passed
from m4image.keys import Keyring


def run(state_dir: str, keys_dir: str, v1: str, v2: str) -> None:
    keyring = Keyring(keys_dir)
    store = AddonStore(state_dir)
    store.install_stream(iter_addon_tar(v1), keyring, lambda manifest: None)
    store.install_from_dir(v2, keyring)
    store.remove("travel")


def main(mode: str, keys_dir: str, v1: str, v2: str) -> None:
    start = crashpoints_passed()
    for line in sys.stdin:
        n, state_dir = line.split(maxsplit=1)
        if mode == "run":
            run(state_dir.strip(), keys_dir, v1, v2)
            print(crashpoints_passed() - start)
            continue
        code = killed_at_durable_step(crashpoints_passed() + int(n),
                                      partial(run, state_dir.strip(), keys_dir, v1, v2))
        print(n, code, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
