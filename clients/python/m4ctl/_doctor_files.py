"""`m4ctl doctor`'s checks of what is installed on disk: the image the daemon serves, the keyring
of trusted signers, the systemd units and the state directory.

The image and the keyring are verified with the image format's own code (`m4image`, from
the daemon's distribution) where it is installed; with the light client alone, the image
check says what the daemon serves and the keyring check counts its key files.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ._doctor_daemon import mode_owner, socket_target
from ._doctor_system import DAEMON_USER, Check, Context

UNITS = ("m4d.service", "m4d-app.socket", "m4d-admin.socket")
NO_TOOLING = "the image tooling (m4image, from the mobilefm distribution) is not installed here"


def _keyring(ctx: Context) -> Any:
    """The checked system's keyring when it trusts at least one key, else None."""
    try:
        from m4image.keys import Keyring
    except ImportError:
        return None
    keyring = Keyring(ctx.path(ctx.settings().keys_dir))
    try:
        trusted = [k for k in keyring.list() if not k.revoked]
    except Exception:  # a broken key file: the keys check reports it
        return None
    return keyring if trusted else None


def check_image(ctx: Context) -> Iterable[Check]:
    s = ctx.settings()
    image, keys_dir = s.image, s.keys_dir
    path = ctx.path(image)
    try:
        from m4image.verify import ImageError, SignatureError, verify_image
    except ImportError:
        status = ctx.daemon_status(socket_target(ctx, admin=True)[0])
        serves = (f"; the daemon serves {status.image_name} {status.image_version} (digest "
                  f"{status.image_digest[:12]}), verified when it loaded" if status else "")
        yield Check("image", "warn", f"{image} not checked: {NO_TOOLING}{serves}",
                    "run m4ctl doctor where m4d is installed (its m4ctl)")
        return
    if not path.exists() and not path.is_symlink():
        yield Check("image", "fail", f"{image} does not exist",
                    "systemd-tmpfiles --create m4.conf, which copies the factory image there; "
                    f"or m4ctl image build --default -o {image}")
        return
    keyring = _keyring(ctx)
    unsigned = ""
    try:
        try:
            verified = verify_image(path, keyring=keyring)
        except SignatureError as exc:  # the files may still be intact: say which is wrong
            verified = verify_image(path)
            unsigned = str(exc)
    except PermissionError as exc:
        yield Check("image", "warn", f"{image}: cannot read as uid {os.geteuid()} ({exc})",
                    "run m4ctl doctor as root")
        return
    except ImageError as exc:
        yield Check("image", "fail", f"{image}: {exc}",
                    f"m4ctl image build --default --force -o {image}")
        return
    m = verified.manifest
    what = f"{image}: {m.name} {m.version} (digest {verified.digest[:12]})"
    unreadable = _unreadable_by_daemon(ctx, path)
    if unreadable:
        yield Check("image", "fail", f"{what} verifies, but user {DAEMON_USER} cannot read "
                    f"{unreadable}", f"chmod -R a+rX {image}")
    elif unsigned:
        yield Check("image", "warn", f"{what}: every file verifies but not the signature "
                    f"against {keys_dir}: {unsigned}",
                    f"m4ctl image sign {image} --key KEY.key with a key the keyring trusts")
    elif verified.signed_by:
        yield Check("image", "ok", f"{what} verified, signed by {verified.signed_by}")
    else:
        yield Check("image", "ok", f"{what} verified (unsigned; {keys_dir} trusts no key)")


def _unreadable_by_daemon(ctx: Context, image: Path) -> str:
    """The first file or directory of the image that user m4 could not read, or ""."""
    user = ctx.account("passwd", DAEMON_USER)
    if user is None:
        return ""
    group = ctx.account("group", DAEMON_USER)

    def allowed(st: os.stat_result, need: int) -> bool:  # need: 4 read, 5 read + search
        if st.st_uid == user.id:
            return (st.st_mode >> 6) & need == need
        if group is not None and st.st_gid == group.id:
            return (st.st_mode >> 3) & need == need
        return st.st_mode & need == need

    for dirpath, dirnames, filenames in os.walk(image):
        if not allowed(os.stat(dirpath), 5):
            return os.path.relpath(dirpath, image) + "/"
        for f in filenames:
            if not allowed(os.stat(os.path.join(dirpath, f)), 4):
                return os.path.relpath(os.path.join(dirpath, f), image)
        dirnames.sort()
    return ""


