"""m4image.store: install (from a directory and streamed), list, activate / trial, mark good,
roll back, boot selection with attempt counting and fallback, anti-rollback, every refusal of
a streamed install (each leaving the store and the active image untouched), crash recovery."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from imagekit import (
    COMPATIBLE,
    DAEMON_VERSION,
    chunked,
    craft_tar,
    entries_of,
    make_image,
    special,
    tar_of,
    tree_snapshot,
)
from m4image.keys import (
    BadSignatureError,
    Keyring,
    RevokedKeyError,
    UnknownKeyError,
    UnsignedImageError,
)
from m4image.manifest import ImageError, ManifestError
from m4image.sign import generate_keypair, sign_image
from m4image.store import (
    AlreadyActiveError,
    AmbiguousReferenceError,
    DowngradeError,
    DuplicateEntryError,
    ImageInUseError,
    ImageNotFoundError,
    ImageTooLargeError,
    NoBootableImageError,
    NoPreviousImageError,
    NoTrialError,
    StateCorruptError,
    StateMissingError,
    Store,
    UnexpectedEntryError,
    WrongStateError,
    status_code_for,
)
from m4image.tarstream import ArchiveTooLargeError, MalformedArchiveError, TruncatedArchiveError
from m4image.verify import (
    DaemonTooOldError,
    ExtraFileError,
    HashMismatchError,
    IncompatibleImageError,
    MissingFileError,
    SizeMismatchError,
    UnsafePathError,
    verify_image,
)

from tests.hooks.m4d_test_hooks import hooks_env

WEIGHTS = "backbone/model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Development keys and signed images, made once: v1 (security 1), v2 (security 2),
    v1.1 (security 1), one signed by a stranger's key, one unsigned."""
    d = tmp_path_factory.mktemp("world")
    dev = generate_keypair(d / "dev")
    stranger = generate_keypair(d / "stranger")
    keys = d / "keys"
    Keyring(keys).add(dev.public_key)
    imgs = {
        "v1": make_image(d / "v1", seed="one", version="1.0.0", security_version=1),
        "v2": make_image(d / "v2", seed="two", version="2.0.0", security_version=2),
        "v1.1": make_image(d / "v1.1", seed="three", version="1.1.0", security_version=1),
        "stranger": make_image(d / "stranger-img", seed="four", version="4.0.0"),
        "unsigned": make_image(d / "unsigned", seed="five", version="5.0.0"),
        "gpu": make_image(d / "gpu", seed="six", version="6.0.0", compatible="m4-gpu-v2"),
        "future": make_image(d / "future", seed="seven", version="7.0.0", min_daemon_version="9.0"),
    }
    for name, path in imgs.items():
        if name == "stranger":
            sign_image(path, stranger.private_key)
        elif name != "unsigned":
            sign_image(path, dev.private_key)
    digests = {n: hashlib.sha256((p / "manifest.json").read_bytes()).hexdigest() for n, p in imgs.items()}
    return {"dir": d, "dev": dev, "stranger": stranger, "keys": keys, "img": imgs, "digest": digests}


@pytest.fixture
def keyring(world: dict[str, Any], tmp_path: Path) -> Keyring:
    """A private copy of the keyring (tests revoke keys)."""
    shutil.copytree(world["keys"], tmp_path / "keys")
    return Keyring(tmp_path / "keys")


