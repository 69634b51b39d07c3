"""Firmware image and add-on, layout: the file names of a signed directory and the advice its
refusals give.

Two kinds of signed directory share one signature format, one verification, one transport
(an uncompressed tar, manifest first, signature second) and one store design: firmware images
(``manifest.json`` + ``manifest.sig``) and add-ons (``addon.json`` + ``addon.sig``, see
``m4image.addon``). A ``Layout`` names a kind's two files and what its messages tell the
reader to do; signatures (``m4image.signature``), verification (``m4image.verify``), the
streamed install (``m4image.install``) and the tar writer (``m4image.tarstream``) take one,
an image's by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from m4image.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME

__all__ = ["IMAGE", "Layout"]


@dataclass(frozen=True)
class Layout:
    """One kind of signed directory: its manifest and signature files and its advice."""

    kind: str  # how messages name one: "image", "add-on"
    manifest: str  # the manifest's file name; its exact bytes are signed
    signature: str  # the signature's file name (format m4-sig/1, m4image.signature)
    max_manifest_bytes: int
    sign: str  # the command that signs one, e.g. "`m4ctl image sign DIR --key KEY`"
    rebuild: str  # what to do when its files do not match its manifest
    remove: str  # how to free room in the store
    tar: str  # how to write its install tar

    @property
    def reserved(self) -> tuple[str, str]:
        """The two names no payload file may take."""
        return self.manifest, self.signature


IMAGE = Layout(
    kind="image", manifest=MANIFEST_NAME, signature=SIGNATURE_NAME,
    max_manifest_bytes=MAX_MANIFEST_BYTES, sign="`m4ctl image sign DIR --key KEY`",
    rebuild="rebuild or re-download the image (m4ctl image build / install)",
    remove="remove unused images with `m4ctl image remove`",
    tar="`python -m m4image tar DIR -o FILE` (m4image.tarstream.iter_image_tar)")
