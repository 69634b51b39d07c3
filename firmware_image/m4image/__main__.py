"""Firmware image, command line: ``python -m m4image verify|sign|keygen|tar``.

``m4ctl image sign|verify`` and ``m4ctl keys`` call the same library functions; this entry
point exists so the image tooling can be used and tested without the daemon's client. Building
an image needs the daemon's model code and torch: ``python -m m4d.builder`` (or ``m4ctl image build``).
``verify`` checks the signature only with ``--keys DIR`` (development images are unsigned);
``m4ctl image verify`` requires it unless told ``--unsigned``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from m4image.manifest import ImageError


def _verify(args: argparse.Namespace) -> int:
    from m4image.keys import Keyring
    from m4image.verify import verify_image

    keyring = Keyring(args.keys) if args.keys else None
    image = verify_image(Path(args.directory), keyring=keyring, expected_compatible=args.compatible,
                         daemon_version=args.daemon_version)
    signed = f" signed-by:{image.signed_by}" if image.signed_by else " unsigned-not-checked"
    print(f"OK {image.manifest.name} {image.manifest.version} sha256:{image.digest}{signed}")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from m4image.sign import sign_image

    signed = sign_image(Path(args.directory), Path(args.key))
    print(f"OK signed sha256:{signed.digest} key:{signed.key_id}")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from m4image.sign import generate_keypair

    kp = generate_keypair(Path(args.output), force=args.force)
    print(f"OK key:{kp.key_id} {kp.private_key} {kp.public_key}")
    return 0


def _tar(args: argparse.Namespace) -> int:
    from m4image.fsutil import atomic_file
    from m4image.tarstream import iter_image_tar
    from m4image.verify import verify_image

    image = verify_image(Path(args.directory))  # hashes only: the store checks the signature
    with atomic_file(Path(args.output)) as tmp, open(tmp, "wb") as f:
        for chunk in iter_image_tar(image.path):
            f.write(chunk)
    print(f"OK {args.output} sha256:{image.digest}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m4image", description="Verify, sign and pack M4 firmware images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check an image's signature (with --keys), manifest and every file hash")
    v.add_argument("directory")
    v.add_argument("--keys", metavar="DIR", help="keyring directory: require a trusted signature")
    v.add_argument("--compatible", metavar="STR", help="require this compatible string")
    v.add_argument("--daemon-version", metavar="VER", help="require min_daemon_version <= VER")
    v.set_defaults(func=_verify)
    s = sub.add_parser("sign", help="write DIR/manifest.sig with an ed25519 private key")
    s.add_argument("directory")
    s.add_argument("--key", required=True, metavar="KEY", help="NAME.key from keygen")
    s.set_defaults(func=_sign)
    k = sub.add_parser("keygen", help="generate an ed25519 key pair: PATH.key (0600) and PATH.pub")
    k.add_argument("--output", required=True, metavar="PATH")
    k.add_argument("--force", action="store_true", help="overwrite existing key files")
    k.set_defaults(func=_keygen)
    t = sub.add_parser("tar", help="write an image as the uncompressed tar the store installs")
    t.add_argument("directory")
    t.add_argument("--output", "-o", required=True, metavar="FILE")
    t.set_defaults(func=_tar)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ImageError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
