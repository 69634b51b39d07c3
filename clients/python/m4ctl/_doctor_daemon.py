"""`m4ctl doctor`'s checks of the daemon's side of the installation: its config file, its two
sockets and whether it answers on them, who may administer it, and the devices it runs on.

The config is read with tomllib and checked against the documented keys (see
`_doctor_system`); the sockets are asked the standard gRPC health question; the devices come
from the daemon's Admin Status, or, when it does not answer, from /proc/cpuinfo and the
accelerators' device nodes.
"""

from __future__ import annotations

import glob
import os
import pwd
import stat
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
from m4client import _health
from m4client._channel import to_target

from ._doctor_system import Check, Context, config_problems

CONFIG_FIX = ("every key is described in /usr/share/m4/m4d.toml; `m4d --print-config` "
              "checks every value")
# CPU features m4's kernels and compute dtypes choose by (x86 flags, ARM features).
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                "amx_int8", "asimddp", "i8mm", "bf16")
# Device nodes per placement device kind: what must exist for the daemon to have the device.
NODES = {"cuda": ("/dev/nvidia[0-9]*", "/dev/kfd"), "xpu": ("/dev/dri/renderD*",), "mps": ()}


def check_config(ctx: Context) -> Iterable[Check]:
    path = ctx.path(ctx.config_file)
    if not path.exists():
        yield Check("config", "ok", f"{ctx.config_file} is absent: every setting has its "
                    "default")
        return
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        yield Check("config", "fail", f"{ctx.config_file}: cannot read: {exc.strerror}",
                    "run m4ctl doctor as root, or fix the file's permissions (0644 root:root)")
        return
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        yield Check("config", "fail", f"{ctx.config_file}: not TOML: {exc}",
                    f"edit {ctx.config_file} ({CONFIG_FIX})")
        return
    known = ctx.reference()
    problems = config_problems(values, known) if known else []
    if problems:
        yield Check("config", "fail", f"{ctx.config_file}: " + "; ".join(problems),
                    f"edit {ctx.config_file} ({CONFIG_FIX})")
        return
    ctx.config = values
    detail = (f"{ctx.config_file} parses; {len(values)} setting(s) changed, defaults for "
              "the rest")
    if known or not values:
        yield Check("config", "ok", detail)
    else:
        yield Check("config", "warn", f"{detail}; key names not checked: no reference config "
                    "(/usr/share/m4/m4d.toml) documents them", "m4d --print-config checks "
                    "the file as the daemon will read it")


# ---- sockets ----------------------------------------------------------------------------------


def socket_target(ctx: Context, admin: bool) -> tuple[str, Path | None]:
    """(gRPC target, filesystem path or None) of a socket: the flag, else the config's path
    (under --root)."""
    address = ctx.admin_address if admin else ctx.app_address
    if address:
        target = to_target(address)
        for scheme in ("unix://", "unix:"):
            if target.startswith(scheme):
                return target, Path(target[len(scheme):])
        return target, None
    s = ctx.settings()
    path = ctx.path(s.admin_socket if admin else s.app_socket)
    return f"unix://{path}", path


