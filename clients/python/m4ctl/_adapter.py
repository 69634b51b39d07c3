"""`m4ctl adapter ...`: add-ons, task adapters signed by a vendor and pinned to one image:
trained (`train`) and packed here (`pack`), managed on the daemon (`install`, `list`,
`remove`).

`pack` works on files with the daemon side's tools (`m4d.adapters.pack`, which needs torch
to check the adapter against the image), imported when it runs. The other verbs call the
Admin service over the admin socket (`--admin-address`, env M4_ADMIN_ADDRESS) and need only
the client: an install streams the add-on directory as a tar (or a tar file as it is); the
daemon verifies it and serves its tasks at once (`m4ctl tasks`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from m4client import AddonInfo

from . import _output as out
from ._keys import image_error
from ._parser import command, verbs
from ._tools import ToolError, UsageError, admin_client, daemon_side, tool_errors


def register(sub: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Adds `adapter` and its verbs to m4ctl's subcommands."""
    adapter = verbs(command(sub, "adapter", "Pack, install, list and remove add-ons (task "
                            "adapters signed by a vendor, pinned to one image).", parents),
                    "adapter")
    p = command(adapter, "pack", "Pack a PEFT LoRA folder, a task head, or a head with the "
                "LoRA on the text encoder it was trained with, as a signed add-on for one image "
                "(checked to fit it).", parents, cmd_adapter_pack)
    p.add_argument("--base-image", required=True, metavar="DIR",
                   help="the image the add-on is for (its digest is pinned)")
    p.add_argument("--name", required=True, help="the add-on's name (installing the same "
                   "name again replaces it)")
    p.add_argument("--version", default="1.0.0", help="the add-on's version")
    p.add_argument("--peft", metavar="DIR", help="a PEFT LoRA folder on the backbone or the "
                   "text encoder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--head", metavar="DIR", help="a task head on the text encoder (head.json + "
                   "head.safetensors); with --peft, the head runs with that LoRA on the encoder")
    p.add_argument("--component", default="", metavar="NAME",
                   help="the adapter's name in the add-on (default NAME-lora / NAME-head)")
    g = p.add_argument_group("the task it serves (or --task-json)")
    g.add_argument("--task-json", metavar="FILE", help="a task (or a list of tasks) in the "
                   "image manifest's schema; a missing adapter is this one")
    g.add_argument("--task-id", default="", metavar="ID", help="the task id (default: NAME)")
    g.add_argument("--rpc", default="", choices=("", "Generate", "Embed", "Classify"),
                   help="Generate (a LoRA on the backbone), Embed (a LoRA on the text encoder) "
                   "or Classify (a head)")
    g.add_argument("--prompt-template", default="", metavar="TEXT",
                   help='how the prompt reaches the backbone: "chat" (default), a text with '
                   "{prompt}, or a template the daemon knows")
    g.add_argument("--description", default="", metavar="TEXT", help="what the task does")
    p.add_argument("--key", required=True, metavar="KEY", help="the vendor's private key "
                   "(NAME.key from `m4ctl keys generate`)")
    p.add_argument("--out", "-o", required=True, metavar="DIR|FILE.tar",
                   help="the add-on directory, or its install tar")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p = command(adapter, "train", "Train a LoRA on the backbone from a JSONL file of "
                "{\"input\", \"output\"} lines, on this CPU (the daemon side's trainer); "
                "writes a PEFT folder and metrics.json to pack.", parents, cmd_adapter_train)
    p.add_argument("--image", required=True, metavar="DIR", help="the base image")
    p.add_argument("--template", "--task", required=True, metavar="NAME",
                   help="the prompt template the task serves with (e.g. slu_adapter)")
    p.add_argument("--data", required=True, metavar="FILE", help="training JSONL")
    p.add_argument("--val", metavar="FILE", help="validation JSONL for early stopping, best "
                   "worded apart from --data (default: a tenth of --data held out)")
    p.add_argument("--eval", metavar="FILE", help="held-out JSONL, scored at the end")
    p.add_argument("--scorer", default="exact", choices=("exact", "slu"))
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"),
                   help="the matmuls' dtype (auto: bfloat16 where the CPU has bf16 arithmetic)")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="the PEFT folder to write")
    for flag, kind, default in (("--rank", int, 8), ("--alpha", float, 16.0), ("--steps", int, 300),
                                ("--lr", float, 1e-3), ("--batch", int, 8), ("--seed", int, 0),
                                ("--threads", int, 0), ("--patience", int, 3)):
        p.add_argument(flag, type=kind, default=default)
    p = command(adapter, "install", "Install an add-on on the daemon (streamed over the admin "
                "socket); it is verified against the image served and its tasks are served "
                "at once.", parents, cmd_adapter_install)
    p.add_argument("path", metavar="PATH", help="add-on directory (or its tar file)")
    command(adapter, "list", "List the installed add-ons, their tasks and adapters, and "
            "whether each applies to the image served.", parents, cmd_adapter_list)
    p = command(adapter, "remove", "Remove an add-on: its tasks go at once, calls running "
                "through it finish.", parents, cmd_adapter_remove)
    p.add_argument("name", metavar="NAME")


