"""Accelerators, stage 0 of serving: which devices this machine has, and where each
component of an image runs.

`discover()` builds a `DeviceRegistry` from what torch reports (cpu with its core count and
the ISA flags that matter for the CPU kernels, read from /proc/cpuinfo; cuda:N with name and
memory; mps; xpu:N). The probes are injectable, so tests describe any machine without
having it. `place()` turns the `placement` setting (component name or kind → device, with a
`default`, or "auto") into a `Placement`, and refuses a device the machine does not have
with a ConfigError that names the key and lists the devices found. `cpu_threads()` is the
CPU thread budget: what is left of the cores once the event loop and every accelerator's
feeding thread have one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from m4d.config import ConfigError, check_placement

# CPU flags that decide which kernels are fast here (bf16 matmuls, int8/int4 dot products).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
             "amx_int8", "amx_tile", "fma")
ACCELERATOR_ORDER = ("cuda", "xpu", "mps")  # what "auto" prefers, best first


@dataclass(frozen=True)
class Device:
    """One device torch can run on."""

    name: str  # torch's name: "cpu", "cuda:0", "xpu:0", "mps"
    kind: str  # "cpu", "cuda", "xpu" or "mps"
    description: str = ""  # CPU model name or the GPU's name
    memory_bytes: int = 0  # total memory (host RAM for cpu and mps)
    cores: int = 0  # logical CPU cores (cpu only)
    flags: tuple[str, ...] = ()  # CPU_FLAGS present (cpu only)

    @property
    def accelerator(self) -> bool:
        return self.kind != "cpu"

    def summary(self) -> str:
        """One line for status and doctor: `cpu: 2 cores, avx512_bf16 avx512_vnni`."""
        parts = [self.description] if self.description else []
        if self.cores:
            parts.append(f"{self.cores} cores")
        if self.memory_bytes:
            parts.append(f"{self.memory_bytes / 2**30:.1f} GiB")
        if self.flags:
            parts.append(" ".join(self.flags))
        return f"{self.name}: {', '.join(parts)}" if parts else self.name


@dataclass(frozen=True)
class DeviceRegistry:
    """The devices found, cpu first."""

    devices: tuple[Device, ...]

    def names(self) -> list[str]:
        return [d.name for d in self.devices]

    def get(self, name: str) -> Device | None:
        """The device called `name`; "cuda" and "xpu" without an index mean index 0."""
        if name in ("cuda", "xpu"):
            name += ":0"
        return next((d for d in self.devices if d.name == name), None)

    @property
    def cpu(self) -> Device:
        return next(d for d in self.devices if d.kind == "cpu")

    def best(self) -> Device:
        """What "auto" picks: the first accelerator of ACCELERATOR_ORDER, else the cpu."""
        for kind in ACCELERATOR_ORDER:
            for d in self.devices:
                if d.kind == kind:
                    return d
        return self.cpu


# ---- discovery --------------------------------------------------------------------------

def read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, tuple[str, ...]]:
    """(model name, CPU_FLAGS present) from /proc/cpuinfo; ("", ()) where there is none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return "", ()
    model, flags = "", set[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, tuple(f for f in CPU_FLAGS if f in flags)


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 0


def _torch_probe(kind: str) -> list[tuple[str, int]]:
    """(name, memory bytes) of each device of `kind` that torch reports."""
    import torch

    out: list[tuple[str, int]] = []
    if kind == "cuda" and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out.append((props.name, int(props.total_memory)))
    elif kind == "xpu" and hasattr(torch, "xpu") and torch.xpu.is_available():
        for i in range(torch.xpu.device_count()):
            xpu = torch.xpu.get_device_properties(i)
            out.append((xpu.name, int(getattr(xpu, "total_memory", 0))))
    elif kind == "mps" and torch.backends.mps.is_available():
        out.append(("Apple GPU", _host_memory()))
    return out


Probe = Callable[[str], list[tuple[str, int]]]


def discover(probe: Probe = _torch_probe, cpuinfo: str = "/proc/cpuinfo",
             cores: int | None = None) -> DeviceRegistry:
    """The devices of this machine (tests pass a fake `probe`, `cpuinfo` and `cores`)."""
    model, flags = read_cpuinfo(cpuinfo)
    found = [Device("cpu", "cpu", model, _host_memory(),
                    cores if cores is not None else (os.cpu_count() or 1), flags)]
    for kind in ("cuda", "xpu", "mps"):
        try:
            listed = probe(kind)
        except Exception:  # a broken driver must not stop a CPU-only daemon
            listed = []
        for i, (name, memory) in enumerate(listed):
            found.append(Device("mps" if kind == "mps" else f"{kind}:{i}", kind, name, memory))
    return DeviceRegistry(tuple(found))


# ---- placement --------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where each component of one image runs."""

    components: dict[str, str]  # component name -> device name
    registry: DeviceRegistry = field(compare=False)

    def device_for(self, name: str) -> str:
        return self.components.get(name, "cpu")

    def devices_in_use(self) -> list[str]:
        """Distinct devices, in first-use order (the engine runs one executor per device)."""
        return list(dict.fromkeys(self.components.values())) or ["cpu"]


def place(setting: Mapping[str, str], components: Mapping[str, str],
          registry: DeviceRegistry) -> Placement:
    """Each component's device: its name's entry, else its kind's, else `default`, else cpu.

    `components` maps component name -> kind. "auto" is the registry's best device. Raises
    ConfigError naming the key when a device is not on this machine."""
    check_devices(setting, registry)
    chosen: dict[str, str] = {}
    for name, kind in components.items():
        key = next((k for k in (name, kind, "default") if k in setting), None)
        wanted = setting[key] if key is not None else "cpu"
        device = registry.best() if wanted == "auto" else registry.get(wanted)
        assert device is not None  # check_devices saw every entry
        chosen[name] = device.name
    return Placement(chosen, registry)


def check_devices(setting: Mapping[str, str], registry: DeviceRegistry) -> None:
    """Every device the placement setting names is on this machine, used or not (a typo
    fails at start, not when an image with that component arrives)."""
    check_placement(dict(setting))
    for key, wanted in setting.items():
        if wanted != "auto" and registry.get(wanted) is None:
            raise ConfigError(
                f"placement.{key} = {wanted!r}: this machine has no such device; devices "
                f"found: {', '.join(registry.names())} (set placement.{key} to one of them "
                "or to \"auto\")")


def cpu_threads(requested: int, registry: DeviceRegistry, placement: Placement) -> int:
    """Torch threads for the CPU executor: `requested` if set (config `threads`), else one
    per core but one for the event loop and one per accelerator executor (it feeds its
    device from a CPU thread); at least one."""
    if requested > 0:
        return requested
    accelerators = sum(1 for d in placement.devices_in_use() if d != "cpu")
    return max(1, registry.cpu.cores - 1 - accelerators)


def describe(registry: DeviceRegistry, placement: Placement | None) -> list[dict[str, Any]]:
    """Plain rows for status: each device, and the components placed on it."""
    rows = []
    for d in registry.devices:
        placed = sorted(n for n, dev in (placement.components.items() if placement else ())
                        if dev == d.name)
        rows.append({"name": d.name, "kind": d.kind, "description": d.description,
                     "memory_bytes": d.memory_bytes, "cores": d.cores, "flags": list(d.flags),
                     "components": placed})
    return rows


__all__ = ["CPU_FLAGS", "Device", "DeviceRegistry", "Placement", "check_devices", "cpu_threads", "describe",
           "discover", "place", "read_cpuinfo"]
