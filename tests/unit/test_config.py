"""Settings: defaults, file < environment < flags, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from m4d.config import Config, ConfigError, load_config


def test_defaults_use_system_paths() -> None:
    cfg = load_config(Path("/dev/null"), env={})
    assert cfg.app_socket == Path("/run/m4/app.sock")
    assert cfg.admin_socket == Path("/run/m4/admin.sock")
    assert cfg == Config()


def test_file_env_and_flags_in_that_order(tmp_path: Path) -> None:
    f = tmp_path / "m4d.toml"
    f.write_text('kv_slots = 4\nmax_queue = 9\napp_socket = "/tmp/a.sock"\n')
    cfg = load_config(f, env={"M4D_MAX_QUEUE": "11", "M4D_ADMIN_SOCKET_MODE": "0o640"},
                      overrides={"app_socket": "/tmp/b.sock", "kv_slots": None})
    assert cfg.kv_slots == 4
    assert cfg.max_queue == 11
    assert cfg.admin_socket_mode == 0o640
    assert cfg.app_socket == Path("/tmp/b.sock")


@pytest.mark.parametrize(("text", "needle"), [
    ("kv_slot = 3\n", "unknown key 'kv_slot'"),
    ("kv_slots = 'many'\n", "kv_slots must be an integer"),
    ("kv_slots = 0\n", "kv_slots must be > 0"),
    ("weight_format = 'int3'\n", "weight_format must be one of"),
    ("weight_format = 'int4'\ncompute_dtype = 'float32'\n", "needs compute_dtype=bfloat16"),
    ("kv_slots = [\n", "not valid TOML"),
])
def test_bad_file_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "m4d.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")) as err:
        load_config(f, env={})
    assert str(f) in str(err.value)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


def test_per_uid_caps_reach_the_engine_and_leave_room_for_four_apps(tmp_path: Path) -> None:
    from m4d.service.daemon import engine_config

    cfg = Config()
    quota = engine_config(cfg).admission.quota  # type: ignore[union-attr]
    assert cfg.max_running() == 12 and quota.max_running == 12
    assert cfg.kv_slots - quota.max_running >= 4, "a quarter of the slots stays for others"
    assert quota.max_queued * 4 <= cfg.max_queue
    assert quota.max_tokens_in_flight * 4 <= cfg.kv_slots * cfg.max_context
    assert engine_config(cfg).min_run_tokens == 16
    f = tmp_path / "m4d.toml"
    f.write_text("uid_max_queued = 3\nuid_max_running = 2\nuid_max_tokens_in_flight = 4096\n"
                 "min_run_tokens = 8\n")
    quota = engine_config(load_config(f, env={})).admission.quota  # type: ignore[union-attr]
    assert (quota.max_queued, quota.max_running, quota.max_tokens_in_flight) == (3, 2, 4096)
    with pytest.raises(ConfigError, match=r"uid_max_tokens_in_flight .* at least max_context"):
        Config(uid_max_tokens_in_flight=1000)
    assert Config(uid_max_tokens_in_flight=0).uid_max_tokens_in_flight == 0
    with pytest.raises(ConfigError, match="uid_max_queued must be > 0"):
        Config(uid_max_queued=0)


def test_backpressure_settings_reach_the_engine() -> None:
    from m4d.service.daemon import engine_config

    bp = engine_config(Config()).backpressure
    assert (bp.pause_tokens, bp.resume_tokens, bp.stall_seconds) == (256, 128, 30.0)
    bp = engine_config(Config(stream_pause_tokens=0, stream_stall_seconds=2.5)).backpressure
    assert (bp.pause_tokens, bp.stall_seconds) == (0, 2.5)
    with pytest.raises(ConfigError, match="stream_stall_seconds must be > 0"):
        Config(stream_stall_seconds=0)
