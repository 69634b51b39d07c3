"""The system `m4ctl doctor` checks: where it is (`--root`), its users and groups, what its
configuration says, and what the daemon answers about itself.

Everything comes from plain file reads and the daemon's own answers, never from the daemon's
code: m4ctl runs where only the light client is installed. The config file is read with
tomllib and checked against the reference that documents every key with its default
(`/usr/share/m4/m4d.toml` as install.sh installs it, or the commented lines of the config
itself); the values of every setting the checks need fall back to those defaults.
"""

from __future__ import annotations

import difflib
import grp
import pwd
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DAEMON_USER = "m4"
KEYS_DIR = "/etc/m4/keys"
#: Where install.sh puts the pristine config ($DATADIR/m4/m4d.toml, PREFIX /usr or /usr/local).
REFERENCES = ("/usr/share/m4/m4d.toml", "/usr/local/share/m4/m4d.toml")
# A documented setting: `#key = value` (no space after '#', unlike prose comments).
_DOCUMENTED = re.compile(r"^#([a-z_][a-z0-9_]*) = (.+)$", re.MULTILINE)
_PATHS = {"app_socket", "admin_socket", "image", "state_dir", "keys_dir"}
_KINDS = ((bool, "true or false"), (int, "an integer"), (float, "a number"),
          (str, "a string"), (dict, "a table"))


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


@dataclass(frozen=True)
class Settings:
    """What the checks need from the daemon's configuration (the daemon's defaults)."""

    app_socket: Path = Path("/run/m4/app.sock")
    admin_socket: Path = Path("/run/m4/admin.sock")
    app_socket_mode: int = 0o666
    admin_socket_mode: int = 0o660
    image: Path = Path("/var/lib/m4/images/default")
    state_dir: Path = Path("/var/lib/m4")
    keys_dir: Path = Path(KEYS_DIR)
    admin_group: str = "m4-admin"
    placement: dict[str, str] = field(default_factory=lambda: {"default": "cpu"})


def documented(text: str) -> dict[str, Any]:
    """The settings a reference config documents (`#key = value`), with their defaults."""
    found: dict[str, Any] = {}
    for key, value in _DOCUMENTED.findall(text):
        try:
            found.update(tomllib.loads(f"{key} = {value}"))
        except tomllib.TOMLDecodeError:
            continue
    return found


def config_problems(values: dict[str, Any], known: dict[str, Any]) -> list[str]:
    """Unknown keys and values of the wrong kind, as the daemon would refuse them at start."""
    problems = []
    for key, value in values.items():
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            problems.append(f"unknown key {key!r}" + (f" (did you mean {near[0]}?)" if near
                                                      else ""))
            continue
        kind, name = next((k, n) for k, n in _KINDS if isinstance(known[key], k))
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok:
            problems.append(f"{key} must be {name} (got {value!r})")
    return problems


@dataclass
class Context:
    """What every check needs: where the system is and what its configuration says."""

    root: Path
    config_file: Path
    app_address: str | None
    admin_address: str | None
    timeout: float
    config: dict[str, Any] | None = None  # the config file's values once the check read them
    _status: Any = field(default=None, repr=False)
    _asked: bool = field(default=False, repr=False)

    def path(self, p: Path | str) -> Path:
        """A path of the checked system, seen from here (under --root)."""
        p = Path(p)
        return self.root / p.relative_to("/") if p.is_absolute() else p

    def reference(self) -> dict[str, Any]:
        """Every documented setting with its default: the installed reference config, else
        the commented lines of the config file itself ({} when neither has any)."""
        for candidate in (*REFERENCES, self.config_file):
            try:
                found = documented(self.path(candidate).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
            if found:
                return found
        return {}

    def settings(self) -> Settings:
        """The values the checks use: the config's, else the documented defaults, else ours
        (a value of the wrong kind is skipped here; the config check reports it)."""
        values = {**self.reference(), **(self.config or {})}
        defaults, chosen = Settings(), dict[str, Any]()
        for f in fields(Settings):
            value = values.get(f.name)
            if f.name in _PATHS and isinstance(value, str):
                chosen[f.name] = Path(value)
            elif type(value) is type(getattr(defaults, f.name)):
                chosen[f.name] = value
        return Settings(**chosen)

    def daemon_status(self, target: str) -> Any:
        """The daemon's Admin Status (`m4client.DaemonStatus`) at `target`, asked once; None
        when it does not answer it (not running, no access, not m4d)."""
        if not self._asked:
            self._asked = True
            from m4client import AdminClient, M4Error

            try:
                with AdminClient(target, timeout=self.timeout) as admin:
                    self._status = admin.status()
            except (M4Error, OSError):
                self._status = None
        return self._status

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
        for fields_ in self._entries(kind):
            if len(fields_) >= 4 and fields_[0] == name and fields_[2].isdigit():
                members = tuple(m for m in fields_[3].split(",") if m) if kind == "group" else ()
                return Account(name, int(fields_[2]), members)
        return None

    def name_of(self, kind: str, ident: int) -> str:
        """The name of a uid ("passwd") or gid ("group") in the checked system, or the number."""
        if self.root == Path("/"):
            try:
                return pwd.getpwuid(ident).pw_name if kind == "passwd" else grp.getgrgid(ident).gr_name
            except KeyError:
                return str(ident)
        return next((f[0] for f in self._entries(kind) if len(f) >= 3 and f[2] == str(ident)),
                    str(ident))

    def _entries(self, kind: str) -> list[list[str]]:
        try:
            lines = self.path(f"/etc/{kind}").read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        return [line.split(":") for line in lines]
