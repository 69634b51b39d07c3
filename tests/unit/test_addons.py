"""Add-ons as files (m4image.addon, addon_io, addon_store): the format, its signature and hashes,
every refusal with its own exception class, the store's install / replace / remove, and kill -9
at many points of a real install (the image store's crash-point mechanism)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from m4image.addon import (
    AddonManifest,
    AddonManifestError,
    ComponentClashError,
    OtherBaseError,
    TaskClashError,
    check_base,
)
from m4image.addon_io import iter_addon_tar, verify_addon
from m4image.addon_store import AddonNotFoundError, AddonStore
from m4image.keys import (
    BadSignatureError,
    Keyring,
    RevokedKeyError,
    UnknownKeyError,
    UnsignedImageError,
)
from m4image.manifest import Manifest
from m4image.sign import generate_keypair
from m4image.store import status_code_for
from m4image.verify import ExtraFileError, HashMismatchError

from tests.hooks.m4d_test_hooks import hooks_env
from tests.unit.addonkit import base_image, lora_task, make_addon
from tests.unit.imagekit import chunked


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Any]:
    image, digest = base_image(tmp_path / "image")
    _, other_digest = base_image(tmp_path / "other", seed="two")
    keys = tmp_path / "keys"
    dev = generate_keypair(tmp_path / "dev")
    Keyring(keys).add(dev.public_key)
    return {"tmp": tmp_path, "image": image, "digest": digest, "other_digest": other_digest,
            "keys": keys, "key": dev.private_key, "src": tmp_path / "src",
            "manifest": Manifest.from_json((image / "manifest.json").read_bytes())}


def _check(world: dict[str, Any], served: tuple[str, ...] = ()) -> Any:
    return lambda m: check_base(m, world["manifest"], world["digest"], served)


def _install(store: AddonStore, addon: Path, world: dict[str, Any], **kw: Any) -> Any:
    return store.install_stream(chunked(b"".join(iter_addon_tar(addon)), 300),
                                Keyring(world["keys"]), _check(world), **kw)


def test_written_addon_verifies_with_its_signature_and_round_trips(world: dict[str, Any]) -> None:
    addon = make_addon(world["tmp"] / "a", world["src"], world["digest"], key=world["key"])
    again = verify_addon(addon.path, keyring=Keyring(world["keys"]))
    assert again.digest == addon.digest and again.signed_by == addon.signed_by
    m = again.manifest
    assert (m.name, m.version, m.base) == ("travel", "1.0.0", world["digest"])
    assert m.components["travel-lora"]["metrics"] == {"eval": {"exact_match": 0.5}}
    assert [t["id"] for t in m.tasks] == ["travel-plan"]
    assert sorted(os.listdir(addon.path)) == ["adapters", "addon.json", "addon.sig"]
    assert AddonManifest.from_json(m.to_json()) == m
    check_base(m, world["manifest"], world["digest"])


def test_store_installs_replaces_lists_and_removes(world: dict[str, Any]) -> None:
    store = AddonStore(world["tmp"] / "state")
    v1 = make_addon(world["tmp"] / "v1", world["src"], world["digest"], key=world["key"])
    done = _install(store, v1.path, world)
    assert done.changed and done.replaced is None and done.entry.digest == v1.digest
    assert [(e.name, e.version) for e in store.list()] == [("travel", "1.0.0")]
    assert _install(store, v1.path, world).changed is False  # the same add-on: nothing written
    v2 = make_addon(world["tmp"] / "v2", world["src"], world["digest"], key=world["key"],
                    version="1.1.0", weights=b"better lora weights")
    done = _install(store, v2.path, world, keep=True)
    assert done.replaced is not None and done.replaced.version == "1.0.0"
    assert store.get("travel").version == "1.1.0" and store.get("travel").size == done.entry.size
    assert store.path_of(v1.digest).is_dir()  # kept for the calls still running through it
    assert store.purge(v1.digest) and not store.path_of(v1.digest).exists()
    store.verify(store.get("travel"), Keyring(world["keys"]))
    removed = store.remove("travel")
    assert removed.digest == v2.digest and store.list() == []
    assert sorted(os.listdir(store.entries_dir)) == [] and os.listdir(store.staging_dir) == []
    with pytest.raises(AddonNotFoundError, match="m4ctl adapter list") as e:
        store.remove("travel")
    assert status_code_for(e.value) == "NOT_FOUND"
    assert [h["event"] for h in store.history()] == ["install", "install", "remove"]


def test_kept_directory_of_a_removed_addon_goes_at_purge_or_next_open(world: dict[str, Any]) -> None:
    store = AddonStore(world["tmp"] / "state")
    v1 = make_addon(world["tmp"] / "v1", world["src"], world["digest"], key=world["key"])
    _install(store, v1.path, world)
    store.remove("travel", keep=True)
    assert store.path_of(v1.digest).is_dir()
    _install(store, v1.path, world)  # installed again while kept: the copy is its own again
    assert not store.purge(v1.digest) and store.path_of(v1.digest).is_dir()
    store.remove("travel", keep=True)
    reopened = AddonStore(world["tmp"] / "state")  # a crash before the purge: recovery
    assert not reopened.path_of(v1.digest).exists()
    assert reopened.recovered == [f"installed/{v1.digest}"]


# ---- refusals: one class each, FAILED_PRECONDITION, nothing written ---------------------------


def _refused(world: dict[str, Any], addon: Path, error: type[Exception], match: str,
             served: tuple[str, ...] = ()) -> None:
    store = AddonStore(world["tmp"] / "state")
    chunks = chunked(b"".join(iter_addon_tar(addon)), 300)
    with pytest.raises(error, match=match) as e:
        store.install_stream(chunks, Keyring(world["keys"]), _check(world, served))
    assert status_code_for(e.value) == "FAILED_PRECONDITION"
    assert store.list() == [] and os.listdir(store.entries_dir) == []
    assert os.listdir(store.staging_dir) == []


def test_unsigned_unknown_key_and_revoked_key_are_refused(world: dict[str, Any]) -> None:
    unsigned = make_addon(world["tmp"] / "u", world["src"], world["digest"], key=None)
    _refused(world, unsigned.path, UnsignedImageError, "the add-on has no addon.sig")
    stranger = generate_keypair(world["tmp"] / "stranger")
    other = make_addon(world["tmp"] / "s", world["src"], world["digest"], key=stranger.private_key)
    _refused(world, other.path, UnknownKeyError, "the add-on is signed with key .* not in the keyring")
    leaked = generate_keypair(world["tmp"] / "leaked")
    Keyring(world["keys"]).add(leaked.public_key)
    revoked = make_addon(world["tmp"] / "r", world["src"], world["digest"], key=leaked.private_key)
    Keyring(world["keys"]).revoke(leaked.key_id, reason="test")
    _refused(world, revoked.path, RevokedKeyError, "which is revoked")


def test_tampered_file_and_manifest_are_refused(world: dict[str, Any]) -> None:
    addon = make_addon(world["tmp"] / "t", world["src"], world["digest"], key=world["key"])
    weights = addon.path / "adapters/travel-lora/adapter_model.safetensors"
    weights.write_bytes(b"lora weightZ")  # same size, other bytes
    _refused(world, addon.path, HashMismatchError, "corrupted in transfer or tampered.*get the add-on again")
    with pytest.raises(HashMismatchError, match="pack the add-on again"):
        verify_addon(addon.path, keyring=Keyring(world["keys"]))
    doc = json.loads((addon.path / "addon.json").read_bytes())
    doc["version"] = "9.9.9"  # the manifest changed after signing
    (addon.path / "addon.json").write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")
    _refused(world, addon.path, BadSignatureError, "addon.sig does not match addon.json")
    extra = make_addon(world["tmp"] / "x", world["src"], world["digest"], key=world["key"])
    (extra.path / "adapters/notes.txt").write_text("not listed")
    with pytest.raises(ExtraFileError, match=r"notes\.txt"):
        verify_addon(extra.path, keyring=Keyring(world["keys"]))


def test_addon_for_another_image_or_backbone_is_refused(world: dict[str, Any]) -> None:
    other = make_addon(world["tmp"] / "o", world["src"], world["other_digest"], key=world["key"])
    _refused(world, other.path, OtherBaseError, "built for the image .* not for tiny 1.0.0")
    trained = make_addon(world["tmp"] / "b", world["src"], world["digest"], key=world["key"],
                         lora_base="0" * 64)
    _refused(world, trained.path, OtherBaseError, "trained on the backbone 000000000000")


def test_task_and_component_clashes_are_refused(world: dict[str, Any]) -> None:
    clash = make_addon(world["tmp"] / "c", world["src"], world["digest"], key=world["key"],
                       tasks=[lora_task("generate", "travel-lora")])
    _refused(world, clash.path, TaskClashError, "task id 'generate' is already served by the image")
    mine = make_addon(world["tmp"] / "m", world["src"], world["digest"], key=world["key"])
    _refused(world, mine.path, TaskClashError, "another installed add-on", served=("travel-plan",))
    named = make_addon(world["tmp"] / "n", world["src"], world["digest"], key=world["key"],
                       component="backbone")
    _refused(world, named.path, ComponentClashError, "named like a component of the image")
    dangling = make_addon(world["tmp"] / "d", world["src"], world["digest"], key=world["key"],
                          tasks=[lora_task("travel-x", "nowhere")])
    _refused(world, dangling.path, AddonManifestError, "neither a component of the add-on")


def test_manifest_schema_names_the_bad_key(world: dict[str, Any]) -> None:
    addon = make_addon(world["tmp"] / "a", world["src"], world["digest"], key=world["key"])
    good = json.loads((addon.path / "addon.json").read_bytes())
    for change, match in [({"format": "m4-addon/9"}, "m4-addon/9"),
                          ({"name": "Bad Name"}, "is not a name"),
                          ({"base": "abc"}, "addon.base"),
                          ({"extra": 1}, r"\['extra'\]"),
                          ({"components": {}}, "at least one adapter")]:
        with pytest.raises(AddonManifestError, match=match):
            AddonManifest.from_dict({**good, **change})
    lora = good["components"]["travel-lora"]
    for change, match in [({"kind": "conv"}, "an add-on holds lora and head"),
                          ({"module": "speech"}, "adapts the backbone or the text_encoder"),
                          ({"dir": "adapters/elsewhere"}, "not among the add-on's files"),
                          ({"base": "x"}, "sha256 of the backbone")]:
        with pytest.raises(AddonManifestError, match=match):
            AddonManifest.from_dict({**good, "components": {"travel-lora": {**lora, **change}}})


# ---- kill -9 during install, replace and remove ------------------------------------------------

CHILD = Path(__file__).with_name("addon_crash_child.py")


def test_kill_9_during_install_leaves_the_old_or_the_new_addon(world: dict[str, Any]) -> None:
    """Install v1, replace it with v2, remove it, in a subprocess SIGKILLed at its N-th durable
    step, for every N; reopening the store must find v1, v2 or nothing, each verifying in
    full, and no half add-on anywhere."""
    keyring = Keyring(world["keys"])
    v1 = make_addon(world["tmp"] / "v1", world["src"], world["digest"], key=world["key"])
    v2 = make_addon(world["tmp"] / "v2", world["src"], world["digest"], key=world["key"],
                    version="2.0.0", weights=b"v2 weights" * 5000)
    args = [str(world["keys"]), str(v1.path), str(v2.path)]
    env = dict(os.environ, **hooks_env())

    def child(mode: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(CHILD), mode, *args], input=stdin, env=env,
                              capture_output=True, text=True, timeout=300, check=False)

    dry = world["tmp"] / "dry"
    done = child("run", f"0 {dry}\n")
    assert done.returncode == 0, done.stderr
    total = int(done.stdout.split()[-1])
    assert AddonStore(dry).list() == []  # the script did install, replace and remove
    points = list(range(1, total + 1))
    served = child("serve", "".join(f"{n} {world['tmp'] / f'crash-{n}'}\n" for n in points))
    assert served.returncode == 0, served.stderr
    codes = dict(line.split() for line in served.stdout.splitlines())
    seen: set[str | None] = set()
    for n in points:
        where = f"crash at step {n}/{total}"
        assert codes[str(n)] == "-9", f"{where}: exited {codes[str(n)]}: {served.stderr}"
        store = AddonStore(world["tmp"] / f"crash-{n}")  # recovery runs here
        entries = store.list()
        assert len(entries) <= 1, where
        version = entries[0].version if entries else None
        seen.add(version)
        if entries:
            assert store.verify(entries[0], keyring).digest == entries[0].digest, where
        assert os.listdir(store.staging_dir) == [], where
        assert sorted(os.listdir(store.entries_dir)) == sorted(e.digest for e in entries), where
        assert [n for n in os.listdir(store.root) if n.startswith(".")] == [], where
        shutil.rmtree(world["tmp"] / f"crash-{n}")
    assert seen == {None, "1.0.0", "2.0.0"}