def _health_of(target: str, timeout: float) -> tuple[str, str]:
    """("ok"|"warn"|"fail", what the health service says) for a gRPC target."""
    with grpc.insecure_channel(target) as channel:
        try:
            status = _health.check(channel, timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            return "fail", f"does not answer health checks ({code.name if code else 'error'})"
    if status == _health.SERVING:
        return "ok", "answers SERVING"
    name = _health.STATUS_NAMES.get(status, str(status))
    return "warn", f"answers {name} (loading the model, or draining)"


def mode_owner(ctx: Context, st: os.stat_result) -> str:
    """`srw-rw---- root:m4-admin`."""
    return (f"{stat.filemode(st.st_mode)} {ctx.name_of('passwd', st.st_uid)}:"
            f"{ctx.name_of('group', st.st_gid)}")


def _check_socket(ctx: Context, admin: bool) -> Iterable[Check]:
    name, unit = ("admin socket", "m4d-admin.socket") if admin else ("app socket",
                                                                     "m4d-app.socket")
    s = ctx.settings()
    mode = s.admin_socket_mode if admin else s.app_socket_mode
    target, path = socket_target(ctx, admin)
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
        where = f"{where} ({mode_owner(ctx, st)})"
        actual = stat.S_IMODE(st.st_mode)
        if actual != mode:
            # An admin socket others may open, or an app socket apps cannot open, is broken.
            broken = actual & 0o007 if admin else actual & 0o006 != 0o006
            problems.append(("fail" if broken else "warn",
                             f"mode {actual:04o}, expected {mode:04o}",
                             f"set SocketMode={mode:04o} in {unit} (or the config's "
                             f"{'admin' if admin else 'app'}_socket_mode)"))
        if admin:
            group = ctx.account("group", s.admin_group)
            if group is None:
                problems.append(("fail", f"group {s.admin_group} does not exist",
                                 "systemd-sysusers m4.conf, which creates m4 and m4-admin"))
            elif st.st_gid != group.id:
                problems.append(("warn", f"group is not {s.admin_group}, so its members "
                                 "cannot administer", "enable m4d-admin.socket "
                                 "(SocketGroup=m4-admin)"))
        if admin and os.geteuid() != 0 and not os.access(path, os.R_OK | os.W_OK):
            problems.append(("warn", "not checked whether it answers: you cannot use it", ""))
            yield _merge(name, where, problems)
            return
    status, said = _health_of(target, ctx.timeout)
    fix = "" if status == "ok" else "systemctl status m4d.service; journalctl -u m4d.service -b"
    problems.append((status, said, fix))
    yield _merge(name, where, problems)


def _merge(name: str, where: str, parts: list[tuple[str, str, str]]) -> Check:
    order = {"ok": 0, "warn": 1, "fail": 2}
    worst = max((s for s, _, _ in parts), key=order.__getitem__, default="ok")
    fixes = "; ".join(f for _, _, f in parts if f)
    return Check(name, worst, f"{where}: " + ", ".join(d for _, d, _ in parts), fixes)


def check_sockets(ctx: Context) -> Iterable[Check]:
    yield from _check_socket(ctx, admin=False)
    yield from _check_socket(ctx, admin=True)
    _, path = socket_target(ctx, admin=True)
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    if uid == 0:
        yield Check("admin access", "ok", "root may use the admin socket")
    elif path is not None and os.access(path, os.R_OK | os.W_OK):
        yield Check("admin access", "ok", f"{user} may use the admin socket")
    else:
        yield Check("admin access", "warn", f"{user} cannot use the admin socket "
                    "(status, image install, activate, rollback)",
                    f"sudo usermod -aG {ctx.settings().admin_group} {user}, then log in again")


# ---- devices ----------------------------------------------------------------------------------


def cpu_summary(cpuinfo: str) -> str:
    """`cpu: MODEL, N threads, FEATURES` from /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    threads = 0
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        threads += key == "processor"
        fields.setdefault(key, value)
    model = fields.get("model name") or fields.get("Hardware") or "unknown model"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    features = " ".join(f for f in CPU_FEATURES if f in flags) or "no SIMD features m4 uses"
    return f"cpu: {model}, {threads or os.cpu_count()} threads, {features}"


def _device(d: Any) -> str:
    size = f"{d.cores} cores" if d.cores else f"{d.memory_bytes / 2**30:.1f} GiB"
    return f"{d.name} ({', '.join(x for x in (d.description, size, ' '.join(d.flags)) if x)})"


def device_nodes() -> list[str]:
    return sorted({n for patterns in NODES.values() for p in patterns for n in glob.glob(p)})


def check_accelerators(ctx: Context) -> Iterable[Check]:
    placement = ctx.settings().placement
    nodes = device_nodes()
    status = ctx.daemon_status(socket_target(ctx, admin=True)[0])
    shown = "placement { " + ", ".join(f"{k} = {v}" for k, v in placement.items()) + " }"
    fix = f"edit placement in {ctx.config_file} to name a device found here"
    if status is None or not status.devices:
        try:
            cpu = cpu_summary(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
        except OSError:
            cpu = f"cpu: {os.cpu_count()} threads"
        detail = f"{cpu}; the daemon does not answer Status, so which devices torch uses is unknown"
        kinds = {v.split(":")[0] for v in placement.values()} - {"cpu", "auto"}
        absent = sorted(k for k in kinds if not any(glob.glob(p) for p in NODES.get(k, ())))
        if absent:
            yield Check("accelerators", "fail", f"{detail}; {shown} names {', '.join(absent)}, "
                        "but this machine has no such device", fix)
        elif nodes:
            yield Check("accelerators", "warn", f"{detail}; {', '.join(nodes)} exist",
                        "start m4d and run m4ctl doctor again: the daemon says what it sees")
        else:
            yield Check("accelerators", "ok", f"{detail}; {shown}")
        return
    names = {d.name for d in status.devices}
    detail = "the daemon sees " + "; ".join(_device(d) for d in status.devices)
    if nodes and names <= {"cpu"}:
        yield Check("accelerators", "warn", f"{detail}: only the CPU, but {', '.join(nodes)} "
                    "exist", "install a torch build for the device (CUDA, ROCm or XPU) and give "
                    "m4d the device (accelerator notes in m4d.service)")
        return
    missing = [f"{k} = {v}" for k, v in placement.items() if v != "auto" and v not in names]
    if missing:
        yield Check("accelerators", "fail", f"{detail}; placement names a device it does not "
                    f"have ({', '.join(missing)}): m4d will not start with it", fix)
        return
    running = ", ".join(f"{c} on {d.name}" for d in status.devices for c in d.components)
    yield Check("accelerators", "ok", f"{detail}; {shown}"
                + (f"; the daemon runs {running}" if running else ""))