def new_store(path: Path, **kw: Any) -> Store:
    return Store(path, compatible=COMPATIBLE, daemon_version=DAEMON_VERSION, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return new_store(tmp_path / "state")


def state_json(store: Store) -> dict[str, Any]:
    return json.loads(store.state_path.read_bytes())  # type: ignore[no-any-return]


def assert_clean(store: Store) -> None:
    """No staging leftovers, no temporaries; images/ holds exactly what state.json lists."""
    assert os.listdir(store.staging_dir) == []
    assert [n for n in os.listdir(store.root) if n.startswith(".")] == []
    ours = [n for n in os.listdir(store.images_dir) if n not in store.foreign]
    assert sorted(ours) == sorted(state_json(store)["images"])


def good_store(path: Path, world: dict[str, Any], keyring: Keyring) -> Store:
    """A store whose active image is v1, marked good."""
    s = new_store(path)
    d = s.install_from_dir(world["img"]["v1"], keyring)
    s.activate(d)
    s.mark_good(d)
    return s


# ---- install, list ----------------------------------------------------------------------------


def test_fresh_store_layout(store: Store) -> None:
    assert state_json(store) == {
        "format": "m4-store/1", "active": None, "previous": None, "trial": None, "attempts": 0,
        "max_security_version": 0, "images": {}, "history": [],
    }  # fmt: skip
    assert stat.S_IMODE(os.stat(store.staging_dir).st_mode) == 0o700
    assert store.list() == [] and store.recovered == []
    with pytest.raises(NoBootableImageError, match="m4ctl image install"):
        store.select_for_boot()


def test_install_from_dir_and_stream_agree(world: dict[str, Any], keyring: Keyring, tmp_path: Path) -> None:
    a, b = new_store(tmp_path / "a"), new_store(tmp_path / "b")
    seen: list[tuple[str, int, int]] = []
    da = a.install_from_dir(world["img"]["v1"], keyring)
    db = b.install_stream(chunked(tar_of(world["img"]["v1"]), 333), keyring,
                          progress=lambda s, d, t: seen.append((s, d, t)))  # fmt: skip
    assert da == db == world["digest"]["v1"]
    assert tree_snapshot(a.path_of(da)) == tree_snapshot(b.path_of(db)) == tree_snapshot(world["img"]["v1"])
    assert seen and seen[-1][1] == seen[-1][2] > 0  # progress reaches the total
    for s in (a, b):
        image = s.verify(da, keyring)
        assert image.signed_by == world["dev"].key_id
        assert stat.S_IMODE(os.stat(s.path_of(da)).st_mode) == 0o755
        assert stat.S_IMODE(os.stat(s.path_of(da) / WEIGHTS).st_mode) == 0o644
        [entry] = s.list()
        assert (entry.digest, entry.name, entry.version, entry.security_version, entry.state) == (
            da, "tiny", "1.0.0", 1, "installed")
        assert entry.signed_by == world["dev"].key_id and entry.size > 0 and entry.installed_at
        assert_clean(s)
    assert a.install_stream(chunked(tar_of(world["img"]["v1"])), keyring) == da  # idempotent
    assert [e["event"] for e in a.history()] == ["install"]


def test_gnu_tar_in_the_documented_order(world: dict[str, Any], keyring: Keyring, store: Store, tmp_path: Path) -> None:
    tar = shutil.which("tar")
    if tar is None:
        pytest.fail("no tar binary: apt-get install -y tar")
    src = world["img"]["v2"]
    files = sorted(json.loads((src / "manifest.json").read_bytes())["files"])
    out = tmp_path / "image.tar"
    subprocess.run([tar, "-cf", str(out), "-C", str(src), "manifest.json", "manifest.sig", *files], check=True)
    assert store.install_stream(chunked(out.read_bytes(), 4096), keyring) == world["digest"]["v2"]


def test_resolve_references(world: dict[str, Any], keyring: Keyring, store: Store, tmp_path: Path) -> None:
    d1 = store.install_from_dir(world["img"]["v1"], keyring)
    d2 = store.install_from_dir(world["img"]["v2"], keyring)
    assert store.resolve(d1) == store.resolve("sha256:" + d1) == store.resolve(d1[:10]) == d1
    assert store.resolve("2.0.0") == store.resolve("tiny@2.0.0") == d2
    with pytest.raises(ImageNotFoundError, match="m4ctl image list"):
        store.resolve("9.9.9")
    with pytest.raises(ImageNotFoundError):
        store.resolve(d1[:4])  # too short to be a prefix
    twin = make_image(tmp_path / "twin", seed="twin", version="2.0.0")  # same version as v2
    sign_image(twin, world["dev"].private_key)
    store.install_from_dir(twin, keyring)
    with pytest.raises(AmbiguousReferenceError, match="give more of the digest"):
        store.resolve("2.0.0")


# ---- the boot state machine -------------------------------------------------------------------


def test_activate_trial_mark_good_rollback(world: dict[str, Any], keyring: Keyring, store: Store) -> None:
    d1 = store.install_from_dir(world["img"]["v1"], keyring)
    d2 = store.install_from_dir(world["img"]["v2"], keyring)
    with pytest.raises(NoTrialError):
        store.mark_good()
    assert store.activate("1.0.0") == d1
    assert {e.digest: e.state for e in store.list()} == {d1: "trial", d2: "installed"}
    boot = store.select_for_boot(3)
    assert (boot.digest, boot.trial, boot.attempt, boot.path) == (d1, True, 1, store.path_of(d1))
    assert store.mark_good(d1) == d1
    st = store.status()
    assert (st.active, st.previous, st.trial, st.attempts, st.max_security_version) == (d1, None, None, 0, 1)
    with pytest.raises(AlreadyActiveError):
        store.activate(d1)
    with pytest.raises(NoPreviousImageError):
        store.rollback()

    store.activate(d2)
    with pytest.raises(WrongStateError, match="not the image on trial"):
        store.mark_good(d1)
    store.select_for_boot()
    store.mark_good()
    st = store.status()
    assert (st.active, st.previous, st.max_security_version) == (d2, d1, 2)
    assert {e.digest: e.state for e in store.list()} == {d1: "previous", d2: "active"}

    # rolling back to v1 (security 1) goes below the floor of 2: refused unless allowed
    with pytest.raises(DowngradeError, match="--allow-downgrade"):
        store.rollback()
    assert store.rollback(allow_downgrade=True) == d1
    st = store.status()
    assert (st.active, st.previous, st.max_security_version) == (d1, d2, 2)  # the floor never drops
    assert store.select_for_boot().digest == d1
    assert store.rollback() == d2  # back again: v2 is at the floor
    events = [e["event"] for e in store.history()]
    assert events == ["install", "install", "activate", "boot-attempt", "mark-good", "activate",
                      "boot-attempt", "mark-good", "rollback", "rollback"]  # fmt: skip


def test_select_for_boot_counts_attempts_and_falls_back(world: dict[str, Any], keyring: Keyring, tmp_path: Path) -> None:
    store = good_store(tmp_path / "s", world, keyring)
    d1 = world["digest"]["v1"]
    d2 = store.install_from_dir(world["img"]["v2"], keyring)
    store.activate(d2)
    for attempt in (1, 2):
        boot = store.select_for_boot(max_attempts=2)
        assert (boot.digest, boot.trial, boot.attempt) == (d2, True, attempt)
        assert state_json(store)["attempts"] == attempt  # counted durably BEFORE the load
    boot = store.select_for_boot(max_attempts=2)  # out of attempts: back to the good image
    assert (boot.digest, boot.trial, boot.fell_back) == (d1, False, True)
    st = store.status()
    assert (st.active, st.trial, st.attempts, st.max_security_version) == (d1, None, 0, 1)
    assert store.history()[-1]["event"] == "fallback" and store.history()[-1]["digest"] == d2
    assert store.select_for_boot(2).fell_back is False
    # a failed self-test drops the trial at once
    store.activate(d2)
    store.select_for_boot()
    assert store.mark_bad(d2, "self-test: chat mismatch") == d2
    assert store.status().trial is None and store.history()[-1]["detail"] == "self-test: chat mismatch"
    assert store.record_attempt.__doc__
    with pytest.raises(NoTrialError):
        store.record_attempt()


def test_first_image_that_never_passes_leaves_nothing_to_boot(world: dict[str, Any], keyring: Keyring, store: Store) -> None:
    d = store.install_from_dir(world["img"]["v1"], keyring)
    store.activate(d)
    store.select_for_boot(1)
    with pytest.raises(NoBootableImageError):
        store.select_for_boot(1)


def test_anti_rollback_on_install_and_activate(world: dict[str, Any], keyring: Keyring, store: Store) -> None:
    d2 = store.install_from_dir(world["img"]["v2"], keyring)
    store.activate(d2)
    store.mark_good()
    before = tree_snapshot(store.root)
    with pytest.raises(DowngradeError, match="anti-rollback floor 2"):
        store.install_stream(chunked(tar_of(world["img"]["v1"])), keyring)
    assert tree_snapshot(store.root) == before
    d1 = store.install_stream(chunked(tar_of(world["img"]["v1"])), keyring, allow_downgrade=True)
    assert "downgrade allowed" in store.history()[-1]["detail"]
    with pytest.raises(DowngradeError):
        store.activate(d1)
    store.activate(d1, allow_downgrade=True)
    assert store.status().trial == d1


def test_remove(world: dict[str, Any], keyring: Keyring, tmp_path: Path) -> None:
    store = good_store(tmp_path / "s", world, keyring)
    d1 = world["digest"]["v1"]
    d2 = store.install_from_dir(world["img"]["v2"], keyring)
    d3 = store.install_from_dir(world["img"]["v1.1"], keyring)
    store.activate(d2)
    for d in (d1, d2):  # active, trial
        with pytest.raises(ImageInUseError):
            store.remove(d)
    store.mark_good()
    with pytest.raises(ImageInUseError, match="previous"):
        store.remove(d1)
    assert store.remove("1.1.0") == d3
    assert not store.path_of(d3).exists() and d3 not in state_json(store)["images"]
    assert_clean(store)


# ---- streamed install refusals ---------------------------------------------------------------


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x01
    return bytes(b)


def _tampered(world: dict[str, Any], name: str = "v2") -> list[tuple[str, bytes]]:
    return entries_of(world["img"][name])


def case_flipped_weight(w: dict[str, Any]) -> bytes:
    return craft_tar([(n, _flip(b, 100) if n == WEIGHTS else b) for n, b in _tampered(w)])


def case_truncated_file(w: dict[str, Any]) -> bytes:
    return craft_tar(_tampered(w), size_override={WEIGHTS: 1000})


def case_appended_file(w: dict[str, Any]) -> bytes:
    return craft_tar(_tampered(w), size_override={WEIGHTS: 3000})


def case_cut_stream(w: dict[str, Any]) -> bytes:
    return tar_of(w["img"]["v2"])[:4000]


def case_extra_file(w: dict[str, Any]) -> bytes:
    return craft_tar([*_tampered(w), ("backbone/extra.bin", b"surprise")])


def case_missing_file(w: dict[str, Any]) -> bytes:
    return craft_tar([e for e in _tampered(w) if e[0] != WEIGHTS])


def case_dotdot(w: dict[str, Any]) -> bytes:
    return craft_tar([*_tampered(w)[:2], ("../escape", b"x"), *_tampered(w)[2:]])


def case_absolute(w: dict[str, Any]) -> bytes:
    return craft_tar([*_tampered(w)[:2], ("/etc/m4/evil", b"x"), *_tampered(w)[2:]])


def case_symlink(w: dict[str, Any]) -> bytes:
    e = _tampered(w)
    return craft_tar([*[x for x in e if x[0] != WEIGHTS], special(WEIGHTS, tarfile.SYMTYPE, "/etc/shadow")])


def case_hardlink(w: dict[str, Any]) -> bytes:
    return craft_tar([*_tampered(w), special("backbone/link", tarfile.LNKTYPE, "backbone/tokenizer.json")])


def case_device(w: dict[str, Any]) -> bytes:
    return craft_tar([*_tampered(w)[:2], special("backbone/null", tarfile.CHRTYPE), *_tampered(w)[2:]])


def case_duplicate(w: dict[str, Any]) -> bytes:
    e = _tampered(w)
    return craft_tar([*e, e[-1]])


def case_manifest_not_first(w: dict[str, Any]) -> bytes:
    e = _tampered(w)
    return craft_tar([e[2], *e[:2], *e[3:]])


def case_bad_signature(w: dict[str, Any]) -> bytes:
    e = _tampered(w)
    return craft_tar([(n, _flip(b, b.index(b'"tiny"') + 2) if n == "manifest.json" else b) for n, b in e])


def case_unsigned(w: dict[str, Any]) -> bytes:
    return tar_of(w["img"]["unsigned"])


def case_unknown_key(w: dict[str, Any]) -> bytes:
    return tar_of(w["img"]["stranger"])


def case_revoked_key(w: dict[str, Any]) -> bytes:
    return tar_of(w["img"]["v2"])  # the test revokes the dev key first


def case_compatible(w: dict[str, Any]) -> bytes:
    return tar_of(w["img"]["gpu"])


def case_daemon_too_old(w: dict[str, Any]) -> bytes:
    return tar_of(w["img"]["future"])


def case_lower_security_version(w: dict[str, Any]) -> bytes:
    return tar_of(w["img"]["v1.1"])  # the store's floor is 2 in these tests... see below


def case_oversized_manifest(w: dict[str, Any]) -> bytes:
    return craft_tar([("manifest.json", b" " * ((1 << 20) + 1))])


def case_oversized_signature(w: dict[str, Any]) -> bytes:
    e = _tampered(w)
    return craft_tar([e[0], ("manifest.sig", b" " * 5000), *e[2:]])


def case_junk_after_end(w: dict[str, Any]) -> bytes:
    return tar_of(w["img"]["v2"]) + b"junk" + bytes(600)


def case_bad_checksum(w: dict[str, Any]) -> bytes:
    data = bytearray(tar_of(w["img"]["v2"]))
    data[0] ^= 0x01  # the first header's name: its checksum no longer matches
    return bytes(data)


def case_not_a_tar(w: dict[str, Any]) -> bytes:
    return b"PK\x03\x04" + bytes(2000)


CASES: dict[str, tuple[Any, type[BaseException]]] = {
    "flipped byte in a weight file": (case_flipped_weight, HashMismatchError),
    "truncated file": (case_truncated_file, SizeMismatchError),
    "appended file": (case_appended_file, SizeMismatchError),
    "stream cut short": (case_cut_stream, TruncatedArchiveError),
    "extra file": (case_extra_file, ExtraFileError),
    "missing file": (case_missing_file, MissingFileError),
    "'..' path": (case_dotdot, UnsafePathError),
    "absolute path": (case_absolute, UnsafePathError),
    "symlink entry": (case_symlink, UnsafePathError),
    "hard link entry": (case_hardlink, UnsafePathError),
    "device entry": (case_device, UnsafePathError),
    "duplicate entry": (case_duplicate, DuplicateEntryError),
    "manifest not first": (case_manifest_not_first, UnexpectedEntryError),
    "bad signature": (case_bad_signature, BadSignatureError),
    "unsigned": (case_unsigned, UnsignedImageError),
    "unknown key": (case_unknown_key, UnknownKeyError),
    "revoked key": (case_revoked_key, RevokedKeyError),
    "compatible mismatch": (case_compatible, IncompatibleImageError),
    "daemon too old": (case_daemon_too_old, DaemonTooOldError),
    "lower security_version": (case_lower_security_version, DowngradeError),
    "oversized manifest": (case_oversized_manifest, ManifestError),
    "oversized signature": (case_oversized_signature, BadSignatureError),
    "junk after the end": (case_junk_after_end, MalformedArchiveError),
    "bad header checksum": (case_bad_checksum, MalformedArchiveError),
    "not a tar": (case_not_a_tar, MalformedArchiveError),
}


@pytest.fixture(scope="module")
def floor2_template(world: dict[str, Any]) -> Path:
    """Active v2 (security 2, the floor), previous v1; built once, copied for each test."""
    keyring = Keyring(world["keys"])
    store = good_store(world["dir"] / "floor2", world, keyring)
    store.install_from_dir(world["img"]["v2"], keyring)
    store.activate("2.0.0")
    store.mark_good()
    return store.root


@pytest.fixture
def floor2_store(floor2_template: Path, tmp_path: Path) -> Store:
    """A private copy of the template: the refusals must leave all of it as it is."""
    shutil.copytree(floor2_template, tmp_path / "s")
    return new_store(tmp_path / "s")


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_install_refusals_leave_the_store_untouched(
    case: str, world: dict[str, Any], keyring: Keyring, floor2_store: Store
) -> None:
    make, error = CASES[case]
    data = make(world)
    if case == "revoked key":
        keyring.revoke(world["dev"].key_id)
    store = floor2_store
    before = tree_snapshot(store.root)
    consumed = 0

    def stream() -> Iterator[bytes]:
        nonlocal consumed
        for chunk in chunked(data, 512 * 3):
            consumed += len(chunk)
            yield chunk

    with pytest.raises(error) as e:
        store.install_stream(stream(), keyring)
    assert str(e.value)  # every refusal explains itself
    assert tree_snapshot(store.root) == before  # state.json, images and staging all unchanged
    assert_clean(store)
    st = store.status()
    assert (st.active, st.previous) == (world["digest"]["v2"], world["digest"]["v1"])
    if case == "oversized manifest":
        assert consumed < 20_000  # refused on its header, the megabyte was never read
    if case == "revoked key":
        return
    verify_image(store.path_of(st.active), keyring=keyring)
    # and the store still works
    assert store.install_stream(chunked(tar_of(world["img"]["v1"])), keyring, allow_downgrade=True) == world["digest"]["v1"]


def test_size_cap_and_endless_stream(world: dict[str, Any], keyring: Keyring, tmp_path: Path) -> None:
    small = new_store(tmp_path / "small", max_image_bytes=1000)
    with pytest.raises(ImageTooLargeError, match="limit of 1000"):
        small.install_stream(chunked(tar_of(world["img"]["v1"])), keyring)
    assert_clean(small)

    def endless() -> Iterator[bytes]:
        yield tar_of(world["img"]["v1"])
        while True:
            yield bytes(65536)

    with pytest.raises(ArchiveTooLargeError):
        new_store(tmp_path / "s").install_stream(endless(), keyring)


def test_install_from_dir_refusals(world: dict[str, Any], keyring: Keyring, tmp_path: Path) -> None:
    store = new_store(tmp_path / "s")
    src = tmp_path / "src"
    shutil.copytree(world["img"]["v1"], src)
    (src / "backbone/stray.bin").write_bytes(b"x")
    with pytest.raises(ExtraFileError):
        store.install_from_dir(src, keyring)
    (src / "backbone/stray.bin").unlink()
    w = src / WEIGHTS
    w.write_bytes(_flip(w.read_bytes(), 7))
    with pytest.raises(HashMismatchError):
        store.install_from_dir(src, keyring)
    w.unlink()
    w.symlink_to(world["img"]["v1"] / WEIGHTS)
    with pytest.raises(UnsafePathError):
        store.install_from_dir(src, keyring)
    with pytest.raises(UnsignedImageError):
        store.install_from_dir(world["img"]["unsigned"], keyring)
    assert store.install_from_dir(world["img"]["unsigned"], None)  # development store: no keyring
    assert store.list()[0].signed_by is None
    assert len(store.list()) == 1
    assert_clean(store)


# ---- crash recovery and a broken state file ---------------------------------------------------


def test_recovery_removes_leftovers(world: dict[str, Any], keyring: Keyring, tmp_path: Path) -> None:
    store = good_store(tmp_path / "s", world, keyring)
    good = tree_snapshot(store.path_of(world["digest"]["v1"]))
    # what crashes leave behind: a half-written install, a trash folder, a state temporary, and
    # an image published by rename just before state.json could list it
    half = store.staging_dir / "install-abc123"
    (half / "backbone").mkdir(parents=True)
    (half / "backbone/model.safetensors").write_bytes(b"half")
    (store.staging_dir / "trash-0011").mkdir()
    (store.root / ".state.json.tmp-xyz").write_bytes(b'{"half": ')
    shutil.copytree(world["img"]["v2"], store.images_dir / world["digest"]["v2"])
    reopened = new_store(store.root)
    assert sorted(reopened.recovered) == sorted([
        "staging/install-abc123", "staging/trash-0011", ".state.json.tmp-xyz",
        f"images/{world['digest']['v2']}",
    ])  # fmt: skip
    assert_clean(reopened)
    assert reopened.status().active == world["digest"]["v1"]
    assert tree_snapshot(reopened.path_of(world["digest"]["v1"])) == good
    assert reopened.history()[-1]["event"] == "recover"
    assert new_store(store.root).recovered == []  # nothing left the second time


def test_foreign_entries_in_images_are_left_alone(world: dict[str, Any], keyring: Keyring, tmp_path: Path) -> None:
    """images/default (the factory image tmpfiles.d copies in) is not the store's to delete."""
    root = tmp_path / "s"
    shutil.copytree(world["img"]["v1"], root / "images/default")
    store = new_store(root)  # no state.json yet, yet no StateMissingError
    assert store.foreign == ["default"] and store.recovered == [] and store.list() == []
    d = store.install_from_dir(root / "images/default", keyring)
    reopened = new_store(root)
    assert reopened.recovered == [] and reopened.foreign == ["default"]
    assert sorted(os.listdir(root / "images")) == sorted([d, "default"])
    verify_image(root / "images/default", keyring=keyring)


def test_corrupt_state_is_an_error_never_a_reset(world: dict[str, Any], keyring: Keyring, tmp_path: Path) -> None:
    store = good_store(tmp_path / "s", world, keyring)
    for broken in (b'{"format": "m4-store/1", "active": ', b"[]",
                   json.dumps({**state_json(store), "active": "ab" * 32}).encode()):  # fmt: skip
        store.state_path.write_bytes(broken)
        with pytest.raises(StateCorruptError, match="Restore it from a backup") as e:
            new_store(store.root)
        assert store.state_path.read_bytes() == broken  # left exactly as it was
        assert status_code_for(e.value) == "DATA_LOSS"
    store.state_path.unlink()
    with pytest.raises(StateMissingError, match=r"move .* aside"):
        new_store(store.root)
    assert not store.state_path.exists()


def test_status_codes() -> None:
    assert status_code_for(NoTrialError("x")) == "FAILED_PRECONDITION"
    assert status_code_for(BadSignatureError("x")) == "FAILED_PRECONDITION"
    assert status_code_for(DowngradeError("x")) == "FAILED_PRECONDITION"
    assert status_code_for(ImageNotFoundError("x")) == "NOT_FOUND"
    assert status_code_for(TruncatedArchiveError("x")) == "INVALID_ARGUMENT"
    assert status_code_for(ImageTooLargeError("x")) == "RESOURCE_EXHAUSTED"
    assert status_code_for(ValueError("x")) == "INTERNAL"
    assert issubclass(WrongStateError, ImageError)


# ---- fault injection: kill -9 at many points, as OSTree's tests do ---------------------------

CHILD = Path(__file__).with_name("store_crash_child.py")
CRASH_POINTS = int(os.environ.get("M4_CRASH_POINTS", "60"))
CRASH_SEED = int(os.environ.get("M4_CRASH_SEED", "4242"))


def _child(mode: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **hooks_env())  # the child kills itself with the test hooks
    return subprocess.run([sys.executable, str(CHILD), mode, *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip


@pytest.fixture
def crash_dir(tmp_path: Path) -> Iterator[Path]:
    """tmpfs when there is one: a SIGKILL never loses the page cache, so fsync (3-4 ms each on
    a shared disk) buys this test nothing, and the rename and unlink semantics are the same."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="m4-store-crash-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_kill_9_at_random_points_leaves_old_or_new(world: dict[str, Any], crash_dir: Path) -> None:
    """Install / activate / boot / mark good / roll back / install / remove in a subprocess,
    SIGKILLed at the N-th durable step for many N; reopening must always find a parseable
    state, an active image that is exactly the old or the new one and verifies, and no debris."""
    import random

    tmp_path = crash_dir

    keyring = Keyring(world["keys"])
    base = tmp_path / "base"  # active v1 (security 1), nothing else: v2 is the new image
    good_store(base, world, keyring)
    old, new = world["digest"]["v1"], world["digest"]["v2"]
    images = [str(world["keys"]), str(world["img"]["v2"]), str(world["img"]["v1.1"])]

    dry = tmp_path / "dry"
    shutil.copytree(base, dry)
    done = _child("run", str(dry), *images)
    assert done.returncode == 0, done.stderr
    total = int(done.stdout.split()[-1])
    final = new_store(dry).status()
    assert (final.active, final.previous) == (old, new)  # the script really did all of it

    rng = random.Random(CRASH_SEED)
    points = sorted({1, total, *rng.sample(range(1, total + 1), min(CRASH_POINTS, total))})
    assert len(points) >= min(50, total)
    for n in points:
        shutil.copytree(base, tmp_path / f"crash-{n}")
    served = _child("serve", *images, stdin="".join(f"{n} {tmp_path / f'crash-{n}'}\n" for n in points))
    assert served.returncode == 0, served.stderr
    codes = dict(line.split() for line in served.stdout.splitlines())
    assert sorted(int(n) for n in codes) == points

    seen_active = set()
    recovered = 0
    for n in points:
        where = f"crash at step {n}/{total} (M4_CRASH_SEED={CRASH_SEED})"
        assert codes[str(n)] == "-9", f"{where}: the child exited {codes[str(n)]}: {served.stderr}"
        store = new_store(tmp_path / f"crash-{n}")  # recovery runs here
        st = store.status()  # state.json parses
        assert st.active in (old, new), where
        seen_active.add(st.active)
        for digest in {st.active, st.previous, st.trial} - {None}:
            assert digest is not None
            image = store.verify(digest, keyring)  # every byte of it, signature included
            assert image.digest == digest, where
        assert_clean(store)
        if store.recovered:
            recovered += 1
            assert store.history()[-1]["event"] == "recover", where
    assert seen_active == {old, new}  # the crashes landed on both sides of mark_good
    assert recovered > 0  # and some of them left debris that the reopening cleaned
