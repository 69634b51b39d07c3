"""Prompt templates of cascaded and adapter tasks (request preparation): how a recognised or
typed text (a transcript, the text of an image, a command) and the caller's question become
the chat the backbone answers. Shared by the daemon (``m4d.engine.cascade``) and adapter
training (``m4d.adapters.train``), so an adapter is trained on the prompt it is served with.
"""

from __future__ import annotations

_PROMPTS: dict[str, tuple[str, str]] = {
    # Spoken-language understanding (M4 T49 style): transcript -> intent and slots as JSON.
    "slu": (
        "You turn a spoken request into JSON with an \"intent\" (a short snake_case verb "
        "phrase) and \"slots\" (the details, as an object). Reply with the JSON only.",
        "Request: \"{source}\"",
    ),
    # The same with M4's trained SLU adapter (path 2): no worked examples, the adapter knows
    # the intents and the format (m4d.adapters.slu_data; firmware_image/adapters/slu).
    "slu_adapter": ("Turn the spoken request into JSON.", "Request: \"{source}\""),
    # Questions about the text in an image (M4 T21: OCR on rendered text).
    "ocr_qa": (
        "Answer the question using only the text found in an image. Be brief.",
        "Text in the image:\n{source}\n\nQuestion: {question}",
    ),
    # Questions about what was said.
    "speech_qa": (
        "Answer the question using only what the speaker said. Be brief.",
        "The speaker said: \"{source}\"\n\nQuestion: {question}",
    ),
    # Visual question answering (M4 T33): the image's features replace IMAGE_MARKER.
    "vqa": ("", "<image>\n{question}"),
}

TEMPLATES = frozenset(_PROMPTS)  # the cascade templates a task may name

# Worked examples before the real turn: a small backbone follows a format it has just seen
# (SmolLM2-135M answers free-form prose to the instruction alone, valid intent JSON after these).
_EXAMPLES: dict[str, tuple[tuple[str, str], ...]] = {
    "slu": (
        ("Set a timer for ten minutes.",
         '{"intent": "set_timer", "slots": {"duration": "ten minutes"}}'),
        ("What will the weather be like in Paris tomorrow?",
         '{"intent": "get_weather", "slots": {"city": "Paris", "date": "tomorrow"}}'),
        ("Play some jazz music in the living room.",
         '{"intent": "play_music", "slots": {"genre": "jazz", "room": "living room"}}'),
    ),
}


def answer_messages(template: str, source: str, question: str) -> list[dict[str, str]]:
    """The chat for a cascaded answer; ``template`` is a task's prompt_template."""
    system, user = _PROMPTS[template]
    turn = {"role": "user", "content": user.format(source=source.strip() or "(nothing)",
                                                   question=question.strip())}
    shots = [m for u, a in _EXAMPLES.get(template, ())
             for m in ({"role": "user", "content": user.format(source=u, question="")},
                       {"role": "assistant", "content": a})]
    return ([{"role": "system", "content": system}] if system else []) + shots + [turn]
