"""Add-on components in the running banks and tasks in the table, without a model: a component
added under its own root, held by every request the engine accepts, retired without failing
one (it goes when the last holder ends), and tasks that join and leave the table in one step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from m4d.adapters.lora import AdapterError
from m4d.config import Config
from m4d.errors import InvalidArgument
from m4d.executor.adapters import HeadBank, holding, release
from m4d.requests import Caller, ClassifyRequest, Priority
from m4d.service.tasks import ImageInfo, Tasks

from tests.unit.test_tasks import TASKS, Template, WordTokenizer


class Runtime:
    def __init__(self, heads: HeadBank) -> None:
        self.adapters = None
        self.heads = heads


def _request(head: str) -> ClassifyRequest:
    return ClassifyRequest(task="intent", priority=Priority.FOREGROUND, caller=Caller(uid=1000),
                           text="lights on",
                           labels=["on", "off"], head=head)


def test_a_retired_component_goes_when_its_last_request_ends(tmp_path: Path) -> None:
    bank = HeadBank({"img-head": {"kind": "head", "dir": "adapters/img-head"},
                     "backbone": {"kind": "llama"}}, lambda rel: tmp_path / "image" / rel)
    bank.add("lights/head@abc", {"kind": "head", "dir": "adapters/head"}, tmp_path / "addon")
    assert bank.names == ["img-head", "lights/head@abc"]
    assert bank.folder("lights/head@abc") == tmp_path / "addon" / "adapters" / "head"
    assert bank.folder("img-head") == tmp_path / "image" / "adapters" / "img-head"
    with pytest.raises(AdapterError, match="served already"):
        bank.add("lights/head@abc", {"kind": "head", "dir": "x"}, tmp_path)

    runtime, gone = Runtime(bank), []
    first, second = _request("lights/head@abc"), _request("lights/head@abc")
    with holding(runtime, first):
        pass
    with holding(runtime, second):
        pass
    assert bank.retire("lights/head@abc", lambda: gone.append(1)) == 2
    assert bank.names == ["img-head"] and gone == []  # no new request, the old ones run on
    with pytest.raises(InvalidArgument, match=r"unknown task 'intent': its head .* was removed"), \
            holding(runtime, _request("lights/head@abc")):
        pass
    assert bank.folder("lights/head@abc")  # still readable for the requests holding it
    release(runtime, first)
    assert gone == []
    release(runtime, second)
    assert gone == [1] and "lights/head@abc" not in bank.specs
    assert bank.retire("lights/head@abc", lambda: gone.append(2)) == 0 and gone == [1, 2]


def test_a_request_refused_after_its_hold_lets_go_of_it(tmp_path: Path) -> None:
    bank = HeadBank({}, lambda rel: tmp_path / rel)
    bank.add("a/h@1", {"kind": "head", "dir": "h"}, tmp_path)
    runtime, gone = Runtime(bank), []
    with pytest.raises(RuntimeError), holding(runtime, _request("a/h@1")):
        raise RuntimeError("queue full")  # the engine refuses it after the hold
    assert bank.retire("a/h@1", lambda: gone.append(1)) == 0 and gone == [1]


def test_addon_tasks_join_and_leave_the_table_whole() -> None:
    tasks = Tasks(Config(), TASKS, ImageInfo("test", "1.0", "ab" * 32), WordTokenizer(),
                  Template(), max_context=64, adapters=["slu"])  # type: ignore[arg-type]
    plan: dict[str, Any] = {"id": "travel-plan", "rpc": "Generate", "adapter": "travel/l@1",
                            "inputs": [{"name": "prompt", "kind": "text"}]}
    before = tasks.tasks
    tasks.extend("travel", [plan], ["travel/l@1"])
    assert tasks.tasks is not before and "travel-plan" in tasks.tasks
    assert tasks.adapters == {"slu", "travel/l@1"}
    assert tasks.task("travel-plan", "Generate") is plan
    newer = dict(plan, adapter="travel/l@2")
    tasks.extend("travel", [newer], ["travel/l@2"])  # a new version replaces it in one step
    assert [t["id"] for t in tasks.task_list].count("travel-plan") == 1
    assert tasks.adapters == {"slu", "travel/l@2"}
    assert tasks.withdraw("travel") == ["travel-plan"]
    assert tasks.adapters == {"slu"} and [t["id"] for t in tasks.task_list] == [
        t["id"] for t in TASKS]
    with pytest.raises(InvalidArgument, match="unknown task 'travel-plan'"):
        tasks.task("travel-plan", "Generate")