# ---- local: pack ------------------------------------------------------------------------------


def _tasks(path: str | None) -> list[dict[str, Any]] | None:
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ToolError(f"--task-json {path}: {exc}") from None
    tasks = data if isinstance(data, list) else [data]
    if not all(isinstance(t, dict) for t in tasks):
        raise UsageError(f"--task-json {path}: expected a task object or a list of them")
    return tasks


def cmd_adapter_pack(args: argparse.Namespace) -> int:
    if not args.peft and not args.head:
        raise UsageError("give the adapter: --peft DIR, --head DIR, or both (a head with the "
                         "LoRA on the text encoder it was trained with)")
    pack = daemon_side("m4d.adapters.pack", "adapter pack")
    lora = daemon_side("m4d.adapters.lora", "adapter pack")
    flags = pack.TaskFlags(task_id=args.task_id, rpc=args.rpc,
                           prompt_template=args.prompt_template, description=args.description)
    with tool_errors(image_error("adapter pack"), lora.AdapterError):
        addon = pack.pack_addon(
            Path(args.base_image), Path(args.out), name=args.name, version=args.version,
            key=Path(args.key), peft=Path(args.peft) if args.peft else None,
            head=Path(args.head) if args.head else None, component=args.component,
            tasks=_tasks(args.task_json), flags=flags, force=args.force)
    m = addon.manifest
    info = {"path": str(addon.path), "name": m.name, "version": m.version,
            "digest": addon.digest, "base": m.base, "signed_by": addon.signed_by,
            "tasks": [t["id"] for t in m.tasks], "components": sorted(m.components)}
    out.result(args, info, addon.digest, [
        f"packed add-on {m.name} {m.version} at {addon.path}",
        f"for image: {m.base}", f"digest: {addon.digest}",
        f"signed by: {addon.signed_by}",
        f"tasks: {', '.join(t['id'] for t in m.tasks)}"])
    return 0


def cmd_adapter_train(args: argparse.Namespace) -> int:
    trainer = daemon_side("m4d.adapters.__main__", "adapter train")
    argv = ["train", "--image", args.image, "--template", args.template, "--data", args.data,
            "--scorer", args.scorer, "--out", args.out, "--dtype", args.dtype]
    argv += ["--eval", args.eval] if args.eval else []
    argv += ["--val", args.val] if args.val else []
    for name in ("rank", "alpha", "steps", "lr", "batch", "seed", "threads", "patience"):
        argv += [f"--{name}", str(getattr(args, name))]
    return int(trainer.main(argv))


# ---- the daemon (admin socket) ------------------------------------------------------------------


