"""`m4d`, the process: flags + config → startup → serve → graceful shutdown. Exit 0 after a
clean shutdown, 1 when start-up fails (bad image, failed self-test, socket in use), 2 for a
bad configuration.

The servers listen first (health NOT_SERVING, inference UNAVAILABLE while the model loads);
under systemd READY=1 follows the self-test, and the watchdog pings while the executor makes
progress. SIGTERM or SIGINT drains: health goes NOT_SERVING, new calls get UNAVAILABLE,
in-flight calls finish (up to drain_timeout), STOPPING=1; a second signal forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path

from m4d import __version__
from m4d.config import Config, ConfigError, describe_defaults, load_config
from m4d.logs import setup_logging

log = logging.getLogger("m4d")  # run as __main__


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="m4d", description="The M4 model daemon.")
    p.add_argument("--config", type=Path, help="config file (default /etc/m4/m4d.toml; "
                   "env M4D_CONFIG)")
    p.add_argument("--image", help="firmware image directory to serve")
    p.add_argument("--app-socket", help="Unix socket for apps (default /run/m4/app.sock)")
    p.add_argument("--admin-socket", help="Unix socket for administrators "
                   "(default /run/m4/admin.sock)")
    p.add_argument("--runtime-dir", type=Path,
                   help="put app.sock and admin.sock in this directory")
    p.add_argument("--weight-format", help="w4a8, int4, int8, w8a8, bfloat16 or float32")
    p.add_argument("--compute-dtype", help="bfloat16 or float32")
    p.add_argument("--threads", help="torch threads (0 = one per core)")
    p.add_argument("--kernel-threads", help="threads of m4's own kernels (0 = one per core)")
    p.add_argument("--kernel-variant",
                   help="m4 kernel variant: auto (the best this CPU runs), avx512vnni, avxvnni, "
                        "avx2, neon_i8mm, neon_dotprod or scalar")
    p.add_argument("--kv-slots", help="generation sequences that run at once")
    p.add_argument("--max-context", help="longest prompt + output, in tokens")
    p.add_argument("--max-queue", help="waiting requests before UNAVAILABLE")
    p.add_argument("--prefix-cache-tokens", help="prompt KV kept for reuse by later prompts "
                   "with the same start (0 = no prefix cache)")
    p.add_argument("--self-test", help="strict, warn or off")
    p.add_argument("--state-dir", help="image store directory; boot from the store "
                   "(with --image: the factory image for an empty store)")
    p.add_argument("--keys-dir", help="trusted image-signing keys (default /etc/m4/keys)")
    p.add_argument("--require-signature", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse unsigned or badly signed images (default: yes)")
    p.add_argument("--swap-mode", help="overlap or drain (image activation)")
    p.add_argument("--log-format", help="json or text")
    p.add_argument("--log-level", help="debug, info, warning or error")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective configuration and exit")
    p.add_argument("--version", action="version", version=f"m4d {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in (
        "image", "app_socket", "admin_socket", "weight_format", "compute_dtype", "threads",
        "kernel_threads", "kernel_variant", "kv_slots", "max_context", "max_queue",
        "prefix_cache_tokens", "self_test",
        "log_format", "log_level", "state_dir", "keys_dir", "require_signature", "swap_mode")}
    if args.state_dir is not None:
        overrides["image_source"] = "store"
    if args.runtime_dir is not None:
        overrides["app_socket"] = overrides["app_socket"] or str(args.runtime_dir / "app.sock")
        overrides["admin_socket"] = (overrides["admin_socket"]
                                     or str(args.runtime_dir / "admin.sock"))
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"m4d: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        for key, _ in describe_defaults():
            print(f"{key} = {getattr(config, key)!r}")
        return 0
    from m4d.executor.cpu import check_weight_format  # imports torch
    from m4d.executor.devices import check_devices, discover

    try:
        check_devices(config.placement, discover())
        check_weight_format(config.weight_format)  # before any image is loaded or blamed
    except ConfigError as exc:
        print(f"m4d: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_format, config.log_level)
    log.info("m4d starting", extra={"version": __version__, "image": str(config.image)})
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; fall back anyway
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))


async def serve(config: Config) -> int:
    """Runs the daemon until a signal; returns the process exit code."""
    # torch and grpc load here, after the config is known good
    from m4d.server.app import Servers, start_metrics
    from m4d.service import systemd
    from m4d.service.addons import AddonManager
    from m4d.service.daemon import Daemon, State
    from m4d.service.images import ImageManager
    from m4d.service.lifecycle import StopSignals, notify, watchdog

    daemon = Daemon(config)
    images = ImageManager(daemon) if config.image_source == "store" else None
    addons = AddonManager(daemon) if config.image_source == "store" else None  # with the images
    servers = Servers(config, daemon, images, addons)
    try:
        await servers.start()
    except (OSError, RuntimeError) as exc:  # RelayError, SystemdError too
        log.error("cannot listen: %s", exc)
        await servers.stop()
        return 1

    signals = StopSignals()
    signals.install()
    exit_code = 0
    try:
        notify(lambda: systemd.status(f"loading image {config.image}"))
        load = asyncio.create_task(daemon.load(images.boot if images is not None else None))
        stopped = asyncio.create_task(signals.stop.wait())
        done, _ = await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if load in done:
            load.result()  # raises a load failure
            await servers.set_serving(True)
            notify(lambda: systemd.ready("serving"))
            pings = asyncio.create_task(watchdog(daemon))
            metrics = await start_metrics(config, daemon)
            await stopped
            pings.cancel()
            if metrics is not None:
                await metrics.stop()
        else:
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await load
        notify(systemd.stopping)
        if daemon.state is State.READY:
            await servers.set_serving(False)
            await daemon.drain(config.drain_timeout)
    except Exception as exc:
        log.error("start-up failed: %s", exc, extra={"error": type(exc).__name__})
        exit_code = 1
    finally:
        signals.restore()
        await servers.stop()
        daemon.stop()
        log.info("stopped", extra={"exit_code": exit_code})
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
