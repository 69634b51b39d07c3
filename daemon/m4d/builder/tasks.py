"""Image build stage: the task table an image serves (``ListTasks``), from its components.

Each task names the components (``modules``) it runs through; the builder keeps the tasks
whose modules the image has. M4 task numbers are given where one matches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from m4image.manifest import IOSpec, Task


def _generation(id: str, description: str, given: IOSpec, reply: str,
                prompt_template: str = "") -> Task:
    """A backbone task answered by Generate: ``given`` in, a streamed text (``reply``) out."""
    return Task(id=id, path=2, modules=["backbone"], head="lm_head", rpc="Generate",
                streaming=True, prompt_template=prompt_template, description=description,
                inputs=[given], outputs=[IOSpec("text", "text", reply)])


def default_tasks() -> list[Task]:
    """The task table of the default image (M4 task numbers where one matches)."""
    text = IOSpec
    return [
        _generation(
            "generate", "Follow an instruction or answer a question: the prompt is sent as one user "
            "turn through the backbone's chat template, and the reply is streamed.",
            text("prompt", "text", "The instruction or question."),
            "The model's answer, streamed as it is produced.", prompt_template="chat"),
        _generation(
            "complete", "Continue a plain-text prompt with the backbone language model (no chat template).",
            text("prompt", "text", "The text to continue."),
            "The generated continuation, streamed as it is produced."),
        _generation(
            "chat", "Answer as an assistant: the conversation is rendered with the backbone's "
            "chat template and the model writes the next assistant message.",
            text("chat", "chat", "The conversation so far; the last message is usually the user's."),
            "The assistant's reply, streamed as it is produced.", prompt_template="chat"),
        Task(
            id="predict-next", m4_id="T1", path=2, modules=["backbone"], head="lm_head",
            rpc="PredictNext", streaming=False,
            description="Input word prediction (M4 T1): the most likely next words after the text "
            "typed so far, with their probabilities, for a keyboard's suggestion bar.",
            inputs=[text("text", "text", "The text typed so far.")],
            outputs=[text("predictions", "texts", "Candidate next words, most likely first, with probabilities.")],
        ),
        Task(
            id="embed", path=3, modules=["text_encoder"], head="mean_pool_l2", rpc="Embed",
            description="Sentence embeddings: mean-pooled, L2-normalised text-encoder vectors "
            "(384 dimensions) whose dot product is the cosine similarity, for search and clustering.",
            inputs=[text("texts", "texts", "The texts to embed (each truncated to the encoder's 256 tokens).")],
            outputs=[IOSpec("embeddings", "tensor", "One unit vector per text.", dtype="float32", shape=[-1, 384])],
        ),
        Task(
            id="classify", path=3, modules=["text_encoder"], head="similarity", rpc="Classify",
            description="Zero-shot classification: rank candidate labels by the cosine similarity "
            "between the text's embedding and each label's embedding.",
            inputs=[
                text("text", "text", "The text to classify."),
                text("labels", "texts", "The candidate labels, in plain words (e.g. 'sports', 'politics')."),
            ],
            outputs=[text("labels", "texts", "Every label with its score, best first.")],
        ),
    ]


def media_tasks(components: dict[str, dict[str, Any]]) -> list[Task]:
    """Speech and vision tasks for the media components an image has."""
    text, tasks = IOSpec, []
    audio = IOSpec("audio", "audio", "Speech: WAV bytes, or raw PCM (PcmAudio) with its sample rate; "
                   "at most 30 s.")
    image = IOSpec("image", "image", "An image: PNG, JPEG or WebP bytes.")
    answer = text("text", "text", "The backbone's answer, streamed as it is produced.")
    if "speech" in components:
        tasks += [
            Task(id="transcribe", m4_id="T37", path=3, modules=["speech"], head="transcript", rpc="Run",
                 description="Speech recognition: the words spoken in an English audio clip.",
                 inputs=[audio], outputs=[text("text", "text", "The transcript.")]),
            Task(id="keyword-spot", path=3, modules=["speech"], head="keyword_match", rpc="Run",
                 description="Keyword spotting: which of the caller's keywords or phrases were "
                 "said, matched against the transcript with spelling tolerance.",
                 inputs=[audio, text("keywords", "texts", "The words or phrases to listen for.")],
                 outputs=[text("keywords", "texts", "Each keyword, whether it was heard, a score "
                               "in [0, 1] and what was heard.")]),
        ]
    if "speech" in components and "backbone" in components:
        tasks += [
            Task(id="speech-understand", m4_id="T49", path=1, modules=["speech", "backbone"],
                 head="lm_head", prompt_template="slu", rpc="Run", streaming=True,
                 description="Spoken-language understanding: the request in the audio as JSON "
                 "with an intent and slots (the transcript is sent first, then the backbone "
                 "writes the JSON).", inputs=[audio], outputs=[answer]),
            Task(id="speech-ask", path=1, modules=["speech", "backbone"], head="lm_head",
                 prompt_template="speech_qa", rpc="Run", streaming=True,
                 description="Answer a question about what is said in an audio clip.",
                 inputs=[audio, text("question", "text", "The question.")], outputs=[answer]),
        ]
    if "ocr" in components:
        tasks.append(Task(
            id="ocr", m4_id="T21", path=3, modules=["ocr"], head="ocr_text", rpc="Run",
            description="Read the text in an image (English): text boxes in reading order, "
            "and the text joined line by line.",
            inputs=[image], outputs=[text("text", "text", "The text, lines joined by newlines."),
                                     IOSpec("boxes", "tensor", "Each box: text, confidence, 4 corners.")]))
    if components.get("clip", {}).get("kind") == "clip":
        tasks += [
            Task(id="image-classify", m4_id="T22", path=3, modules=["clip"], head="clip_zero_shot",
                 prompt_template="a photo of a {}", rpc="Run",
                 description="Zero-shot image classification: the caller's labels ranked by CLIP's "
                 "probability that the image shows them (each label is read as 'a photo of a "
                 "<label>').",
                 inputs=[image, text("labels", "texts", "The candidate labels, in plain words.")],
                 outputs=[text("labels", "texts", "Every label with its probability, best first.")]),
            Task(id="image-text-retrieval", m4_id="T46", path=3, modules=["clip"],
                 head="clip_similarity", rpc="Run",
                 description="Image-to-text retrieval: candidate texts ranked by the cosine "
                 "similarity of their CLIP embeddings to the image's.",
                 inputs=[image, text("texts", "texts", "The candidate texts (captions, queries).")],
                 outputs=[text("labels", "texts", "The texts, most similar first, with scores.")]),
            Task(id="image-embed", m4_id="T47", path=3, modules=["clip"], head="clip_image_embed",
                 rpc="Run",
                 description="The image's unit vector in CLIP's joint image-text space, for an "
                 "image index that text queries search (text-to-image retrieval).",
                 inputs=[image],
                 outputs=[IOSpec("embedding", "tensor", "One unit vector.", dtype="float32",
                                 shape=[1, int(components["clip"].get("dimensions") or -1)])]),
        ]
    if "sensor" in components:
        cfg = components["sensor"]["config"]
        tasks.append(Task(
            id="sensor-classify", path=3, modules=["sensor"], head="sensor_classifier", rpc="Run",
            labels=list(cfg["labels"]),
            description="Classify a window of sensor readings (e.g. IMU accelerometer and "
            "gyroscope) into the head's labels.",
            inputs=[IOSpec("window", "tensor", f"T time steps (T >= {cfg['min_steps']}) of "
                           f"{cfg['channels']} channels.", dtype="float32",
                           shape=[-1, int(cfg["channels"])])],
            outputs=[text("labels", "texts", "Every label with its probability, best first.")]))
    if {"vision_encoder", "projector", "backbone"} <= set(components):
        tasks.append(Task(
            id="vqa", m4_id="T33", path=1, modules=["vision_encoder", "projector", "backbone"],
            head="lm_head", prompt_template="vqa", rpc="Run", streaming=True,
            description="Visual question answering: the image's projected features take the "
            "place of the <image> token in the prompt and the backbone answers (LLaVA / MobileVLM).",
            inputs=[image, text("question", "text", "The question about the image.")],
            outputs=[answer]))
    if "ocr" in components and "backbone" in components:
        tasks.append(Task(
            id="ocr-ask", m4_id="T21", path=1, modules=["ocr", "backbone"], head="lm_head",
            prompt_template="ocr_qa", rpc="Run", streaming=True,
            description="Answer a question about the text in an image: the text is read first "
            "(and sent), then the backbone answers from it.",
            inputs=[image, text("question", "text", "The question.")], outputs=[answer]))
    return tasks


def adapter_tasks(tasks: list[Task], components: dict[str, dict[str, Any]]) -> list[Task]:
    """The tasks that run through a trained adapter of the image: with the spoken-language
    understanding adapter ("slu"), T49 runs through it, and typed commands too; with the
    intent head on the text encoder ("intent-head"), typed commands are classified by it
    (through the LoRA on the encoder it was trained with, when its component names one)."""
    out = list(tasks)
    head = components.get("intent-head", {})
    if head.get("kind") == "head":
        lora = f", through its LoRA on the encoder ('{head['lora']}')" if head.get("lora") else ""
        out.append(Task(
            id="command-intent", path=3, modules=["text_encoder"], head="linear_head",
            rpc="Classify", adapter="intent-head", labels=list(head["labels"]),
            description="The intent of a typed command (path 3): a head trained on the text "
            f"encoder's sentence vector{lora}; its labels are the task's, its held-out accuracy "
            "is in the image manifest (component 'intent-head').",
            inputs=[IOSpec("text", "text", "The command.")],
            outputs=[IOSpec("labels", "texts", "Every intent with its probability, best first.")]))
    if components.get("slu", {}).get("kind") != "lora":
        return out
    tasks, out = out, []
    schema = str(components["slu"].get("response_schema") or "")  # the adapter's intents
    for task in tasks:
        if task.id == "speech-understand":
            task = dataclasses.replace(
                task, adapter="slu", prompt_template="slu_adapter", response_schema=schema,
                description="Spoken-language understanding (M4 T49): the request in the audio "
                "as JSON with an intent and slots, from the transcript (sent first) through "
                "the backbone's trained SLU adapter.")
        out.append(task)
    out.append(Task(
        id="understand", m4_id="T49", path=2, modules=["backbone"], head="lm_head",
        rpc="Generate", streaming=True, adapter="slu", prompt_template="slu_adapter",
        response_schema=schema,
        description="Understand a typed or transcribed command: its intent and slots as JSON, "
        "through the backbone's trained SLU adapter (its held-out accuracy is in the image "
        "manifest, component 'slu').",
        inputs=[IOSpec("prompt", "text", "The command, as typed or transcribed.")],
        outputs=[IOSpec("text", "text", 'JSON: {"intent": ..., "slots": {...}}, streamed.')]))
    return out
