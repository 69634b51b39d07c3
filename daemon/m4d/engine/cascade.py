"""The media cascade as plain data: how a recognised text (a transcript, the text of an
image) and the caller's question become the prompt that the backbone answers.

Cascaded tasks (spoken-language understanding, questions about what was said, about the
text of an image or about the image itself) end their media half with `plan_answer`: a
chat prompt from the task's template, with max_tokens cut to the room left in the
context. No torch: for a question about an image (path 1), the plan says where the
image's features go, and the runtime splices them in.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from m4d.errors import InvalidArgument
from m4d.prepare.constraints import bind_spans
from m4d.prepare.prompts import answer_messages
from m4d.requests import GenerateRequest, MediaRequest, TokenConstraint

if TYPE_CHECKING:
    from m4d.prepare.tokenizer import ChatTemplate, TextTokenizer

# What a template's answer must be, enforced while decoding (structured output): the
# spoken-language-understanding answer is one JSON object with an intent and string slots.
_SLU_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "intent": {"type": "string", "pattern": "^[a-z][a-z_]{0,39}$"},
        "slots": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 64}},
    },
    "required": ["intent", "slots"],
    "additionalProperties": False,
}
SCHEMAS: dict[str, dict[str, object]] = {"slu": _SLU_SCHEMA, "slu_adapter": _SLU_SCHEMA}

IMAGE_MARKER = "<image>"


@dataclass(frozen=True)
class Answer:
    """A cascade's second half, planned: the generation that answers, on the same stream."""

    request: GenerateRequest  # the media request's id, caller, priority and deadline
    # path 1: the prompt with one image token, which the runtime replaces by the image's
    # features; request.prompt_ids holds that token once per feature (one id per position)
    splice_ids: list[int] | None = None


def plan_answer(request: MediaRequest, source: str, *, tokenizer: TextTokenizer | None,
                template: ChatTemplate | None, max_context: int,
                image: tuple[int, int] | None = None,
                constrain: Callable[[str], TokenConstraint] | None = None) -> Answer:
    """The recognised text (`source`) and the question as a chat prompt for the backbone,
    with max_tokens cut to the room left in the context. `image`: (the projector's image
    token, the number of image features) when the image's features are the prompt's;
    `constrain`: compiles a JSON schema (text) into a constraint, for the tasks whose
    answer has one (the task's own `response_schema`, else its template's in `SCHEMAS`). Raises InvalidArgument when there is no backbone or the
    prompt fills the context."""
    if tokenizer is None or request.sampling is None:
        raise InvalidArgument(f"task {request.task!r} needs a language backbone")
    messages = answer_messages(request.prompt_template, source, request.question)
    text = (template.render(messages, add_generation_prompt=True) if template is not None
            else "\n".join(m["content"] for m in messages) + "\n")
    splice_ids = None
    if image is not None:
        image_token, features = image
        before, _, after = text.partition(IMAGE_MARKER)
        splice_ids = [*tokenizer.encode(before), image_token, *tokenizer.encode(after)]
        at = splice_ids.index(image_token)
        ids = splice_ids[:at] + [image_token] * features + splice_ids[at + 1:]
    else:
        ids = tokenizer.encode(text)
    room = max_context - len(ids)
    if room <= 0:
        raise InvalidArgument(
            f"the recognised text makes a {len(ids)}-token prompt; the context holds "
            f"{max_context}")
    sampling = dataclasses.replace(request.sampling,
                                   max_tokens=min(request.sampling.max_tokens, room))
    schema = (bind_spans(request.response_schema, source) if request.response_schema else
              json.dumps(SCHEMAS[request.prompt_template])
              if request.prompt_template in SCHEMAS else "")
    constraint = constrain(schema) if schema and constrain is not None else None
    return Answer(GenerateRequest(
        task=request.task, priority=request.priority, caller=request.caller, id=request.id,
        arrival=request.arrival, deadline=request.deadline, prompt_ids=ids,
        sampling=sampling, constraint=constraint, adapter=request.adapter), splice_ids)
