"""systemd/m4d.toml, installed as /etc/m4/m4d.toml: every key of m4d.config.Config is
documented there with its real default, commented out, and nothing else is."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from m4d.config import Config, load_config

SHIPPED = Path(__file__).resolve().parents[2] / "systemd" / "m4d.toml"
# A commented-out setting: `#key = value` (no space after '#', unlike prose comments).
SETTING = re.compile(r"^#([a-z_][a-z0-9_]*) = (.+)$")


def documented() -> list[tuple[int, str, str]]:
    """(line number, key, value) of every commented-out setting in the shipped file."""
    return [(n, m.group(1), m.group(2))
            for n, line in enumerate(SHIPPED.read_text().splitlines())
            if (m := SETTING.match(line))]


def test_every_key_is_documented_and_no_other() -> None:
    keys = [key for _, key, _ in documented()]
    fields = [f.name for f in dataclasses.fields(Config)]
    missing = sorted(set(fields) - set(keys))
    unknown = sorted(set(keys) - set(fields))
    assert not missing, f"{SHIPPED.name} does not document {missing}"
    assert not unknown, f"{SHIPPED.name} documents keys m4d does not know: {unknown}"
    assert len(keys) == len(set(keys)), f"a key appears twice in {SHIPPED.name}"


def test_every_key_has_a_description() -> None:
    lines = SHIPPED.read_text().splitlines()
    for n, key, _ in documented():
        above = lines[n - 1] if n else ""
        assert above.startswith("# ") and len(above) > 10, f"{key}: no description above it"


def test_shipped_file_loads_and_keeps_every_default() -> None:
    """As shipped, everything is commented out: the file loads and changes nothing."""
    assert load_config(SHIPPED, env={}) == Config()


def test_documented_defaults_are_the_real_defaults(tmp_path: Path) -> None:
    """With every setting uncommented, the file still loads and gives exactly Config()."""
    active = tmp_path / "m4d.toml"
    active.write_text("\n".join(f"{key} = {value}" for _, key, value in documented()) + "\n")
    assert load_config(active, env={}) == Config()


def test_one_uncommented_line_takes_effect(tmp_path: Path) -> None:
    """Removing the '#' is all an administrator does to change a setting."""
    text = SHIPPED.read_text().replace("#kv_slots = 16", "kv_slots = 8")
    edited = tmp_path / "m4d.toml"
    edited.write_text(text)
    assert load_config(edited, env={}) == Config(kv_slots=8)
