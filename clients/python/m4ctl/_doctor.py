"""`m4ctl doctor`: checks an installation of m4d and says how to fix what is wrong.

The operator's first stop: one line per check (`ok`, `warn` or `FAIL`, what was found and
the fix), in the order a request meets them: the configuration, the sockets and whether
the daemon answers on them, the image it serves, the trusted keys, the accelerators torch
sees, the systemd units and the state directory. Exit 0 when no check failed, 1 otherwise;
`--json` prints one JSON object per check. `--root DIR` checks an installation staged
under DIR (a DESTDIR or a container's root) instead of the running system.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import _output as out

DAEMON_USER = "m4"
ADMIN_GROUP = "m4-admin"
UNITS = ("m4d.service", "m4d-app.socket", "m4d-admin.socket")
KEYS_DIR = "/etc/m4/keys"
DEFAULT_TIMEOUT = 3.0
_LABEL = {"ok": "ok", "warn": "warn", "fail": "FAIL"}


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    check: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Account:
    """A user or group from the (possibly staged) system's passwd or group file."""

    name: str
    id: int
    members: tuple[str, ...] = ()


@dataclass
class Context:
    """What every check needs: where the system is and what its configuration says."""

    root: Path
    config_file: Path
    app_address: str | None
    admin_address: str | None
    timeout: float
    config: Any = None  # m4d.config.Config once the config check has loaded it

    def path(self, p: Path | str) -> Path:
        """A path of the checked system, seen from here (under --root)."""
        p = Path(p)
        return self.root / p.relative_to("/") if p.is_absolute() else p

    def account(self, kind: str, name: str) -> Account | None:
        """Looks a user ("passwd") or group ("group") up in the checked system."""
        if self.root == Path("/"):
            try:
                if kind == "passwd":
                    return Account(name, pwd.getpwnam(name).pw_uid)
                g = grp.getgrnam(name)
                return Account(name, g.gr_gid, tuple(g.gr_mem))
            except KeyError:
                return None
        try:
            lines = self.path(f"/etc/{kind}").read_text(encoding="utf-8").splitlines()
        except OSError:
            return None
        for line in lines:
            fields = line.split(":")
            if len(fields) >= 4 and fields[0] == name and fields[2].isdigit():
                members = tuple(m for m in fields[3].split(",") if m) if kind == "group" else ()
                return Account(name, int(fields[2]), members)
        return None

    def name_of(self, kind: str, ident: int) -> str:
        """The name of a uid ("passwd") or gid ("group") in the checked system, or the number."""
        if self.root == Path("/"):
            try:
                return pwd.getpwuid(ident).pw_name if kind == "passwd" else grp.getgrgid(ident).gr_name
            except KeyError:
                return str(ident)
        try:
            lines = self.path(f"/etc/{kind}").read_text(encoding="utf-8").splitlines()
        except OSError:
            return str(ident)
        for line in lines:
            fields = line.split(":")
            if len(fields) >= 3 and fields[2] == str(ident):
                return fields[0]
        return str(ident)


# ---- the checks ---------------------------------------------------------------------------


