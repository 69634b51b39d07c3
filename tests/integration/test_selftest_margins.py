"""The self-test's near-tie allowance against the real default image, per served format.

NEAR_TIE_NATS must be loose enough that every format m4d serves passes the image's own
generation checks, and tight enough that a real fault cannot hide under it. These tests
score each check's expected output teacher-forced on the served path (as the self-test
does when greedy output differs) and check both sides."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from m4d.config import Config
from m4d.executor.runtime import ComponentInfo, Runtime
from m4d.service.selftest import NEAR_TIE_NATS, generation_request
from m4d.service.tasks import ImageInfo, Tasks
from m4image.verify import verify_image


def generation_checks(rt: Runtime) -> list[dict[str, Any]]:
    return [c for c in rt.image.manifest.self_test if "expected_token_ids" in c]


@pytest.fixture(scope="module", params=["w4a8", "int4"])
def served(request: pytest.FixtureRequest, text_image: Path) -> Iterator[tuple[Runtime, Tasks]]:
    image = verify_image(text_image)
    config = Config(image=text_image, weight_format=request.param, kv_slots=1)
    rt = Runtime(image, config)
    rt.load()
    m = image.manifest
    tasks = Tasks(config, m.tasks, ImageInfo(m.name, m.version, image.digest),
                  rt.tokenizer, rt.chat_template, rt.max_context)
    yield rt, tasks


def backbone(rt: Runtime) -> ComponentInfo:
    return next(c for c in rt.components if c.name == rt.backbone_name)


def test_the_served_formats_are_within_half_the_allowance(served: tuple[Runtime, Tasks]) -> None:
    """Every expected token lies at most NEAR_TIE_NATS / 2 below the served model's top:
    the allowance is not what decides whether a shipped format passes."""
    rt, tasks = served
    checks = generation_checks(rt)
    assert len(checks) >= 2, "the default image's self-test has lost its generation checks"
    for check in checks:
        prompt = generation_request(tasks, check).prompt_ids
        gaps = rt.reference_gaps(prompt, [int(t) for t in check["expected_token_ids"]], row=0)
        assert max(gaps) <= NEAR_TIE_NATS / 2, (
            f"{check['task']}: token {gaps.index(max(gaps))} is {max(gaps):.3f} nats below "
            f"the top with {backbone(rt)}")


def test_a_wrong_tokenizer_is_far_outside_the_allowance(served: tuple[Runtime, Tasks]) -> None:
    """A prompt tokenized against a vocabulary off by one (the kind of fault the self-test
    exists to catch) puts some expected token well beyond NEAR_TIE_NATS."""
    rt, tasks = served
    for check in generation_checks(rt):
        prompt = generation_request(tasks, check).prompt_ids
        shifted = [t + 1 for t in prompt]
        gaps = rt.reference_gaps(shifted, [int(t) for t in check["expected_token_ids"]], row=0)
        assert max(gaps) > 4 * NEAR_TIE_NATS, f"{check['task']}: {gaps}"
