"""Firmware image, boot protocol (RAUC-like): which installed image boots, as transitions of the
store's ``State``.

``activate`` makes an image the trial; at start the daemon calls ``Store.select_for_boot``,
which counts the attempt durably BEFORE the image is loaded (``count_attempt``) and, once the
trial has had its attempts, abandons it for the active image (``abandon_trial``). After the
self-test passes the daemon marks the trial good (it becomes active, the old active image
previous, and the anti-rollback floor rises to its security_version), or bad when it fails.
``rollback`` swaps active and previous. No image below the floor is installed, activated or
rolled back to unless a downgrade is allowed explicitly (``check_floor``).

Each transition checks one change and applies it to a ``State`` in memory, returning the
detail of its history event; ``m4image.store`` holds the lock, loads state.json, applies it,
records the event and saves. Nothing here touches a file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from m4image.state import INSTALL_HINT, State, StoreError

__all__ = [
    "AlreadyActiveError",
    "BootSelection",
    "DowngradeError",
    "ImageInUseError",
    "NoBootableImageError",
    "NoPreviousImageError",
    "NoTrialError",
    "WrongStateError",
    "abandon_trial",
    "activate",
    "boot_image",
    "check_floor",
    "check_removable",
    "count_attempt",
    "mark_bad",
    "mark_good",
    "require_trial",
    "rollback",
]


class WrongStateError(StoreError):
    """The operation does not fit the store's current state (FAILED_PRECONDITION)."""


class NoTrialError(WrongStateError):
    """mark_good / mark_bad / record_attempt without an image on trial."""


class NoPreviousImageError(WrongStateError):
    """rollback with no previous good image."""


class AlreadyActiveError(WrongStateError):
    """activate of the image that is already active."""


class ImageInUseError(WrongStateError):
    """remove of the active, previous or trial image."""


class NoBootableImageError(WrongStateError):
    """No image can be booted: none was ever marked good and no trial is left."""


class DowngradeError(StoreError):
    """The image's security_version is below the device's anti-rollback floor."""


@dataclass(frozen=True)
class BootSelection:
    """What ``select_for_boot`` chose: load ``path``; if ``trial``, self-test then mark it good."""

    digest: str
    path: Path
    trial: bool
    attempt: int  # this boot's attempt number for a trial, 0 otherwise
    fell_back: bool  # a trial ran out of attempts just now and was abandoned


def check_floor(state: State, name: str, version: str, security_version: int, allow: bool) -> None:
    """DowngradeError when ``security_version`` is below the anti-rollback floor, unless allowed."""
    if security_version < state.max_security_version and not allow:
        raise DowngradeError(
            f"{name} {version} has security_version {security_version}, below this device's "
            f"anti-rollback floor {state.max_security_version}: it may lack security fixes. "
            f"Use an image with security_version >= {state.max_security_version}, or pass "
            "--allow-downgrade if going back is really intended"
        )


def activate(state: State, digest: str, allow_downgrade: bool) -> str:
    """Make an installed image the trial (attempts = 0)."""
    rec = state.images[digest]
    if digest == state.active:
        pending = f"; the trial {state.trial[:12]} stays pending" if state.trial else ""
        raise AlreadyActiveError(f"{rec.name} {rec.version} ({digest[:12]}) is already the active image{pending}")
    check_floor(state, rec.name, rec.version, rec.security_version, allow_downgrade)
    replaced = f"; replaces trial {state.trial[:12]}" if state.trial and state.trial != digest else ""
    state.trial, state.attempts = digest, 0
    return (f"{rec.name} {rec.version} is the trial{replaced}"
            + (", downgrade allowed" if rec.security_version < state.max_security_version else ""))


def count_attempt(state: State) -> str:
    """One more boot of the trial."""
    if state.trial is None:
        raise NoTrialError("no image is on trial, so there is no attempt to count; activate one first")
    state.attempts += 1
    return f"attempt {state.attempts}"


def abandon_trial(state: State, max_attempts: int) -> str:
    """Drop a trial that has had its ``max_attempts`` boots without being marked good."""
    state.trial, state.attempts = None, 0
    back = state.active[:12] if state.active else "nothing (no image was ever marked good)"
    return f"the trial was not marked good after {max_attempts} attempts; back to {back}"


def boot_image(state: State) -> str:
    """The image to boot when no trial is: the active one (NoBootableImageError: none)."""
    if state.active is None:
        raise NoBootableImageError(
            "no image has been marked good and no trial is left to try; install and "
            f"activate an image ({INSTALL_HINT}, then `m4ctl image activate DIGEST`)"
        )
    return state.active


def require_trial(state: State, digest: str | None, resolve: Callable[[str], str], verb: str) -> str:
    """The image on trial, which ``digest`` (when given) must name."""
    if state.trial is None:
        raise NoTrialError(f"no image is on trial, so there is nothing to {verb}; activate one first "
                           "(`m4ctl image activate DIGEST`)")
    if digest is not None and resolve(digest) != state.trial:
        raise WrongStateError(
            f"{digest[:12]} is not the image on trial (that is {state.trial[:12]}); the trial "
            "changed since this boot: restart the daemon to boot the new trial"
        )
    return state.trial


def mark_good(state: State, trial: str) -> str:
    """The trial passed its self-test: it becomes active, the old active becomes previous,
    and the anti-rollback floor rises to its security_version."""
    rec = state.images[trial]
    old = state.active
    state.active, state.trial, state.attempts = trial, None, 0
    if old is not None and old != trial:
        state.previous = old
    state.max_security_version = max(state.max_security_version, rec.security_version)
    return f"{rec.name} {rec.version} is active" + (f", previous {old[:12]}" if old else "")


def mark_bad(state: State, reason: str) -> str:
    """The trial failed (self-test, load error): drop it at once; the active image stays."""
    state.trial, state.attempts = None, 0
    return reason or "the trial failed"


def rollback(state: State, allow_downgrade: bool) -> str:
    """Back to the previous good image: active <-> previous; a pending trial is dropped."""
    if state.previous is None:
        raise NoPreviousImageError(
            "there is no previous good image to roll back to (only one image has been "
            "marked good); activate another installed image instead"
        )
    rec = state.images[state.previous]
    check_floor(state, rec.name, rec.version, rec.security_version, allow_downgrade)
    dropped = f"; dropped trial {state.trial[:12]}" if state.trial else ""
    state.active, state.previous = state.previous, state.active
    state.trial, state.attempts = None, 0
    return f"back to {rec.name} {rec.version}{dropped}"


def check_removable(state: State, digest: str) -> None:
    """ImageInUseError when the image is active, previous or on trial."""
    for role in ("active", "previous", "trial"):
        if getattr(state, role) == digest:
            raise ImageInUseError(
                f"{digest[:12]} is the {role} image and cannot be removed; activate and "
                "mark good another image first"
            )
