"""The light client as an app developer installs it: `pip install ./clients/python` into an
empty venv, from a tree as a clean clone has it (no generated stubs: the build makes them),
then `m4ctl` and `m4client` from that venv against a real daemon on the default image.

The venv gets the client distribution (mobilefm-client) and its dependencies only: grpcio
and protobuf (and what they need), no torch, no daemon. The wheel's size and what the venv
holds are recorded as test properties (and printed with `pytest -s`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# What the client distribution and its dependencies may bring into an empty venv.
ALLOWED = {"mobilefm-client", "grpcio", "protobuf", "typing-extensions", "pip", "setuptools"}


@dataclass
class LightVenv:
    python: Path
    bin: Path
    wheel_bytes: int
    packages: dict[str, str]
    home: Path

    def run(self, daemon: DaemonProcess | None, *args: str, timeout: float = 180,
            ) -> subprocess.CompletedProcess[str]:
        """Runs a command of the venv with only its own bin on PATH and the daemon's sockets."""
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8"}
        if daemon is not None:
            env.update(M4_ADDRESS=daemon.address, M4_ADMIN_ADDRESS=daemon.admin_address)
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=self.home)


def _clean_tree(dest: Path) -> Path:
    """The client's and the protos' tracked files, as a fresh clone has them: no stubs."""
    listed = subprocess.run(["git", "ls-files", "clients/python", "protos"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split()
    for rel in listed:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    assert not list((dest / "clients/python/m4").rglob("*_pb2*.py")), "stubs are not tracked"
    return dest / "clients/python"


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LightVenv]:
    work = tmp_path_factory.mktemp("light")
    source = _clean_tree(work / "clone")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)],
                          capture_output=True, text=True, timeout=900, cwd=work)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list((source / "m4").rglob("inference_pb2.py")), "the build did not make the stubs"
    # The wheel that install built, built again from the same tree (stubs now present).
    subprocess.run([str(python), "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                    str(work / "dist"), str(source)], check=True, capture_output=True,
                   timeout=900, cwd=work)
    wheel = next((work / "dist").glob("mobilefm_client-*.whl"))
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                            check=True, capture_output=True, text=True, cwd=work).stdout
    packages = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed)}
    home = work / "home"
    home.mkdir()
    yield LightVenv(python, venv / "bin", wheel.stat().st_size, packages, home)


def test_the_venv_holds_the_client_and_nothing_heavy(
    light: LightVenv, record_property: pytest.RecordProperty,
) -> None:
    record_property("wheel_bytes", light.wheel_bytes)
    record_property("packages", " ".join(f"{k}=={v}" for k, v in sorted(light.packages.items())))
    print(f"\nmobilefm-client wheel: {light.wheel_bytes:,} bytes; venv: {light.packages}")
    assert set(light.packages) <= ALLOWED, light.packages
    assert {"mobilefm-client", "grpcio", "protobuf"} <= set(light.packages)
    assert light.wheel_bytes < 512 * 1024  # code and stubs only
    probe = ("import importlib.util as u; "
             "print(*[m for m in ('torch', 'numpy', 'm4d', 'm4image', 'grpc_health') "
             "if u.find_spec(m)])")
    done = light.run(None, str(light.python), "-c", probe)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr
    done = light.run(None, str(light.python), "-c",
                     "import m4, m4client, m4ctl; from m4.inference.v1 import inference_pb2; "
                     "from m4.admin.v1 import admin_pb2_grpc; print(m4client.Client)")
    assert done.returncode == 0, done.stderr


def test_daemon_side_commands_say_what_to_install(light: LightVenv, tmp_path: Path) -> None:
    done = light.run(None, str(light.bin / "m4ctl"), "image", "build", "--default",
                     "--output", str(tmp_path / "img"))
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "mobilefm distribution" in done.stderr, done.stderr
    done = light.run(None, str(light.bin / "m4ctl"), "keys", "list", "--keys", str(tmp_path))
    assert done.returncode == 1 and "mobilefm distribution" in done.stderr, done.stderr


def test_m4ctl_status_and_generate(light: LightVenv, daemon: DaemonProcess) -> None:
    m4ctl = str(light.bin / "m4ctl")
    done = light.run(daemon, m4ctl, "status")
    assert done.returncode == 0, done.stderr
    assert "m4-default" in done.stdout and "READY" in done.stdout.upper()
    done = light.run(daemon, m4ctl, "generate", "--temperature", "0", "--max-tokens", "16",
                     "What is the capital of France?")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_python_client_call(light: LightVenv, daemon: DaemonProcess) -> None:
    script = (
        "import json, os\n"
        "from m4client import Client\n"
        "with Client(os.environ['M4_ADDRESS'], app_name='light', timeout=120) as m4:\n"
        "    m4.wait_serving(60)\n"
        "    text = m4.complete('The capital of France is', task='complete', max_tokens=8,\n"
        "                       temperature=0).text\n"
        "    print(json.dumps([text, m4.embed(['some text', 'other text']).dimensions]))\n"
    )
    done = light.run(daemon, str(light.python), "-c", script)
    assert done.returncode == 0, done.stderr
    text, dims = json.loads(done.stdout)
    assert "Paris" in text and dims == 384


def test_doctor_runs_on_the_light_client(light: LightVenv, daemon: DaemonProcess) -> None:
    """Without the daemon's code: the devices come from the daemon's Status."""
    done = light.run(daemon, str(light.bin / "m4ctl"), "doctor", "--json",
                     "--config", "/dev/null")
    checks = {c["check"]: c for c in map(json.loads, done.stdout.splitlines())}
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr
    assert checks["app socket"]["status"] == "ok", checks["app socket"]
    assert checks["accelerators"]["detail"].startswith("the daemon sees cpu"), checks
    assert "not installed here" in checks["image"]["detail"]
