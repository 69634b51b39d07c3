"""Signed variants of the real default image for the image-store tests (not collected).

A variant is a new directory whose payload files are hard links to the default image's (the
store copies bytes on install, and verification accepts hard links: they are regular files),
with its own manifest.json (another version, security_version, self-test...) signed by a
development key the test generates. A file that a test tampers with is copied, never linked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from m4image.keys import Keyring
from m4image.sign import generate_keypair, sign_image

ROOT = Path(__file__).resolve().parents[2]


def dev_keys(directory: Path, name: str = "dev", trust: bool = True) -> Path:
    """A development key pair under `directory`; its public key trusted in directory/keys.
    Returns the private key's path."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = generate_keypair(directory / name)
    if trust:
        Keyring(directory / "keys").add(pair.public_key)
    return pair.private_key


def variant(src: Path, dst: Path, key: Path | None, *, copy: tuple[str, ...] = (),
            **manifest: Any) -> Path:
    """`src` as a new image at `dst`: manifest keys overridden, payload hard-linked (or copied
    for the paths in `copy`), signed with `key` (unsigned when None)."""
    data = json.loads((src / "manifest.json").read_bytes())
    data.update(manifest)
    for rel in data["files"]:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel in copy:
            shutil.copyfile(src / rel, dst / rel)
        else:
            os.link(src / rel, dst / rel)
    (dst / "manifest.json").write_bytes(
        (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode())
    if key is not None:
        sign_image(dst, key)
    return dst


def flip_byte(path: Path, offset: int) -> None:
    """Flips one bit of one byte in place (the file must be a copy, not a link)."""
    assert os.stat(path).st_nlink == 1, f"{path} is a hard link: copy it before tampering"
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def m4ctl(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
          ) -> subprocess.CompletedProcess[str]:
    """Runs the real m4ctl; returns the finished process (stdout, stderr as text)."""
    return subprocess.run([sys.executable, "-m", "m4ctl", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def store_state(state_dir: Path) -> dict[str, Any]:
    """state.json, parsed strictly (m4image.state) and returned as a dict."""
    from m4image.state import State

    path = state_dir / "state.json"
    return State.from_bytes(path.read_bytes(), path).to_dict()


def assert_store_clean(state_dir: Path) -> dict[str, Any]:
    """Read-only: state.json parses, no staging leftovers or temporaries, and images/ holds
    exactly the images state.json lists. Returns the state."""
    state = store_state(state_dir)
    assert os.listdir(state_dir / "staging") == [], os.listdir(state_dir / "staging")
    assert [n for n in os.listdir(state_dir) if n.startswith(".")] == []
    on_disk = sorted(n for n in os.listdir(state_dir / "images") if len(n) == 64)
    assert on_disk == sorted(state["images"]), (on_disk, sorted(state["images"]))
    return state


def start_store_daemon(factory: Path, run: Path, state_dir: Path, keys_dir: Path, *args: str,
                       env: dict[str, str] | None = None, timeout: float = 120) -> Any:
    """m4d booting from the image store in `state_dir` (`factory` seeds an empty one); waits
    until it serves, and kills it if it never does (no daemon outlives a failed start)."""
    from tests.conftest import start_daemon, wait_serving

    d = start_daemon(factory, run, "--state-dir", str(state_dir), "--keys-dir", str(keys_dir),
                     *args, wait=False, env=env)
    try:
        wait_serving(d, timeout)
    except BaseException:
        d.proc.kill()
        d.proc.wait()
        raise
    d.extra_env["state_dir"] = str(state_dir)
    return d


def random_lora(image: Path, out: Path, module: str, targets: list[str], *, rank: int,
                seed: int) -> Path:
    """A PEFT folder for the image's backbone or text encoder (`module`): new_lora on its
    real shapes with a random B (an untrained adapter that visibly changes the answers),
    pinned to that component's weights."""
    import torch
    from m4d.adapters.lora import write_peft
    from m4d.adapters.modules import new_lora
    from m4d.model.bert import BertConfig, BertEncoder
    from m4d.model.llama import Llama, LlamaConfig

    manifest = json.loads((image / "manifest.json").read_bytes())
    spec = manifest["components"][module]
    with torch.device("meta"):
        model = (Llama(LlamaConfig.from_dict(spec["config"])) if module == "backbone"
                 else BertEncoder(BertConfig.from_dict(spec["config"])))
    lora = new_lora(model, rank=rank, alpha=2 * rank, targets=targets, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for pair in lora.pairs.values():
        pair.b = torch.randn(pair.b.shape, generator=gen) * 0.05
    lora.base_model = manifest["files"][spec["weights"]]["sha256"]
    write_peft(out, lora)
    return out
