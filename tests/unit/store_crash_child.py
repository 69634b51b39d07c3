"""Child process of the store's fault-injection test (run as a script, not collected).

    store_crash_child.py run STATE_DIR KEYS_DIR IMAGE_B IMAGE_C
    store_crash_child.py serve KEYS_DIR IMAGE_B IMAGE_C     (stdin: lines "N STATE_DIR")

``run`` opens the store (whose active image is A), then: streams image B in, activates it,
boots it (counting the attempt), marks it good, rolls back to A, installs C from its
directory and removes it again; it prints the number of durable steps taken.

``serve`` does the same once per input line, each time in a freshly forked process whose
store SIGKILLs it at its N-th durable step (`m4d_test_hooks.kill_at_durable_step`, from
tests/hooks on PYTHONPATH); it prints "N EXITCODE" per line. Forking saves an interpreter start per crash point; every
crash is still a real process killed by SIGKILL in the middle of real file-system work.
"""

from __future__ import annotations

import sys
from functools import partial

from m4d_test_hooks import killed_at_durable_step
from m4image.durable import crashpoints_passed
from m4image.keys import Keyring
from m4image.store import Store
from m4image.tarstream import iter_image_tar


def run(state_dir: str, keys_dir: str, image_b: str, image_c: str) -> None:
    keyring = Keyring(keys_dir)
    store = Store(state_dir, compatible="m4-cpu-v1", daemon_version="0.1.0")
    b = store.install_stream(iter_image_tar(image_b, chunk=1024), keyring)
    store.activate(b)
    store.select_for_boot(3)
    store.mark_good(b)
    store.rollback(allow_downgrade=True)
    c = store.install_from_dir(image_c, keyring, allow_downgrade=True)
    store.remove(c)


def serve(keys_dir: str, image_b: str, image_c: str) -> None:
    for line in sys.stdin:
        n, state_dir = line.split(maxsplit=1)
        code = killed_at_durable_step(int(n), partial(run, state_dir.strip(), keys_dir,
                                                          image_b, image_c))
        print(n, code, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(*sys.argv[2:6])
        print(crashpoints_passed())
    else:
        serve(*sys.argv[2:5])