def _json(a: AddonInfo) -> dict[str, Any]:
    info = {k: getattr(a, k) for k in ("name", "version", "digest", "base_digest",
                                       "size_bytes", "signed_by", "installed_at", "applies",
                                       "reason")}
    info["tasks"] = [t.id for t in a.tasks]
    info["components"] = {c.name: {"kind": c.kind, "served_as": c.served_as,
                                   "metrics": c.metrics} for c in a.components}
    return info


def _source(path: Path) -> Iterator[bytes]:
    if path.is_dir():
        addon_io = daemon_side("m4image.addon_io", "adapter install DIR")
        try:
            chunks: Iterator[bytes] = addon_io.iter_addon_tar(path)
        except (addon_io.ImageError, OSError) as exc:
            raise ToolError(f"{path}: {exc}") from None
        return chunks
    if not path.is_file():
        raise ToolError(f"{path} is neither an add-on directory nor a tar file")

    def blocks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                yield block

    return blocks()


def cmd_adapter_install(args: argparse.Namespace) -> int:
    chunks = _source(Path(args.path))
    started = time.monotonic()
    with admin_client(args) as admin:
        change = admin.install_addon(chunks)
    a, seconds = change.addon, time.monotonic() - started
    info = dict(_json(a), seconds=round(seconds, 3), changed=change.changed,
                replaced=change.replaced.version if change.replaced else None,
                calls_finishing=change.calls_finishing)
    if not change.changed:
        first = f"add-on {a.name} {a.version} ({a.digest[:12]}) was installed already"
    else:
        was = f", replacing {change.replaced.version}" if change.replaced else ""
        first = (f"installed add-on {a.name} {a.version} ({a.digest[:12]}){was}: "
                 f"{out.human_bytes(a.size_bytes)} in {seconds:.2f} s")
    lines = [first, f"tasks served now: {', '.join(t.id for t in a.tasks) or '-'}"]
    if change.calls_finishing:
        lines.append(f"{change.calls_finishing} calls finish on the version replaced")
    out.result(args, info, a.digest, lines)
    return 0


def _metrics(a: AddonInfo) -> str:
    best = [f"{k}={v:g}" for c in a.components for k, v in sorted(c.metrics.items())]
    return ", ".join(best[:3]) or "-"


def cmd_adapter_list(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        listing = admin.list_addons()
    if args.json:
        out.json_line(listing.raw)
        return 0
    if args.quiet:
        out.write("".join(f"{a.name} {a.version} {'applies' if a.applies else 'idle'}\n"
                          for a in listing.addons))
        return 0
    if not listing.addons:
        out.write("no add-ons installed; pack one with `m4ctl adapter pack` and install it "
                  "with `m4ctl adapter install`\n")
        return 0
    rows = [("NAME", "VERSION", "APPLIES", "TASKS", "ADAPTERS", "SIZE", "BASE", "SIGNED BY",
             "METRICS")]
    rows += [(a.name, a.version, "yes" if a.applies else "no",
              ",".join(t.id for t in a.tasks) or "-",
              ",".join(f"{c.name}({c.kind})" for c in a.components) or "-",
              out.human_bytes(a.size_bytes), a.base_digest[:12], a.signed_by or "-",
              _metrics(a)) for a in listing.addons]
    lines = out.table(rows)
    lines += [f"{a.name}: {a.reason}" for a in listing.addons if not a.applies]
    out.write("".join(line + "\n" for line in lines))
    return 0


def cmd_adapter_remove(args: argparse.Namespace) -> int:
    with admin_client(args) as admin:
        change = admin.remove_addon(args.name)
    a = change.addon
    info = dict(_json(a), calls_finishing=change.calls_finishing)
    lines = [f"removed add-on {a.name} {a.version} ({a.digest[:12]}); its tasks are gone: "
             f"{', '.join(t.id for t in a.tasks) or '-'}"]
    if change.calls_finishing:
        lines.append(f"{change.calls_finishing} calls running through it finish first")
    out.result(args, info, a.digest, lines)
    return 0
