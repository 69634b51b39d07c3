"""Image build stage: the error a build raises when the image cannot be built."""

from __future__ import annotations

from m4image.manifest import ImageError


class BuildError(ImageError):
    """The image could not be built (missing model package, output exists, ...)."""