def check_keys(ctx: Context) -> Iterable[Check]:
    keys_dir = ctx.settings().keys_dir
    keys = ctx.path(keys_dir)
    try:
        st = keys.stat()
    except FileNotFoundError:
        yield Check("keys", "warn", f"{keys_dir} does not exist: no image signer is trusted",
                    "systemd-tmpfiles --create m4.conf, then m4ctl keys add SIGNER.pub")
        return
    if st.st_mode & 0o022 or st.st_uid != 0:
        yield Check("keys", "fail", f"{keys_dir} is {mode_owner(ctx, st)}: someone other "
                    "than root could add a trusted signer",
                    f"chown root:root {keys_dir} && chmod 0755 {keys_dir}")
        return
    try:
        from m4image.keys import Keyring
    except ImportError:
        found = sorted(p.name for p in keys.glob("*.pub"))
        yield Check("keys", "ok" if found else "warn", f"{keys_dir}: {len(found)} key "
                    f"file(s), not checked ({NO_TOOLING})")
        return
    try:
        listed = Keyring(keys).list()
    except Exception as exc:  # KeyringError names the file
        yield Check("keys", "fail", f"{keys_dir}: {exc}",
                    "remove or replace the file; m4ctl keys add SIGNER.pub writes a good one")
        return
    trusted = [k.key_id for k in listed if not k.revoked]
    revoked = len(listed) - len(trusted)
    more = f" ({revoked} revoked)" if revoked else ""
    if not trusted:
        yield Check("keys", "warn", f"{keys_dir} trusts no key{more}: signed images cannot "
                    "be verified", "m4ctl keys add SIGNER.pub")
        return
    yield Check("keys", "ok", f"{keys_dir} trusts {len(trusted)} key(s): "
                + ", ".join(trusted) + more)


def _systemctl(root: Path | None, *args: str) -> str:
    """The first line systemctl prints; root=None asks the running systemd."""
    cmd = ["systemctl", *([f"--root={root}"] if root is not None else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    text = done.stdout.strip() or done.stderr.strip()
    return text.splitlines()[0] if text else ""


def check_units(ctx: Context) -> Iterable[Check]:
    if shutil.which("systemctl") is None:
        yield Check("units", "warn", "systemctl not found: the systemd units cannot be checked",
                    "run m4d by hand, or install systemd")
        return
    live = ctx.root == Path("/") and os.path.isdir("/run/systemd/system")
    offline_root = None if live else ctx.root  # no running systemd: read the unit files
    states = {}
    for unit in UNITS:
        state = _systemctl(offline_root, "is-enabled", unit)
        states[unit] = "not-found" if ("No such file" in state or "not found" in state) else state
    missing = [u for u, s in states.items() if s == "not-found"]
    if missing:
        yield Check("units", "warn", f"not installed: {', '.join(missing)}",
                    "make install, or run m4d by hand")
        return
    disabled = [u for u, s in states.items() if s != "enabled"]
    if disabled:
        yield Check("units", "warn", "not enabled: " + ", ".join(
            f"{u} ({states[u]})" for u in disabled), "systemctl enable --now m4d.service")
        return
    if not live:
        yield Check("units", "ok", "installed and enabled (systemd is not running here: "
                    "not checked whether they run)")
        return
    active = {u: _systemctl(None, "is-active", u) for u in UNITS}
    failed = [u for u, s in active.items() if s == "failed"]
    if failed:
        yield Check("units", "fail", "failed: " + ", ".join(failed),
                    f"journalctl -b -u {failed[0]}; then systemctl reset-failed {failed[0]} && "
                    f"systemctl start {failed[0]}")
        return
    waiting = [f"{u} ({s})" for u, s in active.items() if s != "active"]
    if waiting:
        yield Check("units", "warn", "enabled but not running: " + ", ".join(waiting),
                    "systemctl start m4d.service")
        return
    yield Check("units", "ok", "enabled and running: " + ", ".join(UNITS))


def check_state_dir(ctx: Context) -> Iterable[Check]:
    state = ctx.settings().state_dir
    path = ctx.path(state)
    user = ctx.account("passwd", DAEMON_USER)
    if user is None:
        yield Check("state dir", "fail", f"user {DAEMON_USER} does not exist",
                    "systemd-sysusers m4.conf, which creates m4 and m4-admin")
        return
    try:
        st = path.stat()
    except FileNotFoundError:
        yield Check("state dir", "fail", f"{state} does not exist",
                    "systemd-tmpfiles --create m4.conf")
        return
    mode = stat.S_IMODE(st.st_mode)
    shown = f"{state} ({mode_owner(ctx, st)})"
    if st.st_uid != user.id:
        yield Check("state dir", "fail", f"{shown} is not owned by {DAEMON_USER}",
                    f"chown -R {DAEMON_USER}:{DAEMON_USER} {state}, or restart m4d.service")
    elif mode & 0o002:
        yield Check("state dir", "fail", f"{shown} is writable by everyone",
                    f"chmod 0750 {state}")
    elif mode & 0o027:
        yield Check("state dir", "warn", f"{shown}: other users can look into the image store",
                    f"chmod 0750 {state}")
    elif not (path / "images").is_dir():
        yield Check("state dir", "warn", f"{shown}: no images/ directory",
                    "systemd-tmpfiles --create m4.conf")
    else:
        yield Check("state dir", "ok", shown)