def check_config(ctx: Context) -> Iterable[Check]:
    try:
        from m4d.config import ConfigError, load_config
    except ImportError as exc:
        yield Check("config", "warn", f"the daemon package is not installed here ({exc}); "
                    "assuming the default settings", "install m4d (make install)")
        return
    path = ctx.path(ctx.config_file)
    try:
        # env={}: the daemon under systemd does not see this shell's M4D_* variables.
        ctx.config = load_config(path if path.exists() else Path("/dev/null"), env={})
    except ConfigError as exc:
        yield Check("config", "fail", str(exc),
                    f"edit {ctx.config_file} (every key is described in "
                    "/usr/share/m4/m4d.toml; `m4d --print-config` shows the result)")
        return
    except OSError as exc:
        yield Check("config", "fail", f"{ctx.config_file}: cannot read: {exc.strerror}",
                    "run m4ctl doctor as root, or fix the file's permissions (0644 root:root)")
        return
    if not path.exists():
        yield Check("config", "ok", f"{ctx.config_file} is absent: every setting has its "
                    "default")
        return
    import tomllib

    try:
        keys = len(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        keys = 0
    yield Check("config", "ok", f"{ctx.config_file} parses; {keys} setting(s) changed, "
                "defaults for the rest")


@dataclass(frozen=True)
class Settings:
    """What the checks need from the daemon's configuration."""

    app_socket: Path = Path("/run/m4/app.sock")
    admin_socket: Path = Path("/run/m4/admin.sock")
    app_socket_mode: int = 0o666
    admin_socket_mode: int = 0o660
    image: Path = Path("/var/lib/m4/images/default")
    state_dir: Path = Path("/var/lib/m4")
    keys_dir: Path = Path(KEYS_DIR)
    admin_group: str = ADMIN_GROUP


def _settings(ctx: Context) -> Settings:
    """The loaded config's values (its defaults when it did not load; ours without m4d)."""
    config = ctx.config
    if config is None:
        try:
            from m4d.config import Config

            config = Config()
        except ImportError:
            return Settings()
    fallback = Settings()
    if not hasattr(config, "state_dir"):  # older daemons keep state in STATE_DIR
        from m4d.config import STATE_DIR

        fallback = Settings(state_dir=STATE_DIR)
    return Settings(**{f.name: getattr(config, f.name, getattr(fallback, f.name))
                       for f in dataclasses.fields(Settings)})


def _socket_path(address: str | None, configured: Path, ctx: Context) -> tuple[str, Path | None]:
    """(gRPC target, filesystem path or None) of a socket: flag, else config (under root)."""
    if address:
        from m4client._channel import to_target

        target = to_target(address)
        for scheme in ("unix://", "unix:"):
            if target.startswith(scheme):
                return target, Path(target[len(scheme):])
        return target, None
    path = ctx.path(configured)
    return f"unix://{path}", path


def _health(target: str, timeout: float) -> tuple[str, str]:
    """("ok"|"warn"|"fail", what the health service says) for a gRPC target."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            return "fail", f"does not answer health checks ({code.name if code else 'error'})"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return "ok", "answers SERVING"
    return "warn", f"answers {name} (loading the model, or draining)"


def _mode_owner(ctx: Context, st: os.stat_result) -> str:
    """`srw-rw---- root:m4-admin`."""
    return (f"{stat.filemode(st.st_mode)} {ctx.name_of('passwd', st.st_uid)}:"
            f"{ctx.name_of('group', st.st_gid)}")


def _check_socket(ctx: Context, name: str, address: str | None, configured: Path, mode: int,
                  admin: bool) -> Iterable[Check]:
    unit = "m4d-admin.socket" if admin else "m4d-app.socket"
    target, path = _socket_path(address, configured, ctx)
    problems: list[tuple[str, str, str]] = []  # (status, detail, fix)
    where = str(path) if path else target
    if path is not None:
        try:
            st = path.stat()
        except FileNotFoundError:
            yield Check(name, "fail", f"no socket at {where}",
                        f"systemctl enable --now {unit} m4d.service")
            return
        except PermissionError:
            yield Check(name, "warn", f"cannot look at {where} as uid {os.geteuid()}",
                        "run m4ctl doctor as root")
            return
        if not stat.S_ISSOCK(st.st_mode):
            yield Check(name, "fail", f"{where} exists but is not a socket",
                        f"remove it and restart {unit}")
            return
        where = f"{where} ({_mode_owner(ctx, st)})"
        actual = stat.S_IMODE(st.st_mode)
        if actual != mode:
            # An admin socket others may open, or an app socket apps cannot open, is broken.
            broken = actual & 0o007 if admin else actual & 0o006 != 0o006
            status = "fail" if broken else "warn"
            problems.append((status, f"mode {actual:04o}, expected {mode:04o}",
                             f"set SocketMode={mode:04o} in {unit} (or the config's "
                             f"{'admin' if admin else 'app'}_socket_mode)"))
        if admin:
            admin_group = _settings(ctx).admin_group
            group = ctx.account("group", admin_group)
            if group is None:
                problems.append(("fail", f"group {admin_group} does not exist",
                                 "systemd-sysusers m4.conf, which creates m4 and m4-admin"))
            elif st.st_gid != group.id:
                problems.append(("warn", f"group is not {admin_group}, so its members cannot "
                                 "administer", "enable m4d-admin.socket (SocketGroup=m4-admin)"))
        if admin and os.geteuid() != 0 and not os.access(path, os.R_OK | os.W_OK):
            problems.append(("warn", "not checked whether it answers: you cannot use it", ""))
            yield _merge(name, where, problems)
            return
    status, said = _health(target, ctx.timeout)
    fix = "" if status == "ok" else "systemctl status m4d.service; journalctl -u m4d.service -b"
    problems.append((status, said, fix))
    yield _merge(name, where, problems)


def _merge(name: str, where: str, parts: list[tuple[str, str, str]]) -> Check:
    order = {"ok": 0, "warn": 1, "fail": 2}
    worst = max((s for s, _, _ in parts), key=order.__getitem__, default="ok")
    fixes = "; ".join(f for _, _, f in parts if f)
    return Check(name, worst, f"{where}: " + ", ".join(d for _, d, _ in parts), fixes)


def check_sockets(ctx: Context) -> Iterable[Check]:
    cfg = _settings(ctx)
    yield from _check_socket(ctx, "app socket", ctx.app_address, cfg.app_socket,
                             cfg.app_socket_mode, admin=False)
    yield from _check_socket(ctx, "admin socket", ctx.admin_address, cfg.admin_socket,
                             cfg.admin_socket_mode, admin=True)
    _, path = _socket_path(ctx.admin_address, cfg.admin_socket, ctx)
    user = pwd.getpwuid(os.geteuid()).pw_name if _has_uid(os.geteuid()) else str(os.geteuid())
    if os.geteuid() == 0:
        yield Check("admin access", "ok", "root may use the admin socket")
    elif path is not None and os.access(path, os.R_OK | os.W_OK):
        yield Check("admin access", "ok", f"{user} may use the admin socket")
    else:
        yield Check("admin access", "warn", f"{user} cannot use the admin socket "
                    "(status, image install, activate, rollback)",
                    f"sudo usermod -aG {cfg.admin_group} {user}, then log in again")


def _has_uid(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _keyring(ctx: Context) -> Any:
    """The checked system's keyring when it trusts at least one key, else None."""
    try:
        from m4image.keys import Keyring
    except ImportError:
        return None
    keyring = Keyring(ctx.path(_settings(ctx).keys_dir))
    try:
        trusted = [k for k in keyring.list() if not k.revoked]
    except Exception:  # a broken key file: the keys check reports it
        return None
    return keyring if trusted else None


def check_image(ctx: Context) -> Iterable[Check]:
    cfg = _settings(ctx)
    image, keys_dir = cfg.image, cfg.keys_dir
    path = ctx.path(image)
    try:
        from m4image.verify import ImageError, SignatureError, verify_image
    except ImportError as exc:
        yield Check("image", "warn", f"image tooling not installed ({exc}); {image} not checked")
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
    keys_dir = _settings(ctx).keys_dir
    keys = ctx.path(keys_dir)
    try:
        st = keys.stat()
    except FileNotFoundError:
        yield Check("keys", "warn", f"{keys_dir} does not exist: no image signer is trusted",
                    "systemd-tmpfiles --create m4.conf, then m4ctl keys add SIGNER.pub")
        return
    if st.st_mode & 0o022 or st.st_uid != 0:
        yield Check("keys", "fail", f"{keys_dir} is {_mode_owner(ctx, st)}: someone other "
                    "than root could add a trusted signer",
                    f"chown root:root {keys_dir} && chmod 0755 {keys_dir}")
        return
    try:
        from m4image.keys import Keyring
    except ImportError:
        found = sorted(p.name for p in keys.glob("*.pub"))
        status = "ok" if found else "warn"
        yield Check("keys", status, f"{keys_dir}: {len(found)} key file(s), not checked "
                    "(image tooling not installed)")
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


def check_accelerators(ctx: Context) -> Iterable[Check]:
    try:
        import torch
    except ImportError as exc:
        yield Check("accelerators", "warn", f"torch is not importable here ({exc})",
                    "run m4ctl from the daemon's environment (the installed m4ctl)")
        return
    try:
        from m4d.config import ConfigError
        from m4d.executor.devices import check_devices, discover
    except ImportError:  # m4ctl without the daemon package: what torch says is enough
        registry = None
    else:
        registry = discover()
    if registry is not None:
        found = [d.summary() for d in registry.devices]
    else:
        found = [f"cpu ({torch.get_num_threads()} threads)"]
        if torch.cuda.is_available():
            found += [f"cuda:{i} {torch.cuda.get_device_name(i)}"
                      for i in range(torch.cuda.device_count())]
    nodes = sorted(glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/kfd")
                   + glob.glob("/dev/dri/renderD*"))
    if nodes and len(found) == 1:
        yield Check("accelerators", "warn", f"torch {torch.__version__} sees only the CPU, "
                    f"but {', '.join(nodes)} exist", "install a torch build for the device "
                    "(CUDA, ROCm or XPU) and give m4d the device (accelerator notes in "
                    "m4d.service)")
        return
    detail = f"torch {torch.__version__}: " + "; ".join(found)
    if registry is not None and ctx.config is not None:  # placement: config, then daemon
        placement = ctx.config.placement
        try:
            check_devices(placement, registry)
        except ConfigError as exc:
            yield Check("accelerators", "fail", f"{detail}; {exc}",
                        f"edit placement in {ctx.config_file} to name a device found here")
            return
        detail += "; placement { " + ", ".join(f"{k} = {v}" for k, v in placement.items()) + " }"
        running = _running_placement(ctx)
        if running:
            detail += f"; the daemon runs {running}"
    yield Check("accelerators", "ok", detail)


def _running_placement(ctx: Context) -> str:
    """Where the running daemon placed each component (from Status), "" if unreachable."""
    try:
        from m4client import AdminClient, M4Error

        with AdminClient(ctx.admin_address, timeout=ctx.timeout) as admin:
            status = admin.status()
    except (ImportError, M4Error, OSError):
        return ""
    return ", ".join(f"{c} on {d.name}" for d in status.devices for c in d.components)


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
    state = _settings(ctx).state_dir
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
    shown = f"{state} ({_mode_owner(ctx, st)})"
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


CHECKS: tuple[Callable[[Context], Iterable[Check]], ...] = (
    check_config, check_sockets, check_image, check_keys, check_accelerators, check_units,
    check_state_dir,
)


def run_checks(ctx: Context) -> list[Check]:
    """Every check in order; a check that crashes becomes a FAIL line, not a traceback."""
    results: list[Check] = []
    for check in CHECKS:
        try:
            results.extend(check(ctx))
        except Exception as exc:  # a bug or an odd system must not hide the other checks
            name = check.__name__.removeprefix("check_").replace("_", " ")
            results.append(Check(name, "fail", f"the check itself failed: "
                                 f"{type(exc).__name__}: {exc}", "report this as a bug"))
    return results


# ---- command line ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("/etc/m4/m4d.toml"), metavar="FILE",
                   help="the daemon's config file (default /etc/m4/m4d.toml)")
    p.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                   help="check the installation under DIR (a DESTDIR or a container's root)")


DESCRIPTION = ("Check the installation: config, sockets, image, keys, accelerators, units, "
               "state directory; one line per check with the fix.")
EPILOG = "Exit codes: 0 no check failed (warnings allowed), 1 a check failed."


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()
             ) -> argparse.ArgumentParser:
    """Adds `doctor` to m4ctl's subcommands (`parents`: the parser of the global flags)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "doctor", help=DESCRIPTION, description=DESCRIPTION, epilog=EPILOG,
        parents=list(parents))
    add_arguments(p)
    p.set_defaults(handler=cmd_doctor)
    return p


def cmd_doctor(args: argparse.Namespace) -> int:
    root = Path(getattr(args, "root", None) or "/")
    timeout = getattr(args, "timeout", None) or DEFAULT_TIMEOUT
    ctx = Context(root=root, config_file=getattr(args, "config", None) or Path("/etc/m4/m4d.toml"),
                  app_address=getattr(args, "address", None) or (
                      os.environ.get("M4_ADDRESS") if root == Path("/") else None),
                  admin_address=getattr(args, "admin_address", None) or (
                      os.environ.get("M4_ADMIN_ADDRESS") if root == Path("/") else None),
                  timeout=timeout)
    results = run_checks(ctx)
    for r in results:
        if getattr(args, "json", False):
            out.write(json.dumps(asdict(r)) + "\n")
        elif r.status != "ok" or not getattr(args, "quiet", False):
            fix = f" (fix: {r.fix})" if r.fix else ""
            out.write(f"{_LABEL[r.status]:<5} {r.check:<13} {r.detail}{fix}\n")
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "warn", "fail")}
    if not getattr(args, "json", False) and not getattr(args, "quiet", False):
        out.err(f"m4ctl doctor: {counts['ok']} ok, {counts['warn']} warn, {counts['fail']} FAIL")
    return 1 if counts["fail"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m m4ctl._doctor`, the same command before it is wired into m4ctl."""
    from ._parser import Parser, _global_flags

    parser = Parser(prog="m4ctl doctor", description=DESCRIPTION, epilog=EPILOG)
    _global_flags(parser, suppress=False)
    add_arguments(parser)
    return cmd_doctor(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
